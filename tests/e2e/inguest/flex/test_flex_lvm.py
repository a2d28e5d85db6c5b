"""The FlexVolume walk on LVM inside the real-kernel guest (real device-mapper, thick and thin): PVC → provisioner
(FakeApiServer stands in for the API server, which cannot run here) → PV → the shim called as kubelet calls it →
data written, re-mounted and read back → PVC released → the LV is gone from `lvs`."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import pytest
import yaml

from tests.conftest import require
from tests.e2e.vg import LVM_ENV, device_mapper_available, make_loop_vg
from tests.integration.flex.kubelet import Kubelet
from tests.integration.flex.walk import pvc_to_mount_walk

NODE = "e2e-flex-node"


def _lv_names(vg: str) -> list[str]:
    out = subprocess.run(["lvs", "--noheadings", "-o", "lv_name", vg], capture_output=True, text=True, env=LVM_ENV,
                         timeout=120)
    return [n.strip() for n in out.stdout.split() if n.strip()]


@pytest.mark.parametrize("kind", ["thick", "thin"])
def test_flex_pvc_to_mount_walk_lvm(kind):
    require(device_mapper_available(), "device-mapper (this suite runs inside the e2e guest: tests/e2e)")
    thin = kind == "thin"
    vg = make_loop_vg(2 << 30, thin_pool_size=(1 << 30) if thin else None, prefix=f"flex{kind}")
    root = tempfile.mkdtemp(prefix=f"flex-lvm-{kind}-", dir=os.environ.get("TESSERA_SCRATCH") or None)
    try:
        opts = {"type": "lvm", "volumeGroup": vg.name}
        if thin:
            opts["thinPool"] = vg.thin_pool
        config = os.path.join(root, "config.yaml")
        with open(config, "w") as f:
            yaml.safe_dump({"stateDir": os.path.join(root, "state"), "backends": {"lvm": opts}}, f)
        from csi.config import load_config
        from csi.controllerops import ControllerOps
        from csi.registry import Backends
        ops = ControllerOps(Backends(load_config(config), NODE))
        before = set(_lv_names(vg.name))
        kubelet = Kubelet(config, os.path.join(root, "shim.log"), node=NODE)
        facts = pvc_to_mount_walk(kubelet, os.path.join(root, "kubelet"), ops, NODE, {"backend": "lvm"},
                                  size="400Mi", fs_type="xfs" if thin else "ext4",
                                  volume_gone=lambda vid: set(_lv_names(vg.name)) == before)
        assert facts["capabilities"]["attach"] is False
        mounts = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], capture_output=True, text=True).stdout.split()
        assert not [m for m in mounts if m.startswith(root)], "mounts left behind"
        assert os.listdir(os.path.join(root, "state", "flex", "mounts")) == []
    finally:
        subprocess.run(["umount", "-R", "-l", root], capture_output=True)
        vg.destroy()
        shutil.rmtree(root, ignore_errors=True)
