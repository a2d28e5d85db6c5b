"""The SnapshotMetadata service (spec §Snapshot Metadata Service RPCs, CSI v1.12), for plugins that advertise
SNAPSHOT_METADATA_SERVICE: stream shape, error codes, and what a volume nobody wrote says. Exact ranges after known
writes are checked per backend in tests/integration (test_snapshot_metadata_file.py, rbd/test_rbd_snapshot_metadata.py)
and, for LVM thin, in the guest (tests/e2e/inguest/lvm/test_lvm_snapshot_metadata.py).
"""
from __future__ import annotations

import grpc
import pytest

from csi._pb import csi_pb2 as pb
from csi._pb import csi_pb2_grpc as rpc
from tests.sanity.harness import PLUGIN

C = grpc.StatusCode
TYPES = {pb.BlockMetadataType.Value("FIXED_LENGTH"), pb.BlockMetadataType.Value("VARIABLE_LENGTH")}


@pytest.fixture(autouse=True)
def _service(plugin):
    if PLUGIN.Value("SNAPSHOT_METADATA_SERVICE") not in plugin.plugin_caps:
        pytest.skip("not applicable: the plugin does not advertise SNAPSHOT_METADATA_SERVICE")
    plugin.require_controller()
    plugin.require("CREATE_DELETE_SNAPSHOT")


def stub(plugin) -> rpc.SnapshotMetadataStub:
    return rpc.SnapshotMetadataStub(plugin.client.channel)


def read(stream) -> tuple[list[tuple[int, int]], int, int]:
    """(all tuples, volume_capacity_bytes, block_metadata_type), with the spec's rules on every message checked."""
    tuples, cap, kind = [], None, None
    for msg in stream:
        assert msg.block_metadata_type in TYPES
        kind = msg.block_metadata_type if kind is None else kind
        cap = msg.volume_capacity_bytes if cap is None else cap
        assert (msg.block_metadata_type, msg.volume_capacity_bytes) == (kind, cap), "type or capacity changed mid-stream"
        tuples += [(b.byte_offset, b.size_bytes) for b in msg.block_metadata]
    for (a, n), (b, _) in zip(tuples, tuples[1:]):
        assert a + n <= b, "tuples overlap or go backwards"
    assert all(n > 0 and o >= 0 for o, n in tuples)
    if kind == pb.BlockMetadataType.Value("FIXED_LENGTH"):
        assert len({n for _, n in tuples}) <= 1
    return tuples, cap or 0, kind or 0


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        list(call())
    assert info.value.details(), f"{info.value.code().name} without a message"
    return info.value.code()


@pytest.fixture
def two_snapshots(plugin, ledger):
    vol = ledger.create_volume(plugin.create_request())
    a = ledger.create_snapshot(pb.CreateSnapshotRequest(source_volume_id=vol.volume_id, name=plugin.unique("snap")))
    b = ledger.create_snapshot(pb.CreateSnapshotRequest(source_volume_id=vol.volume_id, name=plugin.unique("snap")))
    return vol, a, b


def test_unwritten_volume(plugin, two_snapshots):
    vol, a, b = two_snapshots
    s = stub(plugin)
    tuples, cap, _ = read(s.GetMetadataAllocated(pb.GetMetadataAllocatedRequest(snapshot_id=a.snapshot_id), timeout=120))
    assert cap == vol.capacity_bytes
    assert all(o + n <= cap for o, n in tuples)
    tuples, cap, _ = read(s.GetMetadataDelta(pb.GetMetadataDeltaRequest(
        base_snapshot_id=a.snapshot_id, target_snapshot_id=b.snapshot_id), timeout=120))
    assert cap == vol.capacity_bytes
    assert tuples == [], "nothing was written between the two snapshots"


def test_unknown_and_missing_ids(plugin, two_snapshots, unknown_snap):
    _, a, _ = two_snapshots
    s = stub(plugin)
    assert code_of(lambda: s.GetMetadataAllocated(pb.GetMetadataAllocatedRequest(snapshot_id=unknown_snap),
                                                  timeout=60)) == C.NOT_FOUND
    assert code_of(lambda: s.GetMetadataDelta(pb.GetMetadataDeltaRequest(
        base_snapshot_id=a.snapshot_id, target_snapshot_id=unknown_snap), timeout=60)) == C.NOT_FOUND
    assert code_of(lambda: s.GetMetadataAllocated(pb.GetMetadataAllocatedRequest(), timeout=60)) == C.INVALID_ARGUMENT
    assert code_of(lambda: s.GetMetadataDelta(pb.GetMetadataDeltaRequest(base_snapshot_id=a.snapshot_id),
                                              timeout=60)) == C.INVALID_ARGUMENT


def test_starting_offset_out_of_range(plugin, two_snapshots):
    vol, a, b = two_snapshots
    s = stub(plugin)
    for start in (-1, vol.capacity_bytes + 1):
        assert code_of(lambda: s.GetMetadataAllocated(pb.GetMetadataAllocatedRequest(
            snapshot_id=a.snapshot_id, starting_offset=start), timeout=60)) == C.OUT_OF_RANGE
        assert code_of(lambda: s.GetMetadataDelta(pb.GetMetadataDeltaRequest(
            base_snapshot_id=a.snapshot_id, target_snapshot_id=b.snapshot_id, starting_offset=start),
            timeout=60)) == C.OUT_OF_RANGE


def test_delta_of_different_volumes(plugin, ledger, two_snapshots):
    _, a, _ = two_snapshots
    other = ledger.create_volume(plugin.create_request())
    c = ledger.create_snapshot(pb.CreateSnapshotRequest(source_volume_id=other.volume_id, name=plugin.unique("snap")))
    assert code_of(lambda: stub(plugin).GetMetadataDelta(pb.GetMetadataDeltaRequest(
        base_snapshot_id=a.snapshot_id, target_snapshot_id=c.snapshot_id), timeout=60)) == C.INVALID_ARGUMENT
