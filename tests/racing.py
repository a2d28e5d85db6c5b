"""A 64-way race of controller calls on shared names and volumes, and the checks a user would make afterwards.

Used by the file backend's race test (tests/integration/test_file_race.py) and the LVM one in the real-kernel guest
(tests/e2e/inguest/lvm/test_lvm_race.py). Each round starts from a few existing objects — two base volumes, a
snapshot of each, volumes for a few request names — and lets 64 threads, released together by a barrier, create,
clone, snapshot, restore, expand and delete them at once. Then, as a CO does, every call answered ABORTED is
retried (one after another, so a retry meeting ABORTED again would be a lock left behind), and the final state is
checked:
- every answer is one the spec allows for that race: OK, ABORTED, NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION;
  never INTERNAL or UNKNOWN;
- one volume per name: every OK CreateVolume of a name returned the same volume ID, and so does a create after
  the race;
- no lost volume or snapshot: an object whose create succeeded and that no successful delete removed is listed
  and healthy (volume condition normal, snapshot ready);
- no orphan: once every object the calls made is deleted, the backend holds nothing of this round (`leftovers`).
"""
from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional

import grpc

from csi._pb import csi_pb2 as pb
from tests.sanity.harness import MIB, Client, mount_cap

C = grpc.StatusCode
ALLOWED = {C.OK, C.ABORTED, C.NOT_FOUND, C.ALREADY_EXISTS, C.FAILED_PRECONDITION}
WAYS = 64
SIZE = 8 * MIB
GROWN = 16 * MIB


@dataclass
class Call:
    """One racing call: what it is (for messages), how to make it, and what its success records."""
    what: str
    run: Callable[[], object]
    on_ok: Callable[[object], None]
    code: Optional[grpc.StatusCode] = None
    message: str = ""
    retries: int = 0


@dataclass
class Round:
    client: Client
    tag: str
    snapshots: bool
    lock: threading.Lock = field(default_factory=threading.Lock)
    # every ID each name was given by an OK create, and every object created / deleted with success
    volume_ids: dict[str, set[str]] = field(default_factory=dict)
    snapshot_ids: dict[str, set[str]] = field(default_factory=dict)
    created: set[str] = field(default_factory=set)
    deleted: set[str] = field(default_factory=set)
    requests: dict[str, pb.CreateVolumeRequest] = field(default_factory=dict)
    snap_requests: dict[str, pb.CreateSnapshotRequest] = field(default_factory=dict)

    # ---- requests ---------------------------------------------------------------------------------------
    def volume_request(self, name: str, source: Optional[pb.VolumeContentSource] = None) -> pb.CreateVolumeRequest:
        # a copy asks for the grown size: its source may have been expanded meanwhile, and a smaller request
        # would rightly be OUT_OF_RANGE
        req = pb.CreateVolumeRequest(name=name, volume_capabilities=[mount_cap("ext4")],
                                     capacity_range=pb.CapacityRange(required_bytes=GROWN if source else SIZE))
        if source is not None:
            req.volume_content_source.CopyFrom(source)
        self.requests[name] = req
        return req

    def snapshot_request(self, name: str, volume_id: str) -> pb.CreateSnapshotRequest:
        req = pb.CreateSnapshotRequest(name=name, source_volume_id=volume_id)
        self.snap_requests[name] = req
        return req

    def _created_volume(self, name: str):
        def record(resp) -> None:
            with self.lock:
                self.volume_ids.setdefault(name, set()).add(resp.volume.volume_id)
                self.created.add(resp.volume.volume_id)
        return record

    def _created_snapshot(self, name: str):
        def record(resp) -> None:
            with self.lock:
                self.snapshot_ids.setdefault(name, set()).add(resp.snapshot.snapshot_id)
                self.created.add(resp.snapshot.snapshot_id)
        return record

    def _deleted(self, oid: str):
        def record(_resp) -> None:
            with self.lock:
                self.deleted.add(oid)
        return record

    # ---- calls ------------------------------------------------------------------------------------------
    def create(self, name: str, source: Optional[pb.VolumeContentSource] = None) -> Call:
        req = self.requests.get(name) or self.volume_request(name, source)
        return Call(f"CreateVolume {name}", lambda: self.client.controller.CreateVolume(req, timeout=300),
                    self._created_volume(name))

    def snapshot(self, name: str, volume_id: str) -> Call:
        req = self.snap_requests.get(name) or self.snapshot_request(name, volume_id)
        return Call(f"CreateSnapshot {name} of {volume_id}",
                    lambda: self.client.controller.CreateSnapshot(req, timeout=300), self._created_snapshot(name))

    def delete_volume(self, volume_id: str) -> Call:
        req = pb.DeleteVolumeRequest(volume_id=volume_id)
        return Call(f"DeleteVolume {volume_id}", lambda: self.client.controller.DeleteVolume(req, timeout=300),
                    self._deleted(volume_id))

    def delete_snapshot(self, snapshot_id: str) -> Call:
        req = pb.DeleteSnapshotRequest(snapshot_id=snapshot_id)
        return Call(f"DeleteSnapshot {snapshot_id}", lambda: self.client.controller.DeleteSnapshot(req, timeout=300),
                    self._deleted(snapshot_id))

    def expand(self, volume_id: str) -> Call:
        req = pb.ControllerExpandVolumeRequest(volume_id=volume_id, capacity_range=pb.CapacityRange(required_bytes=GROWN),
                                               volume_capability=mount_cap("ext4"))
        return Call(f"ControllerExpandVolume {volume_id}",
                    lambda: self.client.controller.ControllerExpandVolume(req, timeout=300), lambda _r: None)


def _attempt(call: Call) -> None:
    try:
        resp = call.run()
    except grpc.RpcError as e:
        call.code, call.message = e.code(), e.details() or ""
        return
    call.code, call.message = C.OK, ""
    call.on_ok(resp)


def _setup_call(call: Call) -> object:
    resp = call.run()
    call.on_ok(resp)
    return resp


def plan(r: Round, rng: random.Random) -> list[Call]:
    """The round's starting objects, then WAYS calls spread over every kind of operation on them."""
    t = r.tag
    bases = [_setup_call(r.create(f"{t}-base{i}")).volume.volume_id for i in range(2)]
    names = [f"{t}-n{i}" for i in range(4)]
    named = [_setup_call(r.create(n)).volume.volume_id for n in names]
    snaps: list[str] = []
    if r.snapshots:
        snaps = [_setup_call(r.snapshot(f"{t}-p{i}", bases[i])).snapshot.snapshot_id for i in range(2)]

    def src_volume(vid: str) -> pb.VolumeContentSource:
        return pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id=vid))

    def src_snapshot(sid: str) -> pb.VolumeContentSource:
        return pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=sid))

    makers: list[Callable[[int], Call]] = [
        lambda i: r.create(names[i % 4]),
        lambda i: r.delete_volume(named[i % 4]),
        lambda i: r.expand(named[i % 4]),
        lambda i: r.create(f"{t}-clone{i % 4}", src_volume(bases[i % 2])),
        lambda i: r.delete_volume(bases[i % 2]),
        lambda i: r.expand(bases[i % 2]),
    ]
    if r.snapshots:
        makers += [
            lambda i: r.snapshot(f"{t}-s{i % 4}", bases[i % 2]),
            lambda i: r.create(f"{t}-restore{i % 4}", src_snapshot(snaps[i % 2])),
            lambda i: r.delete_snapshot(snaps[i % 2]),
        ]
    # the same name always with the same request, so ALREADY_EXISTS only where the spec gives it
    calls = [makers[k % len(makers)](rng.randrange(8)) for k in range(WAYS)]
    rng.shuffle(calls)
    return calls


def race(calls: list[Call]) -> None:
    barrier = threading.Barrier(len(calls))

    def one(call: Call) -> None:
        barrier.wait(timeout=120)
        _attempt(call)

    with ThreadPoolExecutor(len(calls)) as pool:
        list(pool.map(one, calls))


def retry_aborted(calls: list[Call], attempts: int = 20) -> list[str]:
    """Retry every ABORTED call in order until it is not ABORTED (bounded); problems as sentences."""
    problems = []
    for call in calls:
        while call.code == C.ABORTED and call.retries < attempts:
            call.retries += 1
            if call.retries > 1:
                time.sleep(0.2)
            _attempt(call)
        if call.code == C.ABORTED:
            problems.append(f"{call.what}: still ABORTED after {attempts} retries with nothing else running "
                            f"(a lock left behind?): {call.message}")
        elif call.code not in ALLOWED:
            problems.append(f"retried {call.what}: {call.code.name}: {call.message}")
    return problems


def check(r: Round) -> list[str]:
    problems = []
    for name, ids in r.volume_ids.items():
        if len(ids) != 1:
            problems.append(f"name {name} got {len(ids)} volumes: {sorted(ids)}")
    for name, ids in r.snapshot_ids.items():
        if len(ids) != 1:
            problems.append(f"snapshot name {name} got {len(ids)} snapshots: {sorted(ids)}")
    ctl = r.client.controller
    listed = {e.volume.volume_id: e for e in ctl.ListVolumes(pb.ListVolumesRequest(), timeout=120).entries}
    for ids in r.volume_ids.values():
        for vid in ids - r.deleted:
            e = listed.get(vid)
            if e is None:
                problems.append(f"lost volume: {vid} was created, never deleted, and is not listed")
            elif e.HasField("status") and e.status.HasField("volume_condition") and e.status.volume_condition.abnormal:
                problems.append(f"volume {vid} is abnormal: {e.status.volume_condition.message}")
    if r.snapshots:
        snaps = {e.snapshot.snapshot_id: e.snapshot
                 for e in ctl.ListSnapshots(pb.ListSnapshotsRequest(), timeout=120).entries}
        for ids in r.snapshot_ids.values():
            for sid in ids - r.deleted:
                s = snaps.get(sid)
                if s is None:
                    problems.append(f"lost snapshot: {sid} was created, never deleted, and is not listed")
                elif not s.ready_to_use:
                    problems.append(f"snapshot {sid} is not ready to use after the race")
    # one volume per name, asked once more now that nothing races
    for name, ids in r.volume_ids.items():
        req = r.requests[name]
        if req.HasField("volume_content_source"):
            continue  # its source may be gone by now; the ID check above covers it
        try:
            again = ctl.CreateVolume(req, timeout=300).volume.volume_id
        except grpc.RpcError as e:
            problems.append(f"CreateVolume {name} after the race: {e.code().name}: {e.details()}")
            continue
        r.created.add(again)
        r.deleted.discard(again)
        if again not in ids:
            problems.append(f"name {name}: CreateVolume after the race gave {again}, the race gave {sorted(ids)}")
    return problems


def clean_up(r: Round) -> list[str]:
    """Delete every object this round's calls made (snapshots first); problems as sentences."""
    problems = []
    ctl = r.client.controller
    for oid in sorted(r.created):
        if oid not in {s for ids in r.snapshot_ids.values() for s in ids}:
            continue
        try:
            ctl.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=oid), timeout=300)
        except grpc.RpcError as e:
            problems.append(f"cleanup DeleteSnapshot {oid}: {e.code().name}: {e.details()}")
    for oid in sorted(r.created):
        if oid not in {v for ids in r.volume_ids.values() for v in ids}:
            continue
        try:
            ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=oid), timeout=300)
        except grpc.RpcError as e:
            problems.append(f"cleanup DeleteVolume {oid}: {e.code().name}: {e.details()}")
    return problems


def run_rounds(client: Client, rounds: int, snapshots: bool, leftovers: Callable[[], list[str]],
               seed: int = 12) -> dict[str, int]:
    """Race `rounds` rounds; raise AssertionError listing every problem. Returns counts of first-attempt codes."""
    counts: dict[str, int] = {}
    rng = random.Random(seed)
    for n in range(rounds):
        r = Round(client, f"race{n}-{rng.randrange(1 << 30):08x}", snapshots)
        calls = plan(r, rng)
        race(calls)
        for c in calls:
            counts[c.code.name] = counts.get(c.code.name, 0) + 1
        problems = [f"{c.what}: {c.code.name}: {c.message}" for c in calls if c.code not in ALLOWED]
        problems += retry_aborted(calls)
        problems += check(r)
        problems += clean_up(r)
        left = leftovers()
        if left:
            problems.append(f"left behind after deleting every object the calls made: {left}")
        assert not problems, f"round {n}:\n" + "\n".join(problems)
    return counts
