"""Which node a Flex `attach` grants access to, without a target: kube-controller-manager names only the node, the
iscsi backend derives the initiator IQN from `initiatorNameTemplate`, the device carries the granted node ID to the
node, and the node refuses (before any login) when its own IQN differs. The real target is in
tests/integration/flex/test_shim_file.py (tgtd)."""
from __future__ import annotations

import json
import os
import sys

import pytest
import yaml

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from backends.base import ALL_MODES, Runtime  # noqa: E402
from backends.errors import FailedPrecondition, InvalidArgument  # noqa: E402
from backends.iscsi import IscsiBackend, IscsiOptions  # noqa: E402
from csi.ids import parse_node_id  # noqa: E402
from flex import protocol as P  # noqa: E402
from flex import shim  # noqa: E402

TEMPLATE = "iqn.2026-01.com.example:{node}"


def _opts(**kw) -> dict:
    o = {"portals": ["127.0.0.1:3260"], "iqnPrefix": "iqn.2026-01.com.example.target", "targetDriver": "tgt",
         "backingStore": {"file": {"directory": "/nonexistent"}}}
    o.update(kw)
    return o


def _backend(tmp_path, **kw) -> IscsiBackend:
    rt = Runtime("tessera.csi.dev", "ctl", str(tmp_path), "topology.tessera.csi.dev/node")
    return IscsiBackend("san", IscsiOptions.model_validate(_opts(**kw)), rt)


@pytest.mark.parametrize("bad", ["iqn.2026-01.com.example:fixed", "iqn.2026-01.com.example:{node}-{node}",
                                 "iqn.2026-01.com.example:{host}", "iqn.2026-01.com.example:{node!r}",
                                 "iqn.2026-01.com.example:{node:>9}", "not-an-iqn-{node}", "iqn.{node"])
def test_template_is_validated(bad):
    with pytest.raises(ValueError, match="initiatorNameTemplate"):
        IscsiOptions.model_validate(_opts(initiatorNameTemplate=bad))


def test_node_attributes_for_name(tmp_path):
    b = _backend(tmp_path, initiatorNameTemplate=TEMPLATE)
    assert b.node_attributes_for_name("worker-1.example") == {"iqn": "iqn.2026-01.com.example:worker-1.example"}
    with pytest.raises(InvalidArgument, match="223 bytes"):
        b.node_attributes_for_name("n" * 240)
    plain = _backend(tmp_path)
    with pytest.raises(FailedPrecondition) as e:
        plain.node_attributes_for_name("worker-1")
    msg = str(e.value)
    assert "initiatorNameTemplate" in msg and "worker-1" in msg and "/etc/iscsi/initiatorname.iscsi" in msg


def test_flex_node_id_carries_the_derived_iqn(tmp_path):
    nid = shim.Shim.flex_node_id(_backend(tmp_path, initiatorNameTemplate=TEMPLATE), "worker-1")
    ref = parse_node_id(nid)
    assert ref.name == "worker-1" and ref.attributes == {"iqn": "iqn.2026-01.com.example:worker-1"}

    class NoAttrs:  # a backend that needs nothing per node (the Backend default)
        def node_attributes_for_name(self, name):
            return {}
    assert shim.Shim.flex_node_id(NoAttrs(), "worker-1") == "worker-1"


def test_device_carries_the_granted_node():
    pc = {"lun": "1"}
    dev = P.encode_device(pc, "worker-1?iqn=iqn.2026-01.com.example%3Aworker-1")
    assert P.decode_attach(dev) == (pc, "worker-1?iqn=iqn.2026-01.com.example%3Aworker-1")
    assert P.decode_device(dev) == pc  # NodeStage never sees the node key
    assert P.decode_attach(P.encode_device(pc)) == (pc, "")
    assert P.encode_device({}, "n1") != "" and P.decode_attach(P.encode_device({}, "n1")) == ({}, "n1")
    assert P.decode_attach("/dev/sdb") == ({}, "")


def _node(tmp_path, monkeypatch, **backend_opts) -> shim.Shim:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"stateDir": str(tmp_path / "state"),
                                   "backends": {"san": {"type": "iscsi", **_opts(**backend_opts)}}}))
    monkeypatch.setenv("TESSERA_CONFIG", str(cfg))
    monkeypatch.setenv("TESSERA_NODE_NAME", "worker-1")
    return shim.Shim()


def test_node_refuses_a_device_attached_for_another_iqn(tmp_path, monkeypatch):
    s = _node(tmp_path, monkeypatch, initiatorNameTemplate=TEMPLATE, initiatorName="iqn.1993-08.org.debian:01:abc")
    granted = shim.Shim.flex_node_id(s.backends.for_id("san", "x"), "worker-1")
    dev = P.encode_device({"lun": "1"}, granted)
    with pytest.raises(FailedPrecondition) as e:
        s.check_granted_node("san:vol-1", dev)
    msg = str(e.value)
    assert "iqn=iqn.2026-01.com.example:worker-1" in msg and "iqn=iqn.1993-08.org.debian:01:abc" in msg
    assert "InitiatorName=iqn.2026-01.com.example:worker-1" in msg
    # through the command: waitforattach fails with that message as kubelet shows it
    opts = json.dumps({"volumeID": "san:vol-1"})
    r = shim.run(["waitforattach", dev, opts], s)
    assert r.status == P.FAILURE and "would be refused" in r.message


def test_node_accepts_its_own_iqn_and_derives_the_chap_secret(tmp_path, monkeypatch):
    """attach's device never carries the CHAP secret (it lands in the Node object's status); the node derives the
    same per-volume credentials from its copy of the CHAP key."""
    key = tmp_path / "chap.key"
    key.write_bytes(os.urandom(32))
    s = _node(tmp_path, monkeypatch, initiatorNameTemplate=TEMPLATE,
              initiatorName="iqn.2026-01.com.example:worker-1", chapKeyFile=str(key))
    backend = s.backends.for_id("san", "x")
    dev = P.encode_device({"lun": "1"}, shim.Shim.flex_node_id(backend, "worker-1"))
    chap = backend.chap_for("vol-1")
    assert s.check_granted_node("san:vol-1", dev) == {"lun": "1", "chapUser": chap.user, "chapPassword": chap.password}
    r = shim.run(["waitforattach", dev, json.dumps({"volumeID": "san:vol-1"})], s)
    assert r.status == P.SUCCESS and r.device == dev and chap.password not in dev


def test_node_without_the_chap_key_says_what_to_do(tmp_path, monkeypatch):
    s = _node(tmp_path, monkeypatch, initiatorNameTemplate=TEMPLATE,
              initiatorName="iqn.2026-01.com.example:worker-1", chapKeyFile=str(tmp_path / "missing.key"))
    dev = P.encode_device({"lun": "1"}, shim.Shim.flex_node_id(s.backends.for_id("san", "x"), "worker-1"))
    with pytest.raises(FailedPrecondition, match="chapKeyFile"):
        s.check_granted_node("san:vol-1", dev)
    assert not (tmp_path / "missing.key").exists()  # a node never invents a key of its own


def test_access_mode_option_is_checked():
    assert P.ACCESS_MODES == ALL_MODES
    o = P.parse_options(json.dumps({"volumeID": "a:b", "accessMode": "MULTI_NODE_READER_ONLY"}))
    assert o.access_mode == "MULTI_NODE_READER_ONLY" and "accessMode" not in o.context
    with pytest.raises(P.UsageError, match="not a CSI access mode"):
        P.parse_options(json.dumps({"volumeID": "a:b", "accessMode": "ReadWriteMany"}))


def test_log_location_documented_as_coded(monkeypatch):
    """The module doc names the log files the code opens (they disagreed once)."""
    assert "/var/log/tessera-flex.log" in shim.__doc__ and shim.FALLBACK_LOG in shim.__doc__
    assert "shim.log" not in shim.__doc__
