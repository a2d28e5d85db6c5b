"""Fixtures for the Flex tests: a node laid out like kubelet's (pods/ and plugins/ under a kubelet root), a Tessera
config with the file backend, and a `Kubelet` that calls the shim the way kubelet does."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import yaml

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from tests.integration.flex.kubelet import Kubelet  # noqa: E402


class FlexNode:
    def __init__(self, root: str, backends: dict) -> None:
        self.root = root
        self.kubelet_dir = os.path.join(root, "kubelet")
        self.state_dir = os.path.join(root, "state")
        self.config = os.path.join(root, "config.yaml")
        self.log = os.path.join(root, "shim.log")
        with open(self.config, "w") as f:
            yaml.safe_dump({"stateDir": self.state_dir, "backends": backends}, f)
        self.kubelet = Kubelet(self.config, self.log, node="flex-node")

    def pod_dir(self, pod_uid: str, pv: str) -> str:
        """Where kubelet asks for a pod's Flex volume: pods/<uid>/volumes/<vendor>~<driver>/<name>."""
        d = os.path.join(self.kubelet_dir, "pods", pod_uid, "volumes", "tessera~block", pv)
        os.makedirs(d, exist_ok=True)
        return d

    def global_dir(self, pv: str) -> str:
        """kubelet's device mount path for attachable Flex drivers."""
        d = os.path.join(self.kubelet_dir, "plugins", "kubernetes.io", "flexvolume", "tessera", "block", "mounts", pv)
        os.makedirs(d, exist_ok=True)
        return d

    def controller_ops(self, node: str = "flex-node"):
        from csi.config import load_config
        from csi.controllerops import ControllerOps
        from csi.registry import Backends
        return ControllerOps(Backends(load_config(self.config), node))

    def mounts_under(self) -> list[str]:
        out = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], capture_output=True, text=True).stdout.split()
        return [m for m in out if m.startswith(self.root)]

    def cleanup(self) -> None:
        for m in sorted(self.mounts_under(), key=len, reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True)
        out = subprocess.run(["losetup", "-a", "-O", "NAME,BACK-FILE", "-n", "--raw"], capture_output=True,
                             text=True).stdout
        for line in out.splitlines():
            parts = line.split(None, 1)
            if len(parts) == 2 and parts[1].startswith(self.root):
                subprocess.run(["losetup", "-d", parts[0]], capture_output=True)


def require_root_tools() -> None:
    missing = [t for t in ("losetup", "mkfs.ext4", "mkfs.xfs", "xfs_growfs", "blkid", "mount", "findmnt")
               if not shutil.which(t)]
    if missing or os.geteuid() != 0:
        pytest.fail(f"MISSING: root and {', '.join(missing) or 'tools'} are required for the Flex shim tests")


@pytest.fixture
def flexnode(tmp_path):
    require_root_tools()
    node = FlexNode(str(tmp_path), {"local": {"type": "file", "directory": str(tmp_path / "files")}})
    yield node
    leftovers = node.mounts_under()
    node.cleanup()
    assert not leftovers, f"mounts left behind: {leftovers}"
