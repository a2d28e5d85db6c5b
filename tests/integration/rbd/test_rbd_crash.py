"""Crash safety of RBD CreateVolume: `tessera-csi serve` is killed with SIGKILL at random points of a create loop
(plain volumes and clones), restarted, and every name retried, as a CO does. Afterwards the pool must hold exactly
one committed image per name, at its deterministic name, with nothing half-made left over: no image lost, none
duplicated, none orphaned, and no leftover RBD snapshot on the clone source."""
from __future__ import annotations

import os
import random
import threading
import time

import grpc
import pytest
import rbd
import yaml

from backends.base import object_uuid
from csi._pb import csi_pb2 as pb
from tests.ceph.rbdutil import records
from tests.sanity.harness import Client, ServerProcess, mount_cap

pytestmark = pytest.mark.ceph
MIB = 1 << 20
DRIVER = "tessera.csi.dev"
LEASE = 30  # the backend's lockLease: how long a killed server's operation lock outlives it


def _request(name: str, source_id: str | None) -> pb.CreateVolumeRequest:
    req = pb.CreateVolumeRequest(name=name, capacity_range=pb.CapacityRange(required_bytes=16 * MIB),
                                 volume_capabilities=[mount_cap("ext4")], parameters={"backend": "ceph"})
    if source_id:
        req.volume_content_source.volume.volume_id = source_id
    return req


def test_kill_9_during_creates_loses_duplicates_and_orphans_nothing(ceph_cluster, tmp_path, admin_io):
    run_tag = os.urandom(3).hex()
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"backends": {"ceph": {
        "type": "rbd", "monitors": [ceph_cluster.monitors], "user": ceph_cluster.csi_user,
        "keyringPath": ceph_cluster.csi_keyring, "pool": ceph_cluster.pool, "opTimeout": 10,
        "lockLease": LEASE}}}))
    workdir = str(tmp_path / "server")
    names = [f"crash-{run_tag}-{i:03d}" for i in range(36)]
    rng = random.Random(int(run_tag, 16))

    server = ServerProcess(workdir, config=str(cfg), node_id="crash-node").start()
    client = Client(server.endpoint, timeout=60)
    source = client.controller.CreateVolume(_request(f"crash-{run_tag}-src", None), timeout=60).volume
    pattern = os.urandom(4096)
    with rbd.Image(admin_io, source.volume_context["image"]) as img:
        img.write(pattern, 0)
        img.flush()

    answered: dict[str, str] = {}  # name -> volume id the plugin returned before a crash

    interrupted = []  # calls that were in flight when the server died

    def loop(c: Client, part: int) -> None:
        for i, n in enumerate(names):
            if n in answered or i % 3 != part:
                continue
            try:
                v = c.controller.CreateVolume(_request(n, source.volume_id if i % 3 == 0 else None), timeout=30).volume
            except grpc.RpcError:
                interrupted.append(n)
                return  # the server died under us
            answered[n] = v.volume_id

    kills = 0
    for _ in range(8):
        workers = [threading.Thread(target=loop, args=(client, part)) for part in range(3)]
        for w in workers:
            w.start()
        time.sleep(rng.uniform(0.005, 0.08))
        server.proc.kill()  # SIGKILL: no cleanup of any kind
        server.proc.wait()
        kills += 1
        for w in workers:
            w.join(60)
        client.close()
        server.stop()
        server = ServerProcess(workdir, config=str(cfg), node_id="crash-node").start()
        client = Client(server.endpoint, timeout=60)
    assert kills == 8 and interrupted, "no call was in flight at any kill: the test did not test anything"
    # the CO retries every name until it succeeds
    final: dict[str, str] = {}
    for i, n in enumerate(names):
        req = _request(n, source.volume_id if i % 3 == 0 else None)
        final[n] = _retry_aborted(lambda: client.controller.CreateVolume(req, timeout=60)).volume.volume_id
    # none lost: what the plugin answered before a crash is still what it answers now
    for n, vid in answered.items():
        assert final[n] == vid
    # none duplicated or orphaned: the pool holds exactly the expected images, each committed with its name
    expected = {"tessera-vol-" + object_uuid(DRIVER, n): n for n in names}
    expected["tessera-vol-" + object_uuid(DRIVER, f"crash-{run_tag}-src")] = f"crash-{run_tag}-src"
    ours = {}
    for image in rbd.RBD().list(admin_io):
        if not image.startswith("tessera-vol-"):
            continue
        try:
            with rbd.Image(admin_io, image, read_only=True):
                stored = records(admin_io, image).get("tessera.name")
        except rbd.ImageNotFound:
            pytest.fail(f"image {image} is listed in the pool but cannot be opened: remains of a killed create")
        if stored is not None and stored.startswith(f"crash-{run_tag}-"):
            ours[image] = stored
        elif image in expected:
            pytest.fail(f"image {image} for {expected[image]} was left uncommitted")
    assert ours == expected
    for i, n in enumerate(names):
        if i % 3 == 0:  # clones carry the source's data
            with rbd.Image(admin_io, final[n].rpartition(".")[2], read_only=True) as img:
                assert img.read(0, len(pattern)) == pattern
    with rbd.Image(admin_io, source.volume_context["image"], read_only=True) as img:
        user_snaps = [s["name"] for s in img.list_snaps() if s["namespace"] == rbd.RBD_SNAP_NAMESPACE_TYPE_USER]
        assert user_snaps == []  # no clone-helper snapshot left behind (trashed ones belong to the live clones)
    # and everything deletes cleanly
    for vid in list(final.values()) + [source.volume_id]:
        _retry_aborted(lambda: client.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid), timeout=60))
    # (`rbd ls` also lists images whose removal was interrupted: they sit in the trash as REMOVING, which
    # trash_list() hides; `left` below catches them.)
    left = [i for i in rbd.RBD().list(admin_io) if i in expected]
    assert left == [], (f"images left after DeleteVolume returned OK: {[_describe(admin_io, i) for i in left]}\n"
                        + "".join(l for l in open(server.log_path) if any(i in l for i in left)))
    client.close()
    server.stop()


def _retry_aborted(call, patience: float = LEASE + 60):
    """Call until it is not ABORTED, as the CO does. ABORTED is the spec's answer while another operation holds
    the object, and a killed server's operation holds its lease lock (backends/rbd_locks.py) until the lease runs
    out (`lockLease`, 30 s by default) — a create of the name or a delete of the volume made in that window is
    refused. Patience is one lease plus a margin: a lock that outlives it is a leak, and the test fails."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return call()
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.ABORTED or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _describe(io, image: str) -> str:
    """What the cluster holds for a name: header, id object, trash state (for a useful failure message)."""
    parts = [image]
    try:
        with rbd.Image(io, image, read_only=True) as img:
            parts.append(f"opens: id={img.id()} snaps={list(img.list_snaps())} children={img.list_children2()}")
    except rbd.Error as e:
        parts.append(f"open fails: {type(e).__name__}: {e}")
    try:
        parts.append(f"rbd_id={io.read('rbd_id.' + image)!r}")
    except Exception as e:  # noqa: BLE001
        parts.append(f"no rbd_id: {type(e).__name__}")
    import struct
    try:
        parts.append(f"directory id={io.execute('rbd_directory', 'rbd', 'dir_get_id', struct.pack('<I', len(image)) + image.encode())[1]!r}")
    except Exception as e:  # noqa: BLE001
        parts.append(f"not in directory: {type(e).__name__}")
    parts.append(f"trash={[(t['name'], t['source']) for t in rbd.RBD().trash_list(io)]}")
    return "; ".join(parts)
