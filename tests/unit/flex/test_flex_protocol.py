"""The FlexVolume protocol layer and the provisioner's decisions, as pure functions (no mounts, no cluster)."""
from __future__ import annotations

import base64
import json
import os
import sys

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from flex import protocol as P  # noqa: E402
from flex import shim  # noqa: E402
from flex.provisioner import decide  # noqa: E402


def test_options_split_into_secrets_pod_context():
    raw = json.dumps({"kubernetes.io/fsType": "xfs", "kubernetes.io/readwrite": "ro",
                      "kubernetes.io/pvOrVolumeName": "pv1", "kubernetes.io/mounterArgs.FsGroup": "2000",
                      "kubernetes.io/secret/user": base64.b64encode(b"admin").decode(),
                      "kubernetes.io/pod.name": "web-0", "kubernetes.io/pod.namespace": "apps",
                      "kubernetes.io/pod.uid": "u1", "kubernetes.io/serviceAccount.name": "default",
                      "volumeID": "rbd:vol-1", "pool": "rbd", "mountOptions": "noatime, discard"})
    o = P.parse_options(raw)
    assert o.volume_id == "rbd:vol-1" and o.pv_name == "pv1" and o.fs_type == "xfs" and o.readonly
    assert o.fs_group == 2000 and o.secrets == {"user": "admin"}
    assert o.pod == {"kubernetes.io/pod.name": "web-0", "kubernetes.io/pod.namespace": "apps",
                     "kubernetes.io/pod.uid": "u1", "kubernetes.io/serviceAccount.name": "default"}
    assert o.context == {"pool": "rbd"} and o.mount_flags == ("noatime", "discard")
    assert o.access_mode == "SINGLE_NODE_WRITER"


@pytest.mark.parametrize("raw,needle", [
    ("not json", "not JSON"), ('["a"]', "object of strings"), ('{"volumeID": 1}', "object of strings"),
    ('{}', "volumeID"), ('{"volumeID":"a:b","kubernetes.io/readwrite":"rx"}', "'rw' or 'ro'"),
    ('{"volumeID":"a:b","kubernetes.io/mounterArgs.FsGroup":"x"}', "integer group"),
    ('{"volumeID":"a:b","kubernetes.io/secret/k":"!!"}', "base64"),
])
def test_bad_options(raw, needle):
    with pytest.raises(P.UsageError, match=needle):
        P.parse_options(raw)


def test_reply_json_and_exit_code_agree():
    assert P.success().exit_code == 0 and P.failure("x").exit_code == 1 and P.not_supported().exit_code == 1
    assert json.loads(P.success(device="/dev/x").to_json()) == {"status": "Success", "device": "/dev/x"}
    assert json.loads(P.success(attached=False).to_json()) == {"status": "Success", "attached": False}
    assert json.loads(P.success(volume_new_size=5).to_json()) == {"status": "Success", "volumeNewSize": 5}
    caps = P.capabilities(False)
    assert set(caps) == {"attach", "selinuxRelabel", "fsGroup", "requiresFSResize", "supportsMetrics"}


def test_json_found_by_shape_in_either_order():
    js = '{"volumeID":"a:b"}'
    assert P.split_json([js, "node1"], 1, "isattached", "u") == (js, ["node1"])
    assert P.split_json(["node1", js], 1, "isattached", "u") == (js, ["node1"])
    with pytest.raises(P.UsageError, match="isattached expects"):
        P.split_json(["node1"], 1, "isattached", "isattached <json options> <node name>")


def test_device_carries_publish_context():
    pc = {"target": "iqn.2026-01.dev.tessera:x", "lun": "1"}
    dev = P.encode_device(pc)
    assert dev.startswith(P.DEVICE_PREFIX) and P.decode_device(dev) == pc
    assert P.encode_device({}) == "" and P.decode_device("/dev/sdb") == {}
    with pytest.raises(P.UsageError):
        P.decode_device(P.DEVICE_PREFIX + "@@@")


def test_unknown_and_getvolumename_not_supported():
    assert shim.run(["getvolumename", "{}"]).status == P.NOT_SUPPORTED
    assert shim.run(["nonsense"]).status == P.NOT_SUPPORTED
    assert shim.run([]).status == P.FAILURE


def test_controller_attach_types_match_backends(tmp_path):
    """init decides `attach` from type names alone; the backends that load here must agree with that list."""
    from backends.base import Runtime
    from backends.file import FileBackend
    rt = Runtime("tessera.csi.dev", "n", str(tmp_path), "k")
    fb = FileBackend("local", FileBackend.options_model.model_validate({"directory": str(tmp_path)}), rt)
    assert fb.features().publish_needed is ("file" in shim.CONTROLLER_ATTACH_TYPES)
    assert shim.needs_attach({"backends": {"a": {"type": "iscsi"}}})
    assert not shim.needs_attach({"backends": {"a": {"type": "file"}, "b": {"type": "lvm"}, "c": {"type": "rbd"}}})


# ---- provisioner decisions ------------------------------------------------------------------------------------
SC = {"metadata": {"name": "flex"}, "provisioner": decide.PROVISIONER_NAME, "reclaimPolicy": "Delete",
      "parameters": {"backend": "local", "fsType": "xfs"}}


def _pvc(name="c", uid="u1", phase="Pending", sc="flex", **spec):
    s = {"accessModes": ["ReadWriteOnce"], "storageClassName": sc, "resources": {"requests": {"storage": "1Gi"}}}
    s.update(spec)
    return {"metadata": {"name": name, "namespace": "ns", "uid": uid, "annotations": {}}, "spec": s,
            "status": {"phase": phase}}


@pytest.mark.parametrize("q,n", [("1Gi", 1 << 30), ("500M", 500 * 10**6), ("1.5Gi", 3 << 29), ("1e3", 1000),
                                 ("10", 10), ("0.1k", 100), (2048, 2048)])
def test_quantities(q, n):
    assert decide.parse_quantity(q) == n


def test_quantity_rejects_garbage():
    with pytest.raises(decide.Unprovisionable, match="quantity"):
        decide.parse_quantity("1GB")


def test_plan_picks_only_our_pending_unbound_claims():
    other_sc = {"metadata": {"name": "o"}, "provisioner": "x"}
    pvcs = [_pvc("mine"), _pvc("bound", "u2", phase="Bound"), _pvc("named", "u3", volumeName="pv"),
            _pvc("other", "u4", sc="o"), _pvc("nosc", "u5", sc="missing")]
    acts = decide.plan(pvcs, [], [SC, other_sc], "n1")
    assert [type(a).__name__ for a in acts] == ["Provision"]
    req = acts[0].request
    assert req.name == "pvc-u1" and req.required_bytes == 1 << 30 and req.fs_type == "xfs"
    assert req.parameters == {"backend": "local"} and req.access_modes == ["SINGLE_NODE_WRITER"]
    # the PV exists already: nothing to do
    assert decide.plan(pvcs, [{"metadata": {"name": "pvc-u1"}}], [SC], "n1") == []


def test_plan_waits_for_first_consumer_and_respects_node_locality():
    sc = dict(SC, volumeBindingMode="WaitForFirstConsumer")
    c = _pvc()
    assert decide.plan([c], [], [sc], "n1") == []
    c["metadata"]["annotations"][decide.ANN_SELECTED_NODE] = "n2"
    assert decide.plan([c], [], [sc], "n1", frozenset({"local"})) == []  # the provisioner on n2 does it
    acts = decide.plan([c], [], [sc], "n2", frozenset({"local"}))
    assert acts[0].request.requisite == [{"topology.tessera.csi.dev/node": "n2"}]


def test_plan_rejects_block_and_bad_fs():
    acts = decide.plan([_pvc(volumeMode="Block")], [], [SC], "n1")
    assert isinstance(acts[0], decide.Reject) and "raw block" in acts[0].reason
    bad = dict(SC, parameters={"fsType": "btrfs"})
    acts = decide.plan([_pvc()], [], [bad], "n1")
    assert isinstance(acts[0], decide.Reject) and "btrfs" in acts[0].reason


def test_plan_deletes_only_released_delete_pvs_of_ours():
    def pv(name, phase, policy="Delete", by=decide.PROVISIONER_NAME):
        return {"metadata": {"name": name, "annotations": {decide.ANN_PROVISIONED_BY: by}},
                "spec": {"persistentVolumeReclaimPolicy": policy,
                         "flexVolume": {"driver": "tessera/block", "options": {"volumeID": f"local:{name}"}}},
                "status": {"phase": phase}}
    pvs = [pv("a", "Released"), pv("b", "Bound"), pv("c", "Released", "Retain"), pv("d", "Released", by="x")]
    acts = decide.plan([], pvs, [SC], "n1")
    assert [(type(a).__name__, a.volume_id) for a in acts] == [("Delete", "local:a")]


def test_build_pv():
    req = decide.volume_request(_pvc(), SC, "n1")
    pv = decide.build_pv(_pvc(), SC, req, "local:vol-1", 1 << 30, {"path": "/x"}, [{"k": "n1"}])
    assert pv["spec"]["flexVolume"] == {"driver": "tessera/block", "fsType": "xfs",
                                        "options": {"volumeID": "local:vol-1", "path": "/x",
                                                    "accessMode": "SINGLE_NODE_WRITER"}}
    assert pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"] == [
        {"key": "k", "operator": "In", "values": ["n1"]}]
    assert pv["metadata"]["annotations"][decide.ANN_PROVISIONED_BY] == decide.PROVISIONER_NAME


def test_backoff():
    assert [decide.backoff_delay(n) for n in range(5)] == [0, 1, 2, 4, 8]
    assert decide.backoff_delay(50) == 300
