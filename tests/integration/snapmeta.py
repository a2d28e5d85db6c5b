"""What the changed-block tracking data tests share (file backend on the host, RBD on the test Ceph cluster): a
scenario of known writes between two snapshots, made through the plugin (a raw block volume staged and published,
written with os.pwrite on the published device node, unpublished and unstaged), and the reading of the
SnapshotMetadata streams over the plugin's gRPC socket.

Expected ranges are computed here from the writes alone — the block size a backend reports in is the documented
one (README: 64 KiB blocks; RBD's allocated extents are whole 4 MiB objects with fast-diff) — never asked of the
plugin."""
from __future__ import annotations

import os
import random
import uuid
from dataclasses import dataclass
from typing import Iterable, Optional

import grpc

from csi._pb import csi_pb2 as pb
from csi._pb import csi_pb2_grpc as rpc
from tests.sanity.harness import MIB, Client, Ledger, block_cap

KIB = 1 << 10
BLOCK = 64 * KIB
VARIABLE_LENGTH = pb.BlockMetadataType.Value("VARIABLE_LENGTH")
Range = tuple[int, int]

SIZE = 64 * MIB
# (offset, length): first known writes, then the ones made between the two snapshots
BEFORE = [(1 * MIB, 256 * KIB), (5 * MIB + 1000, 100), (40 * MIB, 64 * KIB)]
BETWEEN = [(1 * MIB + 128 * KIB, 64 * KIB), (20 * MIB, 3 * MIB), (63 * MIB + 4 * KIB, 8 * KIB)]


def rounded(writes: Iterable[Range], unit: int, size: int = SIZE) -> list[Range]:
    """The writes widened to whole `unit`s and merged where they touch: what a VARIABLE_LENGTH stream says."""
    spans = sorted((o // unit * unit, min(-(-(o + n) // unit) * unit, size)) for o, n in writes)
    out: list[list[int]] = []
    for a, b in spans:
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b - a) for a, b in out]


@dataclass
class Scenario:
    volume: pb.Volume
    first: pb.Snapshot
    second: pb.Snapshot
    other: pb.Snapshot  # a snapshot of another volume


def write_blocks(ledger: Ledger, dirs, vol: pb.Volume, writes: Iterable[Range], seed: int) -> None:
    cap = block_cap()
    staging, target = dirs.staging(), dirs.target()
    ledger.stage(vol, staging, cap)
    ledger.publish(vol, staging, target, cap)
    rnd = random.Random(seed)
    fd = os.open(target, os.O_WRONLY)
    try:
        for off, n in writes:
            assert os.pwrite(fd, rnd.randbytes(n), off) == n
        os.fsync(fd)
    finally:
        os.close(fd)
    ledger.unpublish(vol.volume_id, target)
    ledger.unstage(vol.volume_id, staging)


def make_scenario(ledger: Ledger, dirs, params: Optional[dict[str, str]] = None, prefix: str = "cbt") -> Scenario:
    """A volume with BEFORE written, snapshot `first`, BETWEEN written, snapshot `second`; plus `other`, a
    snapshot of a second volume."""
    def create() -> pb.Volume:
        return ledger.create_volume(pb.CreateVolumeRequest(
            name=f"{prefix}-{uuid.uuid4().hex[:10]}", volume_capabilities=[block_cap()], parameters=params or {},
            capacity_range=pb.CapacityRange(required_bytes=SIZE)))

    def snap(vol: pb.Volume) -> pb.Snapshot:
        return ledger.create_snapshot(pb.CreateSnapshotRequest(source_volume_id=vol.volume_id,
                                                               name=f"{prefix}-snap-{uuid.uuid4().hex[:10]}"))
    vol = create()
    assert vol.capacity_bytes == SIZE
    write_blocks(ledger, dirs, vol, BEFORE, 1)
    first = snap(vol)
    write_blocks(ledger, dirs, vol, BETWEEN, 2)
    second = snap(vol)
    other_vol = create()
    write_blocks(ledger, dirs, other_vol, BEFORE[:1], 3)
    return Scenario(vol, first, second, snap(other_vol))


class Metadata:
    """The SnapshotMetadata service of a plugin, read to the end of each stream with every message checked."""

    def __init__(self, client: Client) -> None:
        self.stub = rpc.SnapshotMetadataStub(client.channel)
        self.timeout = client.timeout

    def _read(self, stream, max_results: int) -> tuple[list[list[Range]], int]:
        messages, capacity = [], None
        for msg in stream:
            assert msg.block_metadata_type == VARIABLE_LENGTH
            if capacity is None:
                capacity = msg.volume_capacity_bytes
            assert msg.volume_capacity_bytes == capacity, "volume_capacity_bytes changed mid-stream"
            if max_results > 0:
                assert len(msg.block_metadata) <= max_results
            messages.append([(b.byte_offset, b.size_bytes) for b in msg.block_metadata])
        flat = [r for m in messages for r in m]
        for (a_off, a_len), (b_off, _) in zip(flat, flat[1:]):
            assert a_off + a_len <= b_off, f"tuples overlap or go backwards: {flat}"
        assert all(n > 0 for _, n in flat), f"a tuple of size 0: {flat}"
        assert capacity is not None, "the stream sent no message at all"
        return messages, capacity

    def allocated(self, snapshot_id: str, start: int = 0, max_results: int = 0,
                  secrets: Optional[dict[str, str]] = None) -> tuple[list[list[Range]], int]:
        return self._read(self.stub.GetMetadataAllocated(pb.GetMetadataAllocatedRequest(
            snapshot_id=snapshot_id, starting_offset=start, max_results=max_results, secrets=secrets or {}),
            timeout=self.timeout), max_results)

    def delta(self, base: str, target: str, start: int = 0, max_results: int = 0) -> tuple[list[list[Range]], int]:
        return self._read(self.stub.GetMetadataDelta(pb.GetMetadataDeltaRequest(
            base_snapshot_id=base, target_snapshot_id=target, starting_offset=start, max_results=max_results),
            timeout=self.timeout), max_results)

    def allocated_code(self, request: pb.GetMetadataAllocatedRequest) -> grpc.RpcError:
        return _code(lambda: list(self.stub.GetMetadataAllocated(request, timeout=self.timeout)))

    def delta_code(self, request: pb.GetMetadataDeltaRequest) -> grpc.RpcError:
        return _code(lambda: list(self.stub.GetMetadataDelta(request, timeout=self.timeout)))


def _code(call) -> grpc.RpcError:
    try:
        call()
    except grpc.RpcError as e:
        assert e.details(), f"{e.code().name} without a message"
        return e
    raise AssertionError("the stream ended cleanly; an error was expected")


def flat(messages: list[list[Range]]) -> list[Range]:
    return [r for m in messages for r in m]


def check_paging(md: Metadata, snapshot_id: str, expected: list[Range]) -> None:
    """max_results bounds every message; resuming at the end of a received tuple continues exactly; resuming inside
    a tuple starts at the 64 KiB block holding the offset (the spec: no tuple ends at or before it)."""
    assert len(expected) >= 3, "the scenario must give at least three extents to page through"
    messages, _ = md.allocated(snapshot_id, max_results=1)
    assert [m for m in messages if m] == [[r] for r in expected]
    resume = expected[1][0] + expected[1][1]
    messages, _ = md.allocated(snapshot_id, start=resume, max_results=2)
    assert flat(messages) == expected[2:]
    off, n = expected[-1]
    inside = off + n - 1 if n <= BLOCK else off + BLOCK + 5
    messages, _ = md.allocated(snapshot_id, start=inside)
    got = flat(messages)
    assert got == [(inside // BLOCK * BLOCK, off + n - inside // BLOCK * BLOCK)]
    assert inside < got[0][0] + got[0][1]
