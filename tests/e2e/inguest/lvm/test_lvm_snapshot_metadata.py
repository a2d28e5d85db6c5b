"""Changed-block tracking on LVM thin, inside the e2e guest (real device-mapper thin pool, real thin_dump/thin_delta),
through a real `tessera-csi serve --mode all` over gRPC: known blocks written through the staged raw block device
(os.pwrite), two thin snapshots, and GetMetadataAllocated / GetMetadataDelta must name exactly the written chunks of
the pool (its `chunk_size`, read from LVM here, never asked of the plugin), page as the spec says, and leave the
pool holding no metadata snapshot afterwards — also after a reservation a dead reader left behind, and when the pool
was not active at all.

Thick LVs keep no block map and have no snapshots: a thick-only plugin does not advertise the service and a call
meets UNIMPLEMENTED (test_capability); the thin-only tests skip the thick parameter with that reason.
"""
from __future__ import annotations

import json
import os
import subprocess
import threading
import uuid
from typing import TYPE_CHECKING, Iterator

import grpc
import pytest

from csi._pb import csi_pb2 as pb
from tests.integration.snapmeta import (BEFORE, BETWEEN, SIZE, Metadata, Scenario, flat, make_scenario, rounded,
                                        write_blocks)
from tests.sanity.harness import PLUGIN, Ledger, block_cap

if TYPE_CHECKING:
    from conftest import LvmEnv

C = grpc.StatusCode


class Dirs:
    """Staging directories and block publish targets under the module's work directory."""

    def __init__(self, root: str) -> None:
        self.root = root

    def staging(self) -> str:
        p = os.path.join(self.root, f"staging-{uuid.uuid4().hex[:8]}")
        os.makedirs(p)
        return p

    def target(self) -> str:
        p = os.path.join(self.root, f"pod-{uuid.uuid4().hex[:8]}")
        os.makedirs(p)
        return os.path.join(p, "target")


def _lvm_json(argv: list[str]) -> list[dict]:
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=120,
                         env=dict(os.environ, LVM_SUPPRESS_FD_WARNINGS="1")).stdout
    return json.loads(out)["report"][0]["lv"]


def chunk_size(env: "LvmEnv") -> int:
    """The pool's chunk size as LVM reports it: the unit the pool maps, so the unit of every extent."""
    rows = _lvm_json(["lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", "chunk_size",
                      f"{env.vg.name}/{env.vg.thin_pool}"])
    return int(rows[0]["chunk_size"])


def pool_target(env: "LvmEnv") -> str:
    return f"{env.vg.name.replace('-', '--')}-{env.vg.thin_pool.replace('-', '--')}-tpool"


def held_metadata_snapshot(env: "LvmEnv") -> str:
    """The pool's held metadata root from `dmsetup status` ('-': none held)."""
    out = subprocess.run(["dmsetup", "status", pool_target(env)], capture_output=True, text=True, check=True,
                         timeout=60).stdout.split()
    assert out[2] == "thin-pool", out
    return out[6]


@pytest.fixture(scope="module")
def scenario(lvm_server: "LvmEnv") -> Iterator[Scenario]:
    """One volume with BEFORE written, thin snapshot `first`, BETWEEN written, thin snapshot `second`; `other` a
    snapshot of a second volume. Made once per module (each takes three stages and three snapshots)."""
    if not lvm_server.thin:
        pytest.skip("thick LVs have no snapshots and keep no block map: nothing to read (test_capability checks "
                    "that a thick-only plugin does not offer the service)")
    ledger = Ledger(lvm_server.client, lvm_server.node, use_controller_publish=False)
    try:
        yield make_scenario(ledger, Dirs(lvm_server.workdir), prefix="lvm-cbt")
    finally:
        problems = ledger.cleanup()
        assert not problems, f"cleanup failed: {problems}\n{lvm_server.server.log_tail()}"


def test_capability(lvm: "LvmEnv") -> None:
    """Thin: SNAPSHOT_METADATA_SERVICE advertised. Thick only: not advertised, and the service is not served."""
    caps = lvm.client.plugin_caps()
    if lvm.thin:
        assert PLUGIN.Value("SNAPSHOT_METADATA_SERVICE") in caps
        return
    assert PLUGIN.Value("SNAPSHOT_METADATA_SERVICE") not in caps
    err = Metadata(lvm.client).allocated_code(pb.GetMetadataAllocatedRequest(snapshot_id="lvm:ts-none"))
    assert err.code() == C.UNIMPLEMENTED, err.details()


def test_allocated_is_exactly_the_written_chunks(lvm: "LvmEnv", scenario: Scenario) -> None:
    unit = chunk_size(lvm)
    md = Metadata(lvm.client)
    messages, capacity = md.allocated(scenario.first.snapshot_id)
    assert capacity == SIZE
    assert flat(messages) == rounded(BEFORE, unit)
    messages, capacity = md.allocated(scenario.second.snapshot_id)
    assert capacity == SIZE
    assert flat(messages) == rounded(BEFORE + BETWEEN, unit)
    assert held_metadata_snapshot(lvm) == "-", "the pool still holds a metadata snapshot after the calls"


def test_delta_is_exactly_the_chunks_written_between(lvm: "LvmEnv", scenario: Scenario) -> None:
    unit = chunk_size(lvm)
    md = Metadata(lvm.client)
    messages, capacity = md.delta(scenario.first.snapshot_id, scenario.second.snapshot_id)
    assert capacity == SIZE
    assert flat(messages) == rounded(BETWEEN, unit)
    messages, _ = md.delta(scenario.second.snapshot_id, scenario.first.snapshot_id)
    assert flat(messages) == rounded(BETWEEN, unit), "the same chunks differ either way round"
    messages, _ = md.delta(scenario.second.snapshot_id, scenario.second.snapshot_id)
    assert flat(messages) == [], "a snapshot does not differ from itself"
    assert held_metadata_snapshot(lvm) == "-"


def test_paging(lvm: "LvmEnv", scenario: Scenario) -> None:
    """max_results bounds every message; a resumed stream continues exactly at a tuple's end, and inside a tuple
    starts at the chunk holding the offset (no tuple ends at or before it)."""
    unit = chunk_size(lvm)
    md = Metadata(lvm.client)
    expected = rounded(BEFORE + BETWEEN, unit)
    assert len(expected) >= 3
    messages, _ = md.allocated(scenario.second.snapshot_id, max_results=1)
    assert [m for m in messages if m] == [[r] for r in expected]
    messages, _ = md.allocated(scenario.second.snapshot_id, start=expected[1][0] + expected[1][1], max_results=2)
    assert flat(messages) == expected[2:]
    assert all(len(m) <= 2 for m in messages)
    i = max(range(len(expected)), key=lambda k: expected[k][1])  # the longest extent: resume in its middle
    off, n = expected[i]
    inside = off + n // 2 + 5
    assert inside // unit * unit > off, "the scenario needs an extent of several chunks"
    messages, _ = md.allocated(scenario.second.snapshot_id, start=inside)
    assert flat(messages) == [(inside // unit * unit, off + n - inside // unit * unit)] + expected[i + 1:]
    delta = rounded(BETWEEN, unit)
    messages, _ = md.delta(scenario.first.snapshot_id, scenario.second.snapshot_id, max_results=1)
    assert [m for m in messages if m] == [[r] for r in delta]
    messages, _ = md.delta(scenario.first.snapshot_id, scenario.second.snapshot_id, start=delta[0][0] + delta[0][1])
    assert flat(messages) == delta[1:]
    messages, capacity = md.allocated(scenario.second.snapshot_id, start=SIZE)
    assert flat(messages) == [] and capacity == SIZE
    assert held_metadata_snapshot(lvm) == "-"


def test_readers_side_by_side(lvm: "LvmEnv", scenario: Scenario) -> None:
    """Streams at the same time share the pool's one metadata snapshot in turn: each gets its exact answer."""
    unit = chunk_size(lvm)
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def read(i: int) -> None:
        try:
            md = Metadata(lvm.client)
            if i % 2:
                results[i] = flat(md.delta(scenario.first.snapshot_id, scenario.second.snapshot_id)[0])
            else:
                results[i] = flat(md.allocated(scenario.first.snapshot_id)[0])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    for i in range(6):
        assert results[i] == (rounded(BETWEEN, unit) if i % 2 else rounded(BEFORE, unit))
    assert held_metadata_snapshot(lvm) == "-"


def test_left_over_reservation_and_inactive_pool(lvm: "LvmEnv", scenario: Scenario) -> None:
    """A metadata snapshot a crashed reader left held is released and taken anew; a pool that is not active (no
    thin volume in use, as after a node reboot) is activated for the read. Both end with nothing held."""
    unit = chunk_size(lvm)
    md = Metadata(lvm.client)
    subprocess.run(["dmsetup", "message", pool_target(lvm), "0", "reserve_metadata_snap"], check=True, timeout=60)
    assert held_metadata_snapshot(lvm) != "-"
    messages, _ = md.delta(scenario.first.snapshot_id, scenario.second.snapshot_id)
    assert flat(messages) == rounded(BETWEEN, unit)
    assert held_metadata_snapshot(lvm) == "-"

    subprocess.run(["lvchange", "--activate", "n", f"{lvm.vg.name}/{lvm.vg.thin_pool}"], check=True, timeout=120,
                   capture_output=True)
    assert not os.path.exists(f"/dev/mapper/{pool_target(lvm)}")
    messages, _ = md.allocated(scenario.first.snapshot_id)
    assert flat(messages) == rounded(BEFORE, unit)
    assert held_metadata_snapshot(lvm) == "-"


def test_refusals(lvm: "LvmEnv", scenario: Scenario) -> None:
    md = Metadata(lvm.client)
    first, second, other = scenario.first.snapshot_id, scenario.second.snapshot_id, scenario.other.snapshot_id
    unknown = "lvm:ts-00000000-0000-0000-0000-000000000000"
    assert md.allocated_code(pb.GetMetadataAllocatedRequest(snapshot_id=unknown)).code() == C.NOT_FOUND
    assert md.delta_code(pb.GetMetadataDeltaRequest(base_snapshot_id=first,
                                                    target_snapshot_id=unknown)).code() == C.NOT_FOUND
    err = md.delta_code(pb.GetMetadataDeltaRequest(base_snapshot_id=first, target_snapshot_id=other))
    assert err.code() == C.INVALID_ARGUMENT and "same volume" in err.details()
    for start in (-1, SIZE + 1):
        assert md.allocated_code(pb.GetMetadataAllocatedRequest(snapshot_id=first,
                                                                starting_offset=start)).code() == C.OUT_OF_RANGE
        assert md.delta_code(pb.GetMetadataDeltaRequest(base_snapshot_id=first, target_snapshot_id=second,
                                                        starting_offset=start)).code() == C.OUT_OF_RANGE
    assert held_metadata_snapshot(lvm) == "-"


def test_deleted_snapshot_is_not_found(lvm: "LvmEnv", scenario: Scenario) -> None:
    """A snapshot deleted (its thin device gone from the pool) is NOT_FOUND, never an empty answer."""
    snap = lvm.ledger.create_snapshot(pb.CreateSnapshotRequest(source_volume_id=scenario.volume.volume_id,
                                                               name=f"lvm-cbt-gone-{uuid.uuid4().hex[:8]}"))
    md = Metadata(lvm.client)
    assert flat(md.allocated(snap.snapshot_id)[0]) == rounded(BEFORE + BETWEEN, chunk_size(lvm))
    lvm.ledger.delete_snapshot(snap.snapshot_id)
    assert md.allocated_code(pb.GetMetadataAllocatedRequest(snapshot_id=snap.snapshot_id)).code() == C.NOT_FOUND
    assert md.delta_code(pb.GetMetadataDeltaRequest(base_snapshot_id=scenario.first.snapshot_id,
                                                    target_snapshot_id=snap.snapshot_id)).code() == C.NOT_FOUND


def test_delta_across_an_expansion(lvm: "LvmEnv") -> None:
    """A volume grown between the snapshots: the delta covers the target's size, and the chunk written past the
    base's end is the whole delta (the grown part nobody wrote is not changed)."""
    if not lvm.thin:
        pytest.skip("thick LVs have no snapshots (test_capability checks thick's answer)")
    unit = chunk_size(lvm)
    dirs = Dirs(lvm.workdir)
    vol = lvm.ledger.create_volume(pb.CreateVolumeRequest(
        name=f"lvm-cbt-grow-{uuid.uuid4().hex[:8]}", volume_capabilities=[block_cap()],
        capacity_range=pb.CapacityRange(required_bytes=SIZE)))
    write_blocks(lvm.ledger, dirs, vol, [(0, unit)], 7)
    base = lvm.ledger.create_snapshot(pb.CreateSnapshotRequest(source_volume_id=vol.volume_id,
                                                               name=f"lvm-cbt-grow-{uuid.uuid4().hex[:8]}"))
    grown = lvm.client.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=2 * SIZE),
        volume_capability=block_cap()), timeout=120)
    assert grown.capacity_bytes == 2 * SIZE
    write_blocks(lvm.ledger, dirs, vol, [(SIZE + 3 * unit, 10)], 8)
    target = lvm.ledger.create_snapshot(pb.CreateSnapshotRequest(source_volume_id=vol.volume_id,
                                                                 name=f"lvm-cbt-grow-{uuid.uuid4().hex[:8]}"))
    messages, capacity = Metadata(lvm.client).delta(base.snapshot_id, target.snapshot_id)
    assert capacity == 2 * SIZE
    assert flat(messages) == [(SIZE + 3 * unit, unit)]
    assert held_metadata_snapshot(lvm) == "-"
