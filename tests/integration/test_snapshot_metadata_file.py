"""Changed-block tracking on the file backend, through the real server: known blocks written through the staged
raw block device (a loop device), two snapshots, and GetMetadataAllocated / GetMetadataDelta must name exactly the
written blocks (64 KiB blocks, VARIABLE_LENGTH extents), page as the spec says, and refuse what the spec refuses."""
from __future__ import annotations

import os
import shutil
import sys
import uuid

import grpc
import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from csi._pb import csi_pb2 as pb  # noqa: E402
from tests.integration.snapmeta import (BEFORE, BETWEEN, BLOCK, SIZE, Metadata, check_paging, flat, make_scenario,  # noqa: E402
                                        rounded, write_blocks)
from tests.sanity.harness import PLUGIN, ServerProcess, block_cap  # noqa: E402

C = grpc.StatusCode


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.fail("MISSING: root and losetup are required for the file backend's data tests")
    srv = ServerProcess(str(tmp_path_factory.mktemp("snapmeta")), node_id="cbt-node").start()
    yield srv
    rc = srv.stop()
    assert rc == 0, f"server exit code {rc} after SIGTERM:\n{srv.log_tail()}"


@pytest.fixture
def scenario(ledger, dirs):
    return make_scenario(ledger, dirs)


def test_capability_advertised(client):
    assert PLUGIN.Value("SNAPSHOT_METADATA_SERVICE") in client.plugin_caps()


def test_allocated_is_exactly_what_was_written(client, scenario):
    md = Metadata(client)
    messages, capacity = md.allocated(scenario.first.snapshot_id)
    assert capacity == SIZE
    assert flat(messages) == rounded(BEFORE, BLOCK)
    messages, capacity = md.allocated(scenario.second.snapshot_id)
    assert capacity == SIZE
    assert flat(messages) == rounded(BEFORE + BETWEEN, BLOCK)


def test_delta_is_exactly_what_was_written_between(client, scenario):
    md = Metadata(client)
    messages, capacity = md.delta(scenario.first.snapshot_id, scenario.second.snapshot_id)
    assert capacity == SIZE
    assert flat(messages) == rounded(BETWEEN, BLOCK)
    messages, _ = md.delta(scenario.second.snapshot_id, scenario.second.snapshot_id)
    assert flat(messages) == [], "a snapshot does not differ from itself"


def test_paging(client, scenario):
    md = Metadata(client)
    check_paging(md, scenario.second.snapshot_id, rounded(BEFORE + BETWEEN, BLOCK))
    expected = rounded(BETWEEN, BLOCK)
    messages, _ = md.delta(scenario.first.snapshot_id, scenario.second.snapshot_id, max_results=1)
    assert [m for m in messages if m] == [[r] for r in expected]
    messages, _ = md.delta(scenario.first.snapshot_id, scenario.second.snapshot_id,
                           start=expected[0][0] + expected[0][1])
    assert flat(messages) == expected[1:]
    messages, capacity = md.allocated(scenario.second.snapshot_id, start=SIZE)
    assert flat(messages) == [] and capacity == SIZE


def test_errors(client, scenario):
    md = Metadata(client)
    first, second, other = (scenario.first.snapshot_id, scenario.second.snapshot_id, scenario.other.snapshot_id)
    for unknown in ("local:snap-00000000-0000-0000-0000-000000000000", "fake-snapshot-id", "no-such-backend:snap-1"):
        assert md.allocated_code(pb.GetMetadataAllocatedRequest(snapshot_id=unknown)).code() == C.NOT_FOUND
        assert md.delta_code(pb.GetMetadataDeltaRequest(base_snapshot_id=first,
                                                        target_snapshot_id=unknown)).code() == C.NOT_FOUND
        assert md.delta_code(pb.GetMetadataDeltaRequest(base_snapshot_id=unknown,
                                                        target_snapshot_id=second)).code() == C.NOT_FOUND
    assert md.allocated_code(pb.GetMetadataAllocatedRequest()).code() == C.INVALID_ARGUMENT
    assert md.delta_code(pb.GetMetadataDeltaRequest(target_snapshot_id=second)).code() == C.INVALID_ARGUMENT
    assert md.delta_code(pb.GetMetadataDeltaRequest(base_snapshot_id=first)).code() == C.INVALID_ARGUMENT
    err = md.delta_code(pb.GetMetadataDeltaRequest(base_snapshot_id=first, target_snapshot_id=other))
    assert err.code() == C.INVALID_ARGUMENT and "same volume" in err.details()
    for start in (-1, SIZE + 1):
        assert md.allocated_code(pb.GetMetadataAllocatedRequest(snapshot_id=first,
                                                                starting_offset=start)).code() == C.OUT_OF_RANGE
        assert md.delta_code(pb.GetMetadataDeltaRequest(base_snapshot_id=first, target_snapshot_id=second,
                                                        starting_offset=start)).code() == C.OUT_OF_RANGE
    assert md.allocated_code(pb.GetMetadataAllocatedRequest(snapshot_id=first,
                                                            max_results=-1)).code() == C.INVALID_ARGUMENT


def test_deleted_snapshot_is_not_found(client, ledger, scenario):
    md = Metadata(client)
    ledger.delete_snapshot(scenario.first.snapshot_id)
    assert md.allocated_code(pb.GetMetadataAllocatedRequest(
        snapshot_id=scenario.first.snapshot_id)).code() == C.NOT_FOUND
    assert md.delta_code(pb.GetMetadataDeltaRequest(base_snapshot_id=scenario.first.snapshot_id,
                                                    target_snapshot_id=scenario.second.snapshot_id)).code() == C.NOT_FOUND


def test_secrets_never_logged(client, server, scenario):
    md = Metadata(client)
    secret = "s3cr3t-" + uuid.uuid4().hex
    md.allocated(scenario.first.snapshot_id, secrets={"userKey": secret})
    md.allocated_code(pb.GetMetadataAllocatedRequest(snapshot_id="fake-snapshot-id", secrets={"userKey": secret}))
    assert secret not in server.written_log()


def test_undecodable_request_is_invalid_argument(client, server):
    """A snapshot_id that is not UTF-8 (protobuf cannot parse it): INVALID_ARGUMENT naming the message, as for
    every unary RPC, not grpc's bare INTERNAL; the server lives on."""
    for method, reply in (("GetMetadataAllocated", pb.GetMetadataAllocatedResponse),
                          ("GetMetadataDelta", pb.GetMetadataDeltaResponse)):
        call = client.channel.unary_stream(f"/csi.v1.SnapshotMetadata/{method}", request_serializer=None,
                                           response_deserializer=reply.FromString)
        with pytest.raises(grpc.RpcError) as info:
            list(call(b"\x0a\x02\xff\xfe", timeout=60))
        assert info.value.code() == C.INVALID_ARGUMENT, info.value.details()
        assert "csi.v1." in info.value.details()
    assert server.alive()


def test_delta_across_an_expansion(client, ledger, dirs):
    """A volume grown between the snapshots: the delta covers the target's size, and blocks written past the base's
    end are changed (the base reads as zeros there); the grown part nobody wrote is not."""
    vol = ledger.create_volume(pb.CreateVolumeRequest(
        name=f"cbt-grow-{uuid.uuid4().hex[:8]}", volume_capabilities=[block_cap()],
        capacity_range=pb.CapacityRange(required_bytes=SIZE)))
    write_blocks(ledger, dirs, vol, [(0, BLOCK)], 7)
    base = ledger.create_snapshot(pb.CreateSnapshotRequest(source_volume_id=vol.volume_id,
                                                           name=f"cbt-grow-{uuid.uuid4().hex[:8]}"))
    grown = client.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=2 * SIZE),
        volume_capability=block_cap()), timeout=120)
    assert grown.capacity_bytes == 2 * SIZE
    write_blocks(ledger, dirs, vol, [(SIZE + 3 * BLOCK, 10)], 8)
    target = ledger.create_snapshot(pb.CreateSnapshotRequest(source_volume_id=vol.volume_id,
                                                             name=f"cbt-grow-{uuid.uuid4().hex[:8]}"))
    messages, capacity = Metadata(client).delta(base.snapshot_id, target.snapshot_id)
    assert capacity == 2 * SIZE
    assert flat(messages) == [(SIZE + 3 * BLOCK, BLOCK)]
