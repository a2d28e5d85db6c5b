"""Data through the real server and the file backend: what a user stores must come back — after a restage, in a
restored snapshot, in a clone, after online growth, through a raw block device — and read-only must mean read-only.
Plus concurrency: racing COs never produce duplicate volumes, stray loop devices or half-made files.

Real loop devices and real mounts (the machine runs as root). ext4 *online* growth needs CAP_SYS_RESOURCE, which
this sandbox lacks; it is tested in the real-kernel guest (tests/e2e), xfs online growth is tested here.
"""
from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from csi._pb import csi_pb2 as pb  # noqa: E402
from tests.sanity.harness import MIB, ServerProcess, block_cap, mount_cap  # noqa: E402

C = grpc.StatusCode
NODE = "data-node"


def _require_tools() -> None:
    missing = [t for t in ("losetup", "mkfs.ext4", "mkfs.xfs", "xfs_growfs", "blkid", "mount") if not shutil.which(t)]
    if missing or os.geteuid() != 0:
        pytest.fail(f"MISSING: root and {', '.join(missing) or 'tools'} are required for the file data tests")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    _require_tools()
    srv = ServerProcess(str(tmp_path_factory.mktemp("filedata")), node_id=NODE).start()
    yield srv
    rc = srv.stop()
    assert rc == 0, f"server exit code {rc} after SIGTERM:\n{srv.log_tail()}"


def create(ledger, size: int, cap: pb.VolumeCapability, source: pb.VolumeContentSource | None = None,
           name: str | None = None) -> pb.Volume:
    req = pb.CreateVolumeRequest(name=name or f"data-{uuid.uuid4().hex[:10]}", volume_capabilities=[cap],
                                 capacity_range=pb.CapacityRange(required_bytes=size))
    if source is not None:
        req.volume_content_source.CopyFrom(source)
    return ledger.create_volume(req)


def attach(ledger, dirs, vol, cap, readonly: bool = False) -> tuple[str, str]:
    staging, target = dirs.staging(), dirs.target()
    ledger.stage(vol, staging, cap)
    ledger.publish(vol, staging, target, cap, readonly)
    return staging, target


def detach(ledger, vol, staging, target) -> None:
    ledger.unpublish(vol.volume_id, target)
    ledger.unstage(vol.volume_id, staging)


def pattern(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def write_tree(root: str, seed: int) -> dict[str, str]:
    """A few files of known content (one large, several small, one in a subdirectory); returns path → sha256."""
    files = {"big.bin": pattern(seed, 8 * MIB), "small.txt": f"tessera {seed}\n".encode(),
             "sub/dir/nested.bin": pattern(seed + 1, 123457)}
    out = {}
    for rel, data in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        out[rel] = hashlib.sha256(data).hexdigest()
    os.sync()
    return out


def read_tree(root: str, expected: dict[str, str]) -> None:
    for rel, digest in expected.items():
        with open(os.path.join(root, rel), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, f"{rel} changed"


FS = ["ext4", "xfs"]


def fs_size(fs: str) -> int:
    return 320 * MIB if fs == "xfs" else 64 * MIB  # mkfs.xfs wants >= 300 MiB


@pytest.mark.parametrize("fs", FS)
def test_data_survives_restage(ledger, dirs, fs):
    cap = mount_cap(fs)
    vol = create(ledger, fs_size(fs), cap)
    staging, target = attach(ledger, dirs, vol, cap)
    digests = write_tree(target, 1)
    detach(ledger, vol, staging, target)
    staging, target = attach(ledger, dirs, vol, cap)  # new staging and target paths, as after a pod moves
    read_tree(target, digests)
    assert not os.path.exists(os.path.join(target, "lost+found", "big.bin"))


@pytest.mark.parametrize("fs", FS)
def test_snapshot_restore_same_content(ledger, dirs, fs):
    cap = mount_cap(fs)
    vol = create(ledger, fs_size(fs), cap)
    staging, target = attach(ledger, dirs, vol, cap)
    digests = write_tree(target, 2)
    snap = ledger.create_snapshot(pb.CreateSnapshotRequest(source_volume_id=vol.volume_id,
                                                           name=f"data-snap-{uuid.uuid4().hex[:8]}"))
    assert snap.ready_to_use
    # the source changes after the snapshot: the restore must show the old content
    with open(os.path.join(target, "small.txt"), "wb") as f:
        f.write(b"changed after the snapshot\n")
    src = pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id))
    restored = create(ledger, fs_size(fs), cap, src)
    _, rtarget = attach(ledger, dirs, restored, cap)
    read_tree(rtarget, digests)


@pytest.mark.parametrize("fs", FS)
def test_clone_same_content(ledger, dirs, fs):
    cap = mount_cap(fs)
    vol = create(ledger, fs_size(fs), cap)
    staging, target = attach(ledger, dirs, vol, cap)
    digests = write_tree(target, 3)
    detach(ledger, vol, staging, target)  # a clone of a volume at rest (the CO's usual case)
    src = pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id=vol.volume_id))
    clone = create(ledger, fs_size(fs) * 2, cap, src)  # a bigger clone is allowed
    _, ctarget = attach(ledger, dirs, clone, cap)
    read_tree(ctarget, digests)
    with open(os.path.join(ctarget, "small.txt"), "wb") as f:
        f.write(b"clone diverges\n")
    staging, target = attach(ledger, dirs, vol, cap)
    read_tree(target, digests)  # the source is untouched by writes to the clone


def test_snapshot_restore_block(ledger, dirs, client):
    cap = block_cap()
    vol = create(ledger, 32 * MIB, cap)
    _, target = attach(ledger, dirs, vol, cap)
    data = pattern(4, 4 * MIB)
    write_device(target, 1 * MIB, data)
    snap = ledger.create_snapshot(pb.CreateSnapshotRequest(source_volume_id=vol.volume_id,
                                                           name=f"data-bsnap-{uuid.uuid4().hex[:8]}"))
    src = pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id))
    restored = create(ledger, 32 * MIB, cap, src)
    _, rtarget = attach(ledger, dirs, restored, cap)
    assert read_device(rtarget, 1 * MIB, len(data)) == data


def test_online_expand_xfs(ledger, dirs, client):
    cap = mount_cap("xfs")
    vol = create(ledger, 320 * MIB, cap)
    staging, target = attach(ledger, dirs, vol, cap)
    digests = write_tree(target, 5)
    before = os.statvfs(target)
    resp = client.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=640 * MIB), volume_capability=cap),
        timeout=120)
    assert resp.capacity_bytes >= 640 * MIB and resp.node_expansion_required
    got = client.node.NodeExpandVolume(pb.NodeExpandVolumeRequest(
        volume_id=vol.volume_id, volume_path=target, staging_target_path=staging, volume_capability=cap,
        capacity_range=pb.CapacityRange(required_bytes=640 * MIB)), timeout=120)
    assert got.capacity_bytes >= 640 * MIB
    after = os.statvfs(target)
    assert after.f_blocks * after.f_frsize >= before.f_blocks * before.f_frsize + 300 * MIB, \
        "the mounted filesystem did not see the new size"
    read_tree(target, digests)
    # the new space is usable
    with open(os.path.join(target, "fill.bin"), "wb") as f:
        for _ in range(40):
            f.write(b"\xa5" * (8 * MIB))
        os.fsync(f.fileno())
    stats = client.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id=vol.volume_id, volume_path=target),
                                           timeout=60)
    total = [u.total for u in stats.usage if u.unit == pb.VolumeUsage.BYTES][0]
    assert total >= before.f_blocks * before.f_frsize + 300 * MIB  # (xfs keeps its 64 MiB log out of f_blocks)


def test_offline_expand_then_stage(ledger, dirs, client):
    """Grown while not staged (CO's offline path): NodeStage + NodeExpand give the filesystem the new size."""
    cap = mount_cap("xfs")
    vol = create(ledger, 320 * MIB, cap)
    staging, target = attach(ledger, dirs, vol, cap)
    digests = write_tree(target, 6)
    detach(ledger, vol, staging, target)
    client.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=640 * MIB)), timeout=120)
    staging, target = dirs.staging(), dirs.target()
    ledger.stage(vol, staging, cap)
    client.node.NodeExpandVolume(pb.NodeExpandVolumeRequest(volume_id=vol.volume_id, volume_path=staging,
                                                            staging_target_path=staging), timeout=120)
    ledger.publish(vol, staging, target, cap)
    st = os.statvfs(target)
    assert st.f_blocks * st.f_frsize >= 500 * MIB  # 640 MiB less xfs's internal log
    read_tree(target, digests)


def write_device(path: str, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_device(path: str, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def device_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def test_raw_block(ledger, dirs, client):
    cap = block_cap()
    vol = create(ledger, 48 * MIB, cap)
    staging, target = attach(ledger, dirs, vol, cap)
    assert device_size(target) == vol.capacity_bytes == 48 * MIB
    head, tail = pattern(7, MIB), pattern(8, MIB)
    write_device(target, 0, head)
    write_device(target, 47 * MIB, tail)
    assert read_device(target, 0, MIB) == head
    out = subprocess.run(["blkid", "-p", target], capture_output=True, text=True)
    assert "TYPE=" not in out.stdout, "a raw block volume must not be formatted by the plugin"
    detach(ledger, vol, staging, target)
    staging, target = attach(ledger, dirs, vol, cap)
    assert read_device(target, 0, MIB) == head and read_device(target, 47 * MIB, MIB) == tail
    # block expansion: the device grows, the data stays
    client.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=96 * MIB)), timeout=120)
    client.node.NodeExpandVolume(pb.NodeExpandVolumeRequest(volume_id=vol.volume_id, volume_path=target,
                                                            staging_target_path=staging), timeout=120)
    assert device_size(target) == 96 * MIB
    assert read_device(target, 47 * MIB, MIB) == tail


@pytest.mark.parametrize("fs", FS)
def test_read_only_publish_refuses_writes(ledger, dirs, fs):
    cap = mount_cap(fs)
    vol = create(ledger, fs_size(fs), cap)
    staging, rw_target = attach(ledger, dirs, vol, cap)
    digests = write_tree(rw_target, 9)
    ledger.unpublish(vol.volume_id, rw_target)
    ro_target = dirs.target()
    ledger.publish(vol, staging, ro_target, cap, readonly=True)
    read_tree(ro_target, digests)
    for attempt in (lambda: open(os.path.join(ro_target, "new.txt"), "w"),
                    lambda: open(os.path.join(ro_target, "small.txt"), "r+b"),
                    lambda: os.mkdir(os.path.join(ro_target, "newdir")),
                    lambda: os.unlink(os.path.join(ro_target, "small.txt"))):
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS, info.value


def test_read_only_block_publish_refuses_writes(ledger, dirs):
    cap = block_cap()
    vol = create(ledger, 16 * MIB, cap)
    staging = dirs.staging()
    ledger.stage(vol, staging, cap)
    target = dirs.target()
    ledger.publish(vol, staging, target, cap, readonly=True)
    data_before = read_device(target, 0, 4096)
    try:
        fd = os.open(target, os.O_WRONLY)
    except OSError as e:
        assert e.errno in (errno.EROFS, errno.EACCES, errno.EPERM), e
        return
    try:
        with pytest.raises(OSError) as info:
            os.pwrite(fd, b"must not land", 0)
            os.fsync(fd)
        assert info.value.errno in (errno.EROFS, errno.EPERM, errno.EIO)
    finally:
        os.close(fd)
        assert read_device(target, 0, 4096) == data_before, "a read-only block publish let a write through"


# ---- concurrency -------------------------------------------------------------------------------------------------
def _code(fn):
    try:
        return fn(), None
    except grpc.RpcError as e:
        return None, e.code()


def _volume_dir(server) -> str:
    return os.path.join(server.state_dir, "file", "volumes")


def test_50_concurrent_creates_10_names(client, server, ledger):
    names = [f"race-{uuid.uuid4().hex[:8]}" for _ in range(10)]
    before = set(os.listdir(_volume_dir(server)))
    barrier = threading.Barrier(50)

    def one(i: int):
        name = names[i % 10]
        req = pb.CreateVolumeRequest(name=name, volume_capabilities=[mount_cap("ext4")],
                                     capacity_range=pb.CapacityRange(required_bytes=16 * MIB))
        barrier.wait()
        vol, code = _code(lambda: client.controller.CreateVolume(req, timeout=120).volume)
        return name, vol, code

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(one, range(50)))
    ids: dict[str, set[str]] = {}
    for name, vol, code in results:
        assert code in (None, C.ABORTED), f"{name}: {code}"
        if vol is not None:
            ids.setdefault(name, set()).add(vol.volume_id)
    for name in names:  # a CO retries ABORTED; every name ends up with exactly one volume
        req = pb.CreateVolumeRequest(name=name, volume_capabilities=[mount_cap("ext4")],
                                     capacity_range=pb.CapacityRange(required_bytes=16 * MIB))
        ids.setdefault(name, set()).add(ledger.create_volume(req).volume_id)
    assert all(len(v) == 1 for v in ids.values()), ids
    all_ids = {next(iter(v)) for v in ids.values()}
    assert len(all_ids) == 10
    listed = {e.volume.volume_id for e in client.controller.ListVolumes(pb.ListVolumesRequest(), timeout=60).entries}
    assert all_ids <= listed
    new = set(os.listdir(_volume_dir(server))) - before
    assert len([f for f in new if f.endswith(".img")]) == 10, sorted(new)
    assert len([f for f in new if f.endswith(".json")]) == 10, sorted(new)
    assert not [f for f in new if f.endswith(".tmp")], "half-made files left behind"


def _loops_for(path: str) -> list[str]:
    out = subprocess.run(["losetup", "--noheadings", "--output", "NAME", "-j", path], capture_output=True, text=True)
    return out.stdout.split()


def _mounts_at(path: str) -> int:
    with open("/proc/self/mountinfo") as f:
        return sum(1 for line in f if line.split()[4] == path)


def _race(n: int, fn):
    barrier = threading.Barrier(n)

    def one(_):
        barrier.wait()
        return _code(fn)
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_concurrent_calls_on_one_volume(client, ledger, dirs):
    cap = mount_cap("ext4")
    vol = create(ledger, 32 * MIB, cap)
    img = vol.volume_context["path"]
    staging, target = dirs.staging(), dirs.target()
    stage = pb.NodeStageVolumeRequest(volume_id=vol.volume_id, staging_target_path=staging, volume_capability=cap,
                                      volume_context=vol.volume_context)
    results = _race(20, lambda: client.node.NodeStageVolume(stage, timeout=120))
    codes = [c for _, c in results]
    assert set(codes) <= {None, C.ABORTED}, codes
    assert None in codes, "no NodeStageVolume succeeded"
    ledger.stage(vol, staging, cap)  # the CO's retry: idempotent, registers the cleanup
    assert len(_loops_for(img)) == 1, _loops_for(img)
    assert _mounts_at(staging) == 1

    publish = pb.NodePublishVolumeRequest(volume_id=vol.volume_id, staging_target_path=staging, target_path=target,
                                          volume_capability=cap, volume_context=vol.volume_context)
    results = _race(20, lambda: client.node.NodePublishVolume(publish, timeout=120))
    assert {c for _, c in results} <= {None, C.ABORTED}
    ledger.publish(vol, staging, target, cap)
    assert _mounts_at(target) == 1

    # expansion racing itself: one size wins, file, device and API agree
    sizes = [48 * MIB, 64 * MIB]
    results = _race(10, lambda: client.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=random.choice(sizes))), timeout=120))
    assert {c for _, c in results} <= {None, C.ABORTED}
    got = client.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=vol.volume_id), timeout=60)
    assert got.volume.capacity_bytes == os.stat(img).st_size
    assert got.volume.capacity_bytes in sizes

    unpublish = pb.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=target)
    results = _race(20, lambda: client.node.NodeUnpublishVolume(unpublish, timeout=120))
    assert {c for _, c in results} <= {None, C.ABORTED}
    ledger.unpublish(vol.volume_id, target)
    assert _mounts_at(target) == 0

    unstage = pb.NodeUnstageVolumeRequest(volume_id=vol.volume_id, staging_target_path=staging)
    results = _race(20, lambda: client.node.NodeUnstageVolume(unstage, timeout=120))
    assert {c for _, c in results} <= {None, C.ABORTED}
    ledger.unstage(vol.volume_id, staging)
    assert _mounts_at(staging) == 0 and _loops_for(img) == []

    delete = pb.DeleteVolumeRequest(volume_id=vol.volume_id)
    results = _race(20, lambda: client.controller.DeleteVolume(delete, timeout=120))
    assert {c for _, c in results} <= {None, C.ABORTED}
    ledger.delete_volume(vol.volume_id)
    assert not os.path.exists(img)
    assert not os.path.exists(img[:-4] + ".json")
    expect = client.controller.ControllerGetVolume
    with pytest.raises(grpc.RpcError) as info:
        expect(pb.ControllerGetVolumeRequest(volume_id=vol.volume_id), timeout=60)
    assert info.value.code() == C.NOT_FOUND


def test_concurrent_snapshots_of_one_volume(client, ledger):
    cap = mount_cap("ext4")
    vol = create(ledger, 16 * MIB, cap)
    name = f"race-snap-{uuid.uuid4().hex[:8]}"
    req = pb.CreateSnapshotRequest(source_volume_id=vol.volume_id, name=name)
    results = _race(20, lambda: client.controller.CreateSnapshot(req, timeout=120).snapshot)
    assert {c for _, c in results} <= {None, C.ABORTED}
    ids = {s.snapshot_id for s, _ in results if s is not None}
    assert len(ids) <= 1
    snap = ledger.create_snapshot(req)
    assert ids <= {snap.snapshot_id}
    listed = [e.snapshot for e in client.controller.ListSnapshots(pb.ListSnapshotsRequest(
        source_volume_id=vol.volume_id), timeout=60).entries]
    assert [s.snapshot_id for s in listed] == [snap.snapshot_id]
