"""The Flex provisioner against FakeApiServer (a fake: no real API server can run here) through the real
`kubernetes` client, with the real file backend behind csi.controllerops: create, idempotent re-run, delete,
backend failure with events and backoff, two replicas under leader election, and the watch-driven loop."""
from __future__ import annotations

import os
import sys
import threading
import time

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from kubernetes import client  # noqa: E402

from backends.errors import NotFound  # noqa: E402
from csi.config import parse_config  # noqa: E402
from csi.controllerops import ControllerOps  # noqa: E402
from csi.registry import Backends  # noqa: E402
from flex.provisioner import decide  # noqa: E402
from flex.provisioner.controller import Provisioner  # noqa: E402
from flex.provisioner.kube import Kube  # noqa: E402
from flex.provisioner.leader import LeaderElector  # noqa: E402
from tests.integration.flex.fake_apiserver import FakeApiServer  # noqa: E402

NODE = "node-a"


class Clock:
    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def api():
    srv = FakeApiServer().start()
    srv.put("sc", {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": "flex"},
                   "provisioner": decide.PROVISIONER_NAME, "reclaimPolicy": "Delete",
                   "parameters": {"backend": "local", "fsType": "xfs"}, "mountOptions": ["noatime"]})
    srv.put("sc", {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": "other"},
                   "provisioner": "example.com/other"})
    yield srv
    srv.stop()


@pytest.fixture
def ops(tmp_path):
    cfg = parse_config({"stateDir": str(tmp_path / "state"),
                        "backends": {"local": {"type": "file", "directory": str(tmp_path / "files")}}})
    return ControllerOps(Backends(cfg, NODE))


def kube_for(api: FakeApiServer) -> Kube:
    conf = client.Configuration(host=api.url)
    return Kube(client.ApiClient(conf))


def provisioner(api, ops, identity="replica-1", clock=None) -> Provisioner:
    clock = clock or Clock()
    kube = kube_for(api)
    return Provisioner(kube, ops, LeaderElector(kube, "kube-system", "tessera-flex", identity, 15, clock), NODE,
                       clock=clock)


def pvc(api, name, size="64Mi", sc="flex", **ann) -> dict:
    return api.put("pvc", {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                           "metadata": {"name": name, "namespace": "apps", "annotations": ann},
                           "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": sc,
                                    "resources": {"requests": {"storage": size}}},
                           "status": {"phase": "Pending"}})


def events(api, reason):
    return [e for e in api.items("event") if e["reason"] == reason]


def test_create_makes_volume_and_flex_pv(api, ops):
    claim = pvc(api, "data")
    pvc(api, "not-ours", sc="other")
    done = provisioner(api, ops).reconcile_once()
    name = f"pvc-{claim['metadata']['uid']}"
    assert done == [f"provisioned {name}"]
    pv = api.get("pv", name)
    flex = pv["spec"]["flexVolume"]
    assert flex["driver"] == "tessera/block" and flex["fsType"] == "xfs"
    assert flex["options"]["mountOptions"] == "noatime"
    vid = flex["options"]["volumeID"]
    backend, vol = ops.get_volume(vid)
    assert vol.capacity_bytes >= 64 << 20 and int(pv["spec"]["capacity"]["storage"]) == vol.capacity_bytes
    assert pv["spec"]["claimRef"] == {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": "apps",
                                      "name": "data", "uid": claim["metadata"]["uid"]}
    assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Delete"
    terms = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [{"key": "topology.tessera.csi.dev/node", "operator": "In",
                                            "values": [NODE]}]}]
    assert len(api.items("pv")) == 1
    ok = events(api, "ProvisioningSucceeded")
    assert len(ok) == 1 and ok[0]["involvedObject"]["name"] == "data" and vid in ok[0]["message"]


def test_rerun_is_idempotent_and_repairs_a_lost_pv(api, ops):
    claim = pvc(api, "data")
    p = provisioner(api, ops)
    p.reconcile_once()
    name = f"pvc-{claim['metadata']['uid']}"
    vid = api.get("pv", name)["spec"]["flexVolume"]["options"]["volumeID"]
    posts = [x for x in api.log if x == ("POST", "/api/v1/persistentvolumes")]
    assert p.reconcile_once() == []
    assert [x for x in api.log if x == ("POST", "/api/v1/persistentvolumes")] == posts
    # a crash between CreateVolume and the PV: the next pass makes the PV for the same volume, not a second volume
    api.objects["pv"].clear()
    assert p.reconcile_once() == [f"provisioned {name}"]
    assert api.get("pv", name)["spec"]["flexVolume"]["options"]["volumeID"] == vid
    assert len(list(ops.backends.for_id("local", "x").list_volumes({}))) == 1


def test_release_with_delete_policy_deletes_volume_and_pv(api, ops):
    claim = pvc(api, "data")
    p = provisioner(api, ops)
    p.reconcile_once()
    name = f"pvc-{claim['metadata']['uid']}"
    pv = api.get("pv", name)
    vid = pv["spec"]["flexVolume"]["options"]["volumeID"]
    pv["status"] = {"phase": "Bound"}
    api.put("pv", pv)
    assert p.reconcile_once() == []  # bound: nothing to do
    pv = api.get("pv", name)
    pv["status"] = {"phase": "Released"}
    api.put("pv", pv)
    assert p.reconcile_once() == [f"deleted {name}"]
    assert api.get("pv", name) is None
    with pytest.raises(NotFound):
        ops.get_volume(vid)


def test_release_with_retain_policy_keeps_everything(api, ops):
    sc = api.get("sc", "flex")
    sc["reclaimPolicy"] = "Retain"
    api.put("sc", sc)
    claim = pvc(api, "keep")
    p = provisioner(api, ops)
    p.reconcile_once()
    name = f"pvc-{claim['metadata']['uid']}"
    pv = api.get("pv", name)
    assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Retain"
    pv["status"] = {"phase": "Released"}
    api.put("pv", pv)
    assert p.reconcile_once() == []
    ops.get_volume(pv["spec"]["flexVolume"]["options"]["volumeID"])  # still there


def test_backend_failure_is_an_event_and_retried_with_backoff(api, ops):
    clock = Clock()
    claim = pvc(api, "huge", size="1Pi")  # more than the file backend's filesystem holds: a real backend error
    p = provisioner(api, ops, clock=clock)
    done = p.reconcile_once()
    assert len(done) == 1 and done[0].startswith("failed huge")
    warn = events(api, "ProvisioningFailed")
    assert len(warn) == 1 and warn[0]["type"] == "Warning" and warn[0]["involvedObject"]["uid"] == claim["metadata"]["uid"]
    assert "attempt 1" in warn[0]["message"]
    assert api.items("pv") == []
    assert p.reconcile_once() == []  # inside the backoff window: not retried
    clock.t += 1.5
    assert p.reconcile_once()[0].startswith("failed huge")
    assert p.failures[claim["metadata"]["uid"]] == 2
    # the operator fixes the claim (a new, smaller one) and it goes through while the bad one keeps backing off
    pvc(api, "small")
    clock.t += 0.5
    assert [d for d in p.reconcile_once() if d.startswith("provisioned")]


def test_unknown_backend_and_block_mode_are_reported(api, ops):
    sc = api.get("sc", "flex")
    sc["parameters"] = {"backend": "nosuch"}
    api.put("sc", sc)
    pvc(api, "a")
    blk = api.get("pvc", "a", "apps")
    blk["metadata"]["name"] = "b"
    blk["metadata"].pop("uid")
    blk["spec"]["volumeMode"] = "Block"
    api.put("pvc", blk)
    provisioner(api, ops).reconcile_once()
    msgs = sorted(e["message"] for e in events(api, "ProvisioningFailed"))
    assert any("nosuch" in m and "local" in m for m in msgs), msgs
    assert any("raw block" in m for m in msgs), msgs
    assert api.items("pv") == []


def test_two_replicas_never_provision_twice(api, ops):
    clock = Clock()
    reps = [provisioner(api, ops, f"replica-{i}", clock) for i in (1, 2)]
    for i in range(6):
        pvc(api, f"c{i}")
    barrier = threading.Barrier(2)
    results: dict[int, list] = {0: [], 1: []}

    def go(i):
        barrier.wait()
        for _ in range(3):
            results[i].extend(reps[i].reconcile_once())

    ts = [threading.Thread(target=go, args=(i,)) for i in (0, 1)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert sum(1 for r in results.values() if r) == 1, results  # only the leader acted
    assert len(api.items("pv")) == 6
    assert len([x for x in api.log if x == ("POST", "/api/v1/persistentvolumes")]) == 6
    assert len(list(ops.backends.for_id("local", "x").list_volumes({}))) == 6
    leader = next(i for i in (0, 1) if results[i])
    follower = 1 - leader
    # the leader dies (stops renewing); after the lease duration the other replica takes over and provisions
    pvc(api, "late")
    assert reps[follower].reconcile_once() == []
    clock.t += 16
    done = reps[follower].reconcile_once()
    assert len(done) == 1 and done[0].startswith("provisioned")
    lease = api.get("lease", "tessera-flex", "kube-system")
    assert lease["spec"]["holderIdentity"] == f"replica-{follower + 1}" and lease["spec"]["leaseTransitions"] == 1
    assert reps[leader].reconcile_once() == []  # the old leader, back, finds the lease taken


def test_run_loop_provisions_on_watch_event(api, ops):
    p = provisioner(api, ops)
    p.clock = time.time
    p.elector.clock = time.time
    stop = threading.Event()
    t = threading.Thread(target=p.run, args=(stop.is_set,), kwargs={"resync": 30, "watch_timeout": 5}, daemon=True)
    t.start()
    time.sleep(0.5)
    claim = pvc(api, "watched")
    deadline = time.time() + 10
    while time.time() < deadline and api.get("pv", f"pvc-{claim['metadata']['uid']}") is None:
        time.sleep(0.05)
    assert api.get("pv", f"pvc-{claim['metadata']['uid']}") is not None, "PVC change did not trigger provisioning"
    stop.set()
    t.join(15)
    assert not t.is_alive()
    assert api.get("lease", "tessera-flex", "kube-system")["spec"]["holderIdentity"] == ""  # released on stop
