"""Group snapshots through the real server and the file backend, with real loop devices and mounted ext4: a group
of three volumes cut while a writer appends numbered records to a file on each, in lockstep, is write-order
consistent (each restored member holds a prefix of the one write sequence, and the three prefixes fit together as
one instant of it); the writer goes on after each group (every filesystem was thawed); a raw block member that
cannot be paused is refused with FAILED_PRECONDITION before anything is frozen.

Why the prefix check, not "all three end at the same record": the writer writes record n to A, then B, then C, so
an instant may fall between them; what a consistent group can show is (A, B, C) = (n, n, n), (n, n-1, n-1) or
(n, n, n-1) — never a member ahead of one written before it, and never more than one record apart."""
from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
import uuid

import grpc
import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from csi._pb import csi_pb2 as pb  # noqa: E402
from csi._pb import csi_pb2_grpc as rpc  # noqa: E402
from tests.sanity.harness import MIB, Ledger, ServerProcess, block_cap, mount_cap  # noqa: E402

C = grpc.StatusCode
RECORD = 9  # "%08d\n"
SIZE = 64 * MIB


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    missing = [t for t in ("losetup", "mkfs.ext4", "mount") if not shutil.which(t)]
    if missing or os.geteuid() != 0:
        pytest.fail(f"MISSING: root and {', '.join(missing) or 'tools'} are required for the group snapshot tests")
    srv = ServerProcess(str(tmp_path_factory.mktemp("groupdata")), node_id="group-node").start()
    yield srv
    rc = srv.stop()
    assert rc == 0, f"server exit code {rc} after SIGTERM:\n{srv.log_tail()}"


@pytest.fixture
def groups(client):
    return rpc.GroupControllerStub(client.channel)


def create(ledger: Ledger, cap, source=None) -> pb.Volume:
    return ledger.create_volume(pb.CreateVolumeRequest(
        name=f"group-data-{uuid.uuid4().hex[:8]}", capacity_range=pb.CapacityRange(required_bytes=SIZE),
        volume_capabilities=[cap], volume_content_source=source))


def attach(ledger: Ledger, tmp_path, vol: pb.Volume, cap) -> str:
    staging = tmp_path / f"staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    pod = tmp_path / f"pod-{uuid.uuid4().hex[:8]}"
    pod.mkdir()
    ledger.stage(vol, str(staging), cap)
    ledger.publish(vol, str(staging), str(pod / "target"), cap)
    return str(pod / "target")


def group_snapshot(ledger: Ledger, groups, volume_ids: list[str]) -> pb.VolumeGroupSnapshot:
    group = groups.CreateVolumeGroupSnapshot(pb.CreateVolumeGroupSnapshotRequest(
        name=f"group-{uuid.uuid4().hex[:8]}", source_volume_ids=volume_ids), timeout=300).group_snapshot
    gid = group.group_snapshot_id
    ledger.push("group " + gid, lambda: groups.DeleteVolumeGroupSnapshot(
        pb.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=gid), timeout=300))
    return group


class LockstepWriter(threading.Thread):
    """Appends record n to each file in turn (A, B, C), then n+1, until stopped."""

    def __init__(self, paths: list[str]) -> None:
        super().__init__(daemon=True)
        self.fds = [os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) for p in paths]
        self.done = 0  # complete rounds
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            n = 0
            while not self.stop.is_set():
                n += 1
                rec = b"%08d\n" % n
                for fd in self.fds:
                    assert os.write(fd, rec) == RECORD
                self.done = n
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e
        finally:
            for fd in self.fds:
                os.close(fd)

    def wait_for(self, rounds: int, limit: float = 120.0) -> None:
        """Until `rounds` more rounds are written (the writer is not blocked on a frozen filesystem)."""
        goal = self.done + rounds
        end = time.monotonic() + limit
        while self.done < goal and self.error is None and time.monotonic() < end:
            time.sleep(0.01)
        assert self.error is None, self.error
        assert self.done >= goal, f"the writer stopped at record {self.done}: a member filesystem stayed frozen?"


def last_record(data: bytes) -> int:
    """The number of the last record in a file that must hold exactly records 1..n, in order and whole."""
    assert len(data) % RECORD == 0, f"a torn record at the end ({len(data)} bytes)"
    n = len(data) // RECORD
    assert data == b"".join(b"%08d\n" % i for i in range(1, n + 1)), "the records are not 1..n in order"
    return n


def test_group_of_three_written_in_lockstep_is_consistent(ledger, groups, tmp_path):
    cap = mount_cap("ext4")
    vols = [create(ledger, cap) for _ in range(3)]
    targets = [attach(ledger, tmp_path, v, cap) for v in vols]
    writer = LockstepWriter([os.path.join(t, "log") for t in targets])
    writer.start()
    cut: list[pb.VolumeGroupSnapshot] = []
    try:
        for _ in range(3):
            writer.wait_for(2000)
            cut.append(group_snapshot(ledger, groups, [v.volume_id for v in vols]))
        writer.wait_for(2000)  # every member was thawed
    finally:
        writer.stop.set()
        writer.join(60)
    assert writer.error is None, writer.error
    by_volume = {v.volume_id: i for i, v in enumerate(vols)}
    for group in cut:
        assert group.ready_to_use and len(group.snapshots) == 3
        counts = [0, 0, 0]
        for s in group.snapshots:
            assert s.group_snapshot_id == group.group_snapshot_id
            src = pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=s.snapshot_id))
            restored = create(ledger, cap, src)
            target = attach(ledger, tmp_path, restored, cap)
            try:
                with open(os.path.join(target, "log"), "rb") as f:
                    counts[by_volume[s.source_volume_id]] = last_record(f.read())
            except FileNotFoundError:
                pass  # no record reached this member's copy: 0, which the checks below refuse
        a, b, c = counts
        assert a > 0, "the group was cut after records were written"
        assert a >= b >= c >= a - 1, f"members at records {counts}: not one instant of the write sequence"


def test_raw_block_member_is_refused(ledger, groups, tmp_path):
    mounted = create(ledger, mount_cap("ext4"))
    attach(ledger, tmp_path, mounted, mount_cap("ext4"))
    block = create(ledger, block_cap())
    target = attach(ledger, tmp_path, block, block_cap())
    with pytest.raises(grpc.RpcError) as err:
        groups.CreateVolumeGroupSnapshot(pb.CreateVolumeGroupSnapshotRequest(
            name=f"group-{uuid.uuid4().hex[:8]}", source_volume_ids=[mounted.volume_id, block.volume_id]),
            timeout=300)
    assert err.value.code() == C.FAILED_PRECONDITION, err.value.details()
    assert "raw block" in err.value.details()
    # nothing stayed frozen: the mounted member takes writes, and the block device too
    staging_files = os.path.join(target)
    fd = os.open(staging_files, os.O_WRONLY)
    try:
        assert os.pwrite(fd, b"x" * 4096, 0) == 4096
    finally:
        os.close(fd)


def test_a_create_killed_while_frozen_is_thawed_by_its_retry(ledger, groups, tmp_path):
    """The state a kill -9 inside the freeze leaves: a member filesystem frozen and the marker naming it. The retry
    of the same create thaws it first (instead of meeting EBUSY forever) and cuts the group."""
    import fcntl
    cap = mount_cap("ext4")
    vol = create(ledger, cap)
    target = attach(ledger, tmp_path, vol, cap)
    name = f"group-{uuid.uuid4().hex[:8]}"
    req = pb.CreateVolumeGroupSnapshotRequest(name=name, source_volume_ids=[vol.volume_id])
    gid = groups.CreateVolumeGroupSnapshot(req, timeout=300).group_snapshot.group_snapshot_id
    groups.DeleteVolumeGroupSnapshot(pb.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=gid), timeout=300)
    backend_dir = os.path.dirname(os.path.dirname(vol.volume_context["path"]))
    marker = os.path.join(backend_dir, "groups", f".{gid.partition(':')[2]}.frozen.json")
    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with open(marker, "w") as f:
            json.dump({"frozen": [{"mountpoint": target, "dev": os.fstat(fd).st_dev}]}, f)
        fcntl.ioctl(fd, 0xC0045877, 0)  # FIFREEZE, as the killed create had done
        try:
            group = groups.CreateVolumeGroupSnapshot(req, timeout=300).group_snapshot
        finally:
            try:
                fcntl.ioctl(fd, 0xC0045878, 0)  # FITHAW: must already be thawed, EINVAL then
                thawed_by_us = True
            except OSError:
                thawed_by_us = False
    finally:
        os.close(fd)
    ledger.push("group " + gid, lambda: groups.DeleteVolumeGroupSnapshot(
        pb.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=gid), timeout=300))
    assert not thawed_by_us, "the retry left the filesystem frozen"
    assert group.group_snapshot_id == gid and len(group.snapshots) == 1
    assert not os.path.exists(marker)
    with open(os.path.join(target, "after"), "wb") as f:  # writable: thawed
        f.write(b"x")
        os.fsync(f.fileno())
