"""Mutable parameters (csi/mutable.py over Backend.mutable_parameters) and the iSCSI publication record that
published_node_ids comes from: checks that need no storage (an RbdBackend is only constructed, never connected)."""
from __future__ import annotations

import pytest

from backends.base import Runtime
from backends.errors import InvalidArgument
from backends.file import FileBackend, FileOptions
from backends.iscsi import Publication
from csi import mutable
from csi.ids import NodeRef, parse_node_id

pytest.importorskip("rbd", reason="MISSING: python3-rbd")
from backends.rbd import RbdBackend, RbdOptions  # noqa: E402

RT = Runtime("tessera.csi.dev", "n", "/tmp/x", "t")


def rbd_backend() -> RbdBackend:
    return RbdBackend("ceph", RbdOptions(monitors=["127.0.0.1:6789"], pool="kube"), RT)


def test_values_are_normalized():
    assert mutable.check(rbd_backend(), {"rbd_qos_iops_limit": "0100", "rbd_qos_bps_burst_seconds": "3"}) == \
        {"rbd_qos_iops_limit": "100", "rbd_qos_bps_burst_seconds": "3"}
    assert mutable.check(rbd_backend(), {}) == {}


@pytest.mark.parametrize("wanted, fragments", [
    ({"rbd_qos_iops_limt": "1"}, ["rbd_qos_iops_limt", "known: rbd_qos_bps_burst"]),
    ({"rbd_qos_iops_limit": "-1"}, ["rbd_qos_iops_limit", "non-negative"]),
    ({"rbd_qos_iops_limit": "1e3"}, ["non-negative"]),
    ({"rbd_qos_iops_limit": "\u0663"}, ["non-negative"]),  # an Arabic-Indic digit: isdigit() alone would pass it
    ({"rbd_qos_iops_limit": str(1 << 63)}, ["2^63-1"]),
    ({"rbd_qos_write_iops_burst_seconds": "0"}, ["at least 1"]),
    ({"x": "1", "rbd_qos_bps_limit": "z"}, ["x", "rbd_qos_bps_limit"]),  # every fault at once
])
def test_refusals_name_every_fault(wanted, fragments):
    with pytest.raises(InvalidArgument) as info:
        mutable.check(rbd_backend(), wanted)
    for f in fragments:
        assert f in str(info.value)
    assert "nothing was changed" in str(info.value)


def test_backend_without_mutable_parameters(tmp_path):
    from backends.iscsi import IscsiBackend, IscsiOptions
    b = IscsiBackend("san", IscsiOptions(portals=["127.0.0.1:3260"], iqnPrefix="iqn.2026-11.dev.tessera.unit",
                                         backingStore={"file": {"directory": str(tmp_path / "store")}}),
                     Runtime("tessera.csi.dev", "n1", str(tmp_path), "t"))
    with pytest.raises(InvalidArgument, match="backend 'san' has no mutable parameters"):
        mutable.check(b, {"rbd_qos_iops_limit": "1"})
    assert mutable.check(b, {}) == {}


def test_node_local_backends_take_io_max_keys_only(tmp_path):
    b = FileBackend("local", FileOptions(directory=str(tmp_path)), RT)
    assert mutable.check(b, {"io_max_wiops": "0050", "io_max_rbps": "0"}) == {"io_max_wiops": "50", "io_max_rbps": "0"}
    with pytest.raises(InvalidArgument) as info:
        mutable.check(b, {"rbd_qos_iops_limit": "1", "io_max_riops": "-3"})
    assert "rbd_qos_iops_limit" in str(info.value) and "io_max_riops" in str(info.value)
    assert "known: io_max_rbps, io_max_riops, io_max_wbps, io_max_wiops" in str(info.value)


@pytest.mark.parametrize("node", [
    NodeRef("node-a", {"iqn": "iqn.2026-01.com.example:node-a"}),
    NodeRef("node-b", {"iqn": "iqn.2026-01.com.example:node-b", "zone": "z1"}),
])
def test_publication_gives_back_the_node_id(node):
    pub = Publication("rw", "SINGLE_NODE_WRITER", "mount", node.name, node.attributes["iqn"], node.encode())
    again = Publication.parse(pub.encode())
    assert again.csi_node_id() == node.encode()
    assert parse_node_id(again.csi_node_id()) == node
    assert (again.access, again.mode, again.access_type, again.node) == ("rw", "SINGLE_NODE_WRITER", "mount", node.name)


def test_publication_record_of_the_usual_node_is_unchanged():
    """Records written before node IDs were kept (five fields) still give the node ID an iSCSI node reports."""
    old = "ro/MULTI_NODE_READER_ONLY/block/node-a/iqn.2026-01.com.example:node-a"
    node = NodeRef("node-a", {"iqn": "iqn.2026-01.com.example:node-a"})
    assert Publication.parse(old).csi_node_id() == node.encode()
    assert Publication("ro", "MULTI_NODE_READER_ONLY", "block", "node-a", "iqn.2026-01.com.example:node-a",
                       node.encode()).encode() == old
