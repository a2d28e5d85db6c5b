"""The SnapshotMetadata service's claims and refusals (csi/snapshot_metadata.py) on the real file backend in a
temporary directory: a stream holds a shared claim on its snapshots for as long as it is open — a DeleteSnapshot
meanwhile is ABORTED, other readers are not — and gives it back when the caller goes away."""
from __future__ import annotations

import pytest

from backends import errors as e
from backends.base import CapabilitySpec
from backends.file import FileBackend
from csi.config import parse_config
from csi.controllerops import ControllerOps
from csi.registry import Backends
from csi.snapshot_metadata import SnapshotMetadataOps, supported

MIB = 1 << 20
CAP = [CapabilitySpec("block", "SINGLE_NODE_WRITER")]


class NoTrackingFile(FileBackend):
    """A fake: the file backend with its changed-block tracking switched off, standing in for a backend that has
    none (LVM, iSCSI today), which cannot be built on this host without a volume group or a target."""

    def metadata_block_size(self):  # type: ignore[no-untyped-def]
        return None


@pytest.fixture
def world(tmp_path):
    cfg = parse_config({"stateDir": str(tmp_path / "state"), "defaultBackend": "local",
                        "backends": {n: {"type": "file", "directory": str(tmp_path / n)} for n in ("local", "other", "plain")}})
    backends = Backends(cfg, "node-1")
    b = backends._by_name["plain"]
    backends._by_name["plain"] = NoTrackingFile("plain", b.options, b.runtime)
    ops = ControllerOps(backends)
    vid, _ = ops.create_volume("vol", 8 * MIB, 0, CAP, {}, {})
    a, _ = ops.create_snapshot(vid, "a", {}, {})
    b_, _ = ops.create_snapshot(vid, "b", {}, {})
    return ops, SnapshotMetadataOps(backends, ops.locks), a, b_


def test_an_open_stream_blocks_delete_not_readers(world):
    ops, mops, a, b = world
    stream = mops.allocated(a, 0, 0, {})
    capacity, ranges = next(stream)
    assert capacity == 8 * MIB and ranges == []
    with pytest.raises(e.Aborted, match="GetMetadataAllocated"):
        ops.delete_snapshot(a, {})
    other = mops.delta(a, b, 0, 0, {})
    assert next(other) == (8 * MIB, [])  # a second reader of the same snapshot runs beside the first
    with pytest.raises(e.Aborted):
        ops.delete_snapshot(b, {})
    other.close()  # what a cancelled call does: the generator is closed
    ops.delete_snapshot(b, {})
    stream.close()
    ops.delete_snapshot(a, {})
    with pytest.raises(e.NotFound):
        next(mops.allocated(a, 0, 0, {}))


def test_a_finished_stream_gives_its_claims_back(world):
    ops, mops, a, b = world
    assert list(mops.delta(a, b, 0, 0, {})) == [(8 * MIB, [])]
    ops.delete_snapshot(a, {})


def test_refusals(world):
    ops, mops, a, _ = world
    with pytest.raises(e.OutOfRange):
        next(mops.allocated(a, -1, 0, {}))
    with pytest.raises(e.OutOfRange, match="past the end"):
        next(mops.allocated(a, 8 * MIB + 1, 0, {}))
    assert list(mops.allocated(a, 8 * MIB, 0, {})) == [(8 * MIB, [])]
    with pytest.raises(e.InvalidArgument, match="max_results"):
        next(mops.allocated(a, 0, -5, {}))
    with pytest.raises(e.InvalidArgument, match="snapshot_id is required"):
        next(mops.allocated("", 0, 0, {}))
    with pytest.raises(e.NotFound):
        next(mops.allocated("local:vol-1", 0, 0, {}))
    plain_vol, _ = ops.create_volume("plain-vol", 8 * MIB, 0, CAP, {"backend": "plain"}, {})
    plain_snap, _ = ops.create_snapshot(plain_vol, "plain-snap", {}, {})
    with pytest.raises(e.FailedPrecondition, match="full backup"):
        next(mops.allocated(plain_snap, 0, 0, {}))
    other_vol, _ = ops.create_volume("other-vol", 8 * MIB, 0, CAP, {"backend": "other"}, {})
    other_snap, _ = ops.create_snapshot(other_vol, "other-snap", {}, {})
    with pytest.raises(e.InvalidArgument, match="different backends"):
        next(mops.delta(a, other_snap, 0, 0, {}))
    assert supported(ops.backends)
    assert not supported([b for b in ops.backends if b.name == "plain"])
