"""The whole PVC-to-mount walk, shared by the host test (file backend) and the in-guest suite (LVM):

  PVC in FakeApiServer (a fake: no real API server can run here) → the real provisioner (leader, CreateVolume through
  ControllerOps, flexVolume PV) → the shim called as kubelet calls it with that PV's options: attach (when init says
  so) → waitforattach → mountdevice → mount → write → unmount → unmountdevice → mount again → read back → teardown
  → the PV is Released → the provisioner deletes the volume and the PV.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable

from kubernetes import client

from flex.provisioner import decide
from flex.provisioner.controller import Provisioner
from flex.provisioner.kube import Kube
from flex.provisioner.leader import LeaderElector
from tests.integration.flex.fake_apiserver import FakeApiServer
from tests.integration.flex.kubelet import Kubelet


def kubelet_options(pv: dict, pod_uid: str = "", readonly: bool = False) -> str:
    """Exactly what kubelet's NewOptionsForDriver builds from a flexVolume PV (plus pod fields for mount)."""
    flex = pv["spec"]["flexVolume"]
    opts = {"kubernetes.io/fsType": flex.get("fsType", ""), "kubernetes.io/readwrite": "ro" if readonly else "rw",
            "kubernetes.io/pvOrVolumeName": pv["metadata"]["name"]}
    if pod_uid:
        opts.update({"kubernetes.io/pod.name": "app", "kubernetes.io/pod.namespace": "apps",
                     "kubernetes.io/pod.uid": pod_uid, "kubernetes.io/serviceAccount.name": "default"})
    opts.update(flex.get("options") or {})
    return json.dumps(opts)


def pvc_to_mount_walk(kubelet: Kubelet, kubelet_dir: str, controller_ops, node: str, parameters: dict,
                      size: str = "400Mi", fs_type: str = "ext4",
                      volume_gone: Callable[[str], bool] = lambda vid: True) -> dict:
    """Run the walk; returns facts for the caller's extra assertions. Asserts every step as kubelet would see it."""
    api = FakeApiServer().start()
    try:
        api.put("sc", {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": "tessera-flex"},
                       "provisioner": decide.PROVISIONER_NAME, "reclaimPolicy": "Delete",
                       "volumeBindingMode": "WaitForFirstConsumer",
                       "parameters": {**parameters, "fsType": fs_type}})
        pvc = api.put("pvc", {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                              "metadata": {"name": "data", "namespace": "apps",
                                           "annotations": {decide.ANN_SELECTED_NODE: node}},
                              "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "tessera-flex",
                                       "resources": {"requests": {"storage": size}}},
                              "status": {"phase": "Pending"}})
        kube = Kube(client.ApiClient(client.Configuration(host=api.url)))
        prov = Provisioner(kube, controller_ops, LeaderElector(kube, "kube-system", "tessera-flex", "p-1"), node)
        done = prov.reconcile_once()
        pv_name = f"pvc-{pvc['metadata']['uid']}"
        assert done == [f"provisioned {pv_name}"], done
        pv = api.get("pv", pv_name)
        assert pv["spec"]["flexVolume"]["driver"] == "tessera/block"
        vid = pv["spec"]["flexVolume"]["options"]["volumeID"]

        caps = kubelet.ok("init")["capabilities"]
        opts = kubelet_options(pv)
        device = ""
        if caps["attach"]:
            device = kubelet.ok("attach", opts, node).get("device", "")
            assert kubelet.ok("isattached", opts, node)["attached"] is True
            device = kubelet.ok("waitforattach", device, opts).get("device", "")
        global_dir = os.path.join(kubelet_dir, "plugins", "kubernetes.io", "flexvolume", "tessera", "block",
                                  "mounts", pv_name)
        os.makedirs(global_dir, exist_ok=True)
        assert kubelet.call("mountdevice", global_dir, device, opts).ok
        pod1 = os.path.join(kubelet_dir, "pods", "uid-1", "volumes", "tessera~block", pv_name)
        os.makedirs(pod1)
        assert kubelet.call("mount", pod1, kubelet_options(pv, "uid-1")).ok
        payload = os.urandom(3 << 20)
        with open(os.path.join(pod1, "payload.bin"), "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        assert kubelet.call("unmount", pod1).ok
        assert kubelet.call("unmountdevice", global_dir).ok
        assert not os.path.exists(os.path.join(pod1, "payload.bin"))
        # the pod moves: mount again (attach: false path this time, as a node with no controller attach would)
        pod2 = os.path.join(kubelet_dir, "pods", "uid-2", "volumes", "tessera~block", pv_name)
        os.makedirs(pod2)
        assert kubelet.call("mount", pod2, kubelet_options(pv, "uid-2")).ok
        with open(os.path.join(pod2, "payload.bin"), "rb") as f:
            assert hashlib.sha256(f.read()).digest() == hashlib.sha256(payload).digest()
        assert kubelet.call("unmount", pod2).ok
        if caps["attach"]:
            assert kubelet.call("detach", pv_name, node).ok

        # the claim is deleted: the PV controller marks the PV Released; the provisioner deletes volume and PV
        pv["status"] = {"phase": "Released"}
        api.put("pv", pv)
        assert prov.reconcile_once() == [f"deleted {pv_name}"]
        assert api.get("pv", pv_name) is None
        assert volume_gone(vid), f"volume {vid} still exists in the backend after the PV was deleted"
        return {"volume_id": vid, "pv": pv, "capabilities": caps}
    finally:
        api.stop()


def provision_pv(ops, name: str, size: int = 64 << 20) -> tuple[str, dict]:
    """CreateVolume through `ops` (ControllerOps) and the flexVolume PV the provisioner would write for it, without
    the API server: (volume ID, PV) for tests that drive the shim directly."""
    from backends.base import CapabilitySpec
    vid, vol = ops.create_volume(name, size, 0, [CapabilitySpec("mount", "SINGLE_NODE_WRITER", "ext4")], {}, {})
    req = decide.VolumeRequest(name, size, 0, ["SINGLE_NODE_WRITER"], "ext4", {}, [])
    pv = decide.build_pv({"metadata": {"name": "c", "namespace": "n", "uid": name}, "spec": {}},
                         {"metadata": {"name": "sc"}}, req, vid, vol.capacity_bytes, vol.context, vol.topology)
    return vid, pv
