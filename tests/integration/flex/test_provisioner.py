"""The Flex provisioner against FakeApiServer (a fake: no real API server can run here) through the real
`kubernetes` client, with the real file backend behind csi.controllerops: create, idempotent re-run, delete,
backend failure with events and backoff, two replicas under leader election, and the watch-driven loop; per-node
provisioners of a node-local backend (only the volume's node provisions and deletes), access modes, and the CSI
secret parameters. The decision rules themselves first, as pure functions of literal objects."""
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
from csi import constants  # noqa: E402
from csi.config import parse_config  # noqa: E402
from csi.controllerops import ControllerOps  # noqa: E402
from csi.registry import Backends  # noqa: E402
from flex.provisioner import decide  # noqa: E402
from flex.provisioner.controller import Provisioner  # noqa: E402
from flex.provisioner.kube import Kube  # noqa: E402
from flex.provisioner.leader import LeaderElector  # noqa: E402
from tests.integration.flex.fake_apiserver import FakeApiServer, fake_secret  # noqa: E402

NODE = "node-a"
KEY = constants.TOPOLOGY_NODE_KEY
SINGLE = frozenset({"SINGLE_NODE_WRITER", "SINGLE_NODE_READER_ONLY", "SINGLE_NODE_SINGLE_WRITER",
                    "SINGLE_NODE_MULTI_WRITER"})
ALL = SINGLE | {"MULTI_NODE_READER_ONLY", "MULTI_NODE_SINGLE_WRITER", "MULTI_NODE_MULTI_WRITER"}


# ---- the rules, as pure functions ------------------------------------------------------------------------------
def _sc(name="flex", backend="local", binding="WaitForFirstConsumer", **params):
    return {"metadata": {"name": name}, "provisioner": decide.PROVISIONER_NAME, "reclaimPolicy": "Delete",
            "volumeBindingMode": binding, "parameters": {"backend": backend, **params}}


def _claim(name="c", uid="u1", sc="flex", node="", modes=("ReadWriteOnce",)):
    ann = {decide.ANN_SELECTED_NODE: node} if node else {}
    return {"metadata": {"name": name, "namespace": "apps", "uid": uid, "annotations": ann},
            "spec": {"accessModes": list(modes), "storageClassName": sc,
                     "resources": {"requests": {"storage": "1Gi"}}},
            "status": {"phase": "Pending"}}


def _released(name, vid, node=None, sc="flex", **ann):
    pv = {"metadata": {"name": name, "annotations": {decide.ANN_PROVISIONED_BY: decide.PROVISIONER_NAME, **ann}},
          "spec": {"persistentVolumeReclaimPolicy": "Delete", "storageClassName": sc,
                   "claimRef": {"namespace": "apps", "name": "c"},
                   "flexVolume": {"driver": "tessera/block", "options": {"volumeID": vid}}},
          "status": {"phase": "Released"}}
    if node:
        pv["spec"]["nodeAffinity"] = {"required": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": KEY, "operator": "In", "values": [node]}]}]}}
    return pv


def _kinds(actions):
    return [type(a).__name__ for a in actions]


def test_rule_node_local_claim_is_made_only_by_the_selected_node():
    claim = _claim(node="node-b")
    assert decide.plan([claim], [], [_sc()], "node-a", frozenset({"local"})) == []
    acts = decide.plan([claim], [], [_sc()], "node-b", frozenset({"local"}))
    assert _kinds(acts) == ["Provision"] and acts[0].request.requisite == [{KEY: "node-b"}]
    # a shared backend: whichever provisioner leads makes it
    assert _kinds(decide.plan([_claim(sc="net", node="node-b")], [], [_sc("net", "rbd")], "node-a",
                              frozenset({"local"}))) == ["Provision"]


def test_rule_immediate_node_local_claim_is_refused_on_every_node():
    sc = _sc(binding="Immediate")
    for node in ("node-a", "node-b"):
        acts = decide.plan([_claim()], [], [sc], node, frozenset({"local"}))
        assert _kinds(acts) == ["Reject"] and "WaitForFirstConsumer" in acts[0].reason and "'local'" in acts[0].reason
    # Immediate with a shared backend, or a node-local one that someone pinned to a node, goes ahead
    assert _kinds(decide.plan([_claim(sc="net")], [], [_sc("net", "rbd", "Immediate")], "node-a",
                              frozenset({"local"}))) == ["Provision"]
    assert decide.plan([_claim(node="node-b")], [], [sc], "node-a", frozenset({"local"})) == []
    assert _kinds(decide.plan([_claim(node="node-b")], [], [sc], "node-b", frozenset({"local"}))) == ["Provision"]
    # the default backend counts when the class names none
    no_backend = dict(sc, parameters={})
    assert _kinds(decide.plan([_claim()], [], [no_backend], "node-a", frozenset({"local"}), "local")) == ["Reject"]


def test_rule_node_local_pv_is_deleted_only_by_its_node():
    pvs = [_released("pv-b", "local:vol-b", node="node-b"), _released("pv-x", "local:vol-x"),
           _released("pv-net", "rbd:vol-n")]
    a = decide.plan([], pvs, [_sc()], "node-a", frozenset({"local"}))
    b = decide.plan([], pvs, [_sc()], "node-b", frozenset({"local"}))
    # node-b owns pv-b; nobody can tell where pv-x lives, so nobody deletes it; the shared one anyone may delete
    assert [a.volume_id for a in a] == ["rbd:vol-n"]
    assert sorted(a.volume_id for a in b) == ["local:vol-b", "rbd:vol-n"]
    assert decide.pv_node(pvs[0]) == "node-b" and decide.pv_node(pvs[1]) is None
    two = _released("pv-2", "local:v2", node="node-b")
    two["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"].append(
        {"matchExpressions": [{"key": KEY, "operator": "In", "values": ["node-c"]}]})
    assert decide.pv_node(two) is None


@pytest.mark.parametrize("modes,csi", [
    (["ReadWriteOnce"], "SINGLE_NODE_WRITER"), (["ReadWriteOncePod"], "SINGLE_NODE_SINGLE_WRITER"),
    (["ReadOnlyMany"], "MULTI_NODE_READER_ONLY"), (["ReadWriteMany"], "MULTI_NODE_MULTI_WRITER"),
    (["ReadWriteOnce", "ReadOnlyMany"], "MULTI_NODE_SINGLE_WRITER"),
    (["ReadOnlyMany", "ReadWriteMany"], "MULTI_NODE_MULTI_WRITER"),
    (["ReadWriteOncePod", "ReadWriteOnce"], "SINGLE_NODE_WRITER"),
])
def test_rule_access_mode_reaches_the_pv(modes, csi):
    req = decide.volume_request(_claim(modes=modes), _sc("net", "san"), "n", {"san": ALL})
    assert req.publish_mode == csi
    pv = decide.build_pv(_claim(modes=modes), _sc("net", "san"), req, "san:v", 1, {}, [])
    assert pv["spec"]["flexVolume"]["options"]["accessMode"] == csi and pv["spec"]["accessModes"] == modes


def test_rule_unsupported_access_modes_are_refused():
    modes = {"local": SINGLE, "rbd": SINGLE | {"MULTI_NODE_READER_ONLY"}}
    for m in (["ReadWriteMany"], ["ReadOnlyMany"]):
        acts = decide.plan([_claim(node="n", modes=m)], [], [_sc()], "n", frozenset({"local"}), access_modes=modes)
        assert _kinds(acts) == ["Reject"] and m[0] in acts[0].reason and "'local'" in acts[0].reason, acts
    acts = decide.plan([_claim(node="n", modes=["ReadOnlyMany"])], [], [_sc(backend="rbd")], "n", access_modes=modes)
    assert _kinds(acts) == ["Provision"]
    acts = decide.plan([_claim(node="n", modes=["ReadWriteOnce", "ReadOnlyMany"])], [], [_sc(backend="rbd")], "n",
                       access_modes=modes)
    assert _kinds(acts) == ["Reject"] and "MULTI_NODE_SINGLE_WRITER" in acts[0].reason


SECRET_PARAMS = {"csi.storage.k8s.io/provisioner-secret-name": "ceph-${pvc.name}",
                 "csi.storage.k8s.io/provisioner-secret-namespace": "${pvc.namespace}",
                 "csi.storage.k8s.io/node-stage-secret-name": "ceph-node",
                 "csi.storage.k8s.io/node-stage-secret-namespace": "storage",
                 "csi.storage.k8s.io/controller-expand-secret-name": "ceph-admin",
                 "csi.storage.k8s.io/controller-expand-secret-namespace": "storage"}


def test_rule_secret_parameters():
    sc = _sc("net", "rbd", pool="rbd", **SECRET_PARAMS)
    req = decide.volume_request(_claim(name="data"), sc, "n")
    assert req.parameters == {"backend": "rbd", "pool": "rbd"}  # no csi.storage.k8s.io/ key reaches the backend
    assert req.provisioner_secret == decide.SecretRef("apps", "ceph-data")
    assert req.stage_secret == decide.SecretRef("storage", "ceph-node")
    pv = decide.build_pv(_claim(name="data"), sc, req, "rbd:v", 1, {}, [])
    assert pv["spec"]["flexVolume"]["secretRef"] == {"name": "ceph-node", "namespace": "storage"}
    ann = pv["metadata"]["annotations"]
    assert ann[decide.ANN_DELETION_SECRET_NAME] == "ceph-data" and ann[decide.ANN_DELETION_SECRET_NAMESPACE] == "apps"
    # deletion: from the annotations, else (older PVs) from the class
    assert decide.deletion_secret(pv, {}) == decide.SecretRef("apps", "ceph-data")
    old = _released("pvc-u1", "rbd:v", sc="net")
    assert decide.deletion_secret(old, {"net": sc}) == decide.SecretRef("apps", "ceph-c")
    assert decide.deletion_secret(old, {}) is None
    # node-publish alone is the Flex secretRef too; both, differing, cannot be one secretRef
    pub = {"csi.storage.k8s.io/node-publish-secret-name": "p", "csi.storage.k8s.io/node-publish-secret-namespace": "s"}
    assert decide.volume_request(_claim(), _sc(**pub), "n").stage_secret == decide.SecretRef("s", "p")
    both = dict(SECRET_PARAMS, **pub)
    with pytest.raises(decide.Unprovisionable, match="one secretRef"):
        decide.volume_request(_claim(), _sc(**both), "n")


@pytest.mark.parametrize("params,needle", [
    ({"csi.storage.k8s.io/provisioner-secret-name": "x"}, "must be set together"),
    ({"csi.storage.k8s.io/provisioner-secret-name": "${pvc.annotations['a']}",
      "csi.storage.k8s.io/provisioner-secret-namespace": "ns"}, "is not supported here"),
    ({"csi.storage.k8s.io/node-stage-secret-name": "x",
      "csi.storage.k8s.io/node-stage-secret-namespace": "${pvc.name}"}, "is not supported here"),
    ({"csi.storage.k8s.io/provisioner-secret-name": "Bad_Name",
      "csi.storage.k8s.io/provisioner-secret-namespace": "ns"}, "not a valid Secret name"),
    ({"csi.storage.k8s.io/frobnicate": "1"}, "reserved"),
])
def test_rule_bad_secret_parameters_are_refused(params, needle):
    acts = decide.plan([_claim(node="n")], [], [_sc(backend="rbd", **params)], "n")
    assert _kinds(acts) == ["Reject"] and needle in acts[0].reason, acts


def test_rule_secret_objects():
    ref = decide.SecretRef("storage", "ceph-node")
    ok = fake_secret("storage", "ceph-node", {"userID": "u", "userKey": "k3y"}, "tessera/block")
    decide.check_stage_secret(ok, ref)
    assert decide.secret_data(ok, ref) == {"userID": "u", "userKey": "k3y"}
    with pytest.raises(decide.Unprovisionable, match="type: tessera/block") as e:
        decide.check_stage_secret(dict(ok, type="Opaque"), ref)
    assert "k3y" not in str(e.value)
    with pytest.raises(decide.Unprovisionable, match="does not exist"):
        decide.check_stage_secret(None, ref)
    with pytest.raises(decide.Unprovisionable, match="'userKey' is not UTF-8") as e:
        decide.secret_data({"data": {"userKey": "//79"}}, ref)


# ---- against the fake API server -------------------------------------------------------------------------------


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
                   "volumeBindingMode": "WaitForFirstConsumer",
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


def provisioner(api, ops, identity="replica-1", clock=None, node=NODE, lease="tessera-flex") -> Provisioner:
    clock = clock or Clock()
    kube = kube_for(api)
    return Provisioner(kube, ops, LeaderElector(kube, "kube-system", lease, identity, 15, clock), node,
                       clock=clock)


def pvc(api, name, size="64Mi", sc="flex", node=NODE, modes=("ReadWriteOnce",)) -> dict:
    """A Pending claim; `node`: the scheduler's selected-node annotation (None: not scheduled yet)."""
    ann = {decide.ANN_SELECTED_NODE: node} if node else {}
    return api.put("pvc", {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                           "metadata": {"name": name, "namespace": "apps", "annotations": ann},
                           "spec": {"accessModes": list(modes), "storageClassName": sc,
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


# ---- per-node provisioners of a node-local backend -------------------------------------------------------------
def _node_ops(tmp_path, node):
    """One node's ControllerOps: its own disk (files directory) and state, as each node of a DaemonSet has."""
    cfg = parse_config({"stateDir": str(tmp_path / node / "state"),
                        "backends": {"local": {"type": "file", "directory": str(tmp_path / node / "files")}}})
    return ControllerOps(Backends(cfg, node))


def _volume_files(tmp_path, node):
    d = tmp_path / node / "files" / "volumes"
    return sorted(p.name for p in d.iterdir() if p.suffix == ".img") if d.exists() else []


def test_two_nodes_only_the_owner_provisions_and_deletes(api, tmp_path):
    """The DaemonSet layout: one provisioner per node, each leading its own Lease, one node-local backend."""
    a = provisioner(api, _node_ops(tmp_path, "node-a"), "pod-a", node="node-a", lease="tessera-flex-node-a")
    b = provisioner(api, _node_ops(tmp_path, "node-b"), "pod-b", node="node-b", lease="tessera-flex-node-b")
    claim = pvc(api, "data", node="node-b")
    name = f"pvc-{claim['metadata']['uid']}"
    assert a.reconcile_once() == []
    assert b.reconcile_once() == [f"provisioned {name}"]
    assert a.reconcile_once() == [] and b.reconcile_once() == []
    assert _volume_files(tmp_path, "node-a") == [] and len(_volume_files(tmp_path, "node-b")) == 1
    pv = api.get("pv", name)
    assert decide.pv_node(pv) == "node-b"
    # the claim is deleted: node-a's provisioner must not "delete" (the file backend would find nothing on node-a,
    # call that success, and drop the PV: node-b's file would leak)
    pv["status"] = {"phase": "Released"}
    api.put("pv", pv)
    assert a.reconcile_once() == []
    assert api.get("pv", name) is not None and len(_volume_files(tmp_path, "node-b")) == 1
    assert b.reconcile_once() == [f"deleted {name}"]
    assert api.get("pv", name) is None and _volume_files(tmp_path, "node-b") == []


def test_two_nodes_refuse_an_immediate_node_local_claim(api, tmp_path):
    sc = api.get("sc", "flex")
    sc["metadata"] = {"name": "flex-now"}
    sc["volumeBindingMode"] = "Immediate"
    api.put("sc", sc)
    a = provisioner(api, _node_ops(tmp_path, "node-a"), "pod-a", node="node-a", lease="tessera-flex-node-a")
    b = provisioner(api, _node_ops(tmp_path, "node-b"), "pod-b", node="node-b", lease="tessera-flex-node-b")
    claim = pvc(api, "now", sc="flex-now", node=None)
    for p in (a, b):
        done = p.reconcile_once()
        assert len(done) == 1 and done[0].startswith("failed now") and "WaitForFirstConsumer" in done[0]
    assert api.items("pv") == []
    assert _volume_files(tmp_path, "node-a") == [] and _volume_files(tmp_path, "node-b") == []
    warn = events(api, "ProvisioningFailed")
    assert len(warn) == 1 and warn[0]["involvedObject"]["uid"] == claim["metadata"]["uid"]
    assert "volumeBindingMode: WaitForFirstConsumer" in warn[0]["message"]


def test_access_mode_in_the_pv_and_unsupported_modes_refused(api, ops):
    rwop = pvc(api, "one-pod", modes=("ReadWriteOncePod",))
    rwx = pvc(api, "shared", modes=("ReadWriteMany",))
    done = provisioner(api, ops).reconcile_once()
    assert f"provisioned pvc-{rwop['metadata']['uid']}" in done
    pv = api.get("pv", f"pvc-{rwop['metadata']['uid']}")
    assert pv["spec"]["flexVolume"]["options"]["accessMode"] == "SINGLE_NODE_SINGLE_WRITER"
    assert pv["spec"]["accessModes"] == ["ReadWriteOncePod"]
    assert api.get("pv", f"pvc-{rwx['metadata']['uid']}") is None
    warn = events(api, "ProvisioningFailed")
    assert len(warn) == 1 and warn[0]["involvedObject"]["name"] == "shared"
    assert "ReadWriteMany" in warn[0]["message"] and "'local'" in warn[0]["message"]
    assert len(list(ops.backends.for_id("local", "x").list_volumes({}))) == 1


# ---- secrets ---------------------------------------------------------------------------------------------------
PROV_KEY, NODE_KEY = "AQBprovisionerKEY0000==", "AQBnodestageKEY00000=="


class SpyOps(ControllerOps):
    """The real ControllerOps, recording what the provisioner hands to CreateVolume/DeleteVolume."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.calls: list[tuple] = []

    def create_volume(self, name, required, limit, caps, params, secrets, *rest):
        self.calls.append(("create", dict(params), dict(secrets)))
        return super().create_volume(name, required, limit, caps, params, secrets, *rest)

    def delete_volume(self, volume_id, secrets):
        self.calls.append(("delete", volume_id, dict(secrets)))
        return super().delete_volume(volume_id, secrets)


@pytest.fixture
def spy(tmp_path):
    cfg = parse_config({"stateDir": str(tmp_path / "state"),
                        "backends": {"local": {"type": "file", "directory": str(tmp_path / "files")}}})
    return SpyOps(Backends(cfg, NODE))


def _secret_class(api, **extra):
    sc = api.get("sc", "flex")
    sc["metadata"] = {"name": "flex-secret"}
    sc["parameters"] = {"backend": "local", **SECRET_PARAMS, **extra}
    api.put("sc", sc)


def _no_secret_values(api, caplog):
    import json
    seen = caplog.text + json.dumps(api.items("event")) + json.dumps(api.items("pv"))
    assert PROV_KEY not in seen and NODE_KEY not in seen


def test_secrets_reach_create_and_delete_and_the_pv_names_the_node_secret(api, spy, caplog):
    caplog.set_level("DEBUG")
    _secret_class(api)
    api.put("secret", fake_secret("apps", "ceph-data", {"userID": "admin", "userKey": PROV_KEY}))
    api.put("secret", fake_secret("storage", "ceph-node", {"userID": "node", "userKey": NODE_KEY}, "tessera/block"))
    claim = pvc(api, "data", sc="flex-secret")
    name = f"pvc-{claim['metadata']['uid']}"
    p = provisioner(api, spy)
    assert p.reconcile_once() == [f"provisioned {name}"]
    assert spy.calls == [("create", {"backend": "local"}, {"userID": "admin", "userKey": PROV_KEY})]
    pv = api.get("pv", name)
    assert pv["spec"]["flexVolume"]["secretRef"] == {"name": "ceph-node", "namespace": "storage"}
    assert pv["metadata"]["annotations"][decide.ANN_DELETION_SECRET_NAME] == "ceph-data"
    # the class changes its secret afterwards: deletion still uses the one the volume was made with
    _secret_class(api, **{"csi.storage.k8s.io/provisioner-secret-name": "other"})
    pv["status"] = {"phase": "Released"}
    api.put("pv", pv)
    assert p.reconcile_once() == [f"deleted {name}"]
    assert spy.calls[-1] == ("delete", pv["spec"]["flexVolume"]["options"]["volumeID"],
                             {"userID": "admin", "userKey": PROV_KEY})
    _no_secret_values(api, caplog)


def test_secret_problems_are_events_and_nothing_is_created(api, spy, caplog):
    caplog.set_level("DEBUG")
    _secret_class(api)
    p = provisioner(api, spy)
    # the provisioner secret is missing
    pvc(api, "data", sc="flex-secret")
    done = p.reconcile_once()
    assert len(done) == 1 and "Secret apps/ceph-data" in done[0] and "does not exist" in done[0]
    # it exists, but the node secret has the wrong type: kubelet would never hand it to the shim
    api.put("secret", fake_secret("apps", "ceph-data", {"userID": "admin", "userKey": PROV_KEY}))
    api.put("secret", fake_secret("storage", "ceph-node", {"userKey": NODE_KEY}))
    p.clock.t += 2
    done = p.reconcile_once()
    assert len(done) == 1 and "type: tessera/block" in done[0], done
    # the API refuses to show a Secret (RBAC)
    api.fail_next[("GET", "secret")] = 403
    p.clock.t += 4
    done = p.reconcile_once()
    assert len(done) == 1 and "HTTP 403" in done[0] and "get` on secrets" in done[0], done
    assert spy.calls == [] and api.items("pv") == []
    assert len(events(api, "ProvisioningFailed")) == 1  # one event per claim and reason, as before
    _no_secret_values(api, caplog)
