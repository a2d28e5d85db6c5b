"""LVM backend data tests, run inside the e2e guest (real device-mapper, real ext4/xfs, real LVM).

Everything goes through a real `tessera-csi serve --mode all` over gRPC, as the kubelet and the external-provisioner
would drive it; the assertions are what a user checks: bytes written come back after a restage, a snapshot holds the
old bytes, a clone is independent, a grown filesystem is bigger while mounted, capacity moves by what was created,
and LVM itself (lvs) holds the request name — the truth lives in the storage.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess

import grpc
import pytest

from csi._pb import csi_pb2 as pb
from tests.sanity.harness import CTRL, MIB, block_cap, expect_code, mount_cap

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conftest import LvmEnv

TOPO_KEY = "topology.tessera.csi.dev/node"


def _create(env: LvmEnv, name: str, size: int, cap: pb.VolumeCapability, source=None, **kw) -> pb.Volume:
    req = pb.CreateVolumeRequest(name=name, capacity_range=pb.CapacityRange(required_bytes=size),
                                 volume_capabilities=[cap], **kw)
    if source is not None:
        req.volume_content_source.CopyFrom(source)
    return env.ledger.create_volume(req)


def _mount(env: LvmEnv, vol: pb.Volume, cap: pb.VolumeCapability, tag: str) -> str:
    staging = os.path.join(env.workdir, f"stage-{tag}")
    target = os.path.join(env.workdir, f"pub-{tag}")
    os.makedirs(staging, exist_ok=True)
    env.ledger.stage(vol, staging, cap)
    env.ledger.publish(vol, staging, target, cap)
    return target


def _umount(env: LvmEnv, vol: pb.Volume, tag: str) -> None:
    env.ledger.unpublish(vol.volume_id, os.path.join(env.workdir, f"pub-{tag}"))
    env.ledger.unstage(vol.volume_id, os.path.join(env.workdir, f"stage-{tag}"))


def _write(path: str, nbytes: int, seed: str) -> str:
    data = hashlib.sha256(seed.encode()).digest() * (nbytes // 32)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _size_for(fs: str) -> int:
    return 320 * MIB if fs == "xfs" else 64 * MIB


def _lv_of(env: LvmEnv, vol: pb.Volume) -> dict:
    out = subprocess.run(["lvs", "--reportformat", "json", "-o", "lv_name,lv_tags,lv_size,pool_lv", "--units", "b",
                          "--nosuffix", env.vg.name], capture_output=True, text=True, check=True).stdout
    lvs = {lv["lv_name"]: lv for lv in json.loads(out)["report"][0]["lv"]}
    return lvs[vol.volume_id.split(":", 1)[1]]


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_write_restage_read_back(lvm: LvmEnv, fs: str) -> None:
    cap = mount_cap(fs)
    vol = _create(lvm, f"data-{fs}", _size_for(fs), cap)
    assert vol.volume_context["volumeGroup"] == lvm.vg.name
    assert [dict(t.segments) for t in vol.accessible_topology] == [{TOPO_KEY: lvm.node}]
    lv = _lv_of(lvm, vol)
    assert f"tessera.name=data-{fs}" in lv["lv_tags"].split(","), "request name is stored on the LV"
    assert (lv["pool_lv"] == "pool") == lvm.thin
    target = _mount(lvm, vol, cap, fs)
    src = subprocess.run(["findmnt", "-n", "-o", "SOURCE,FSTYPE", "--target", target], capture_output=True,
                         text=True, check=True).stdout.split()
    assert src[1] == fs
    # mounted from Tessera's device-mapper layer over the LV (lsblk shows the LV, then the layer, then the mount)
    layer = os.path.realpath(f"/dev/mapper/tessera-{lvm.vg.name.replace('-', '--')}-{lv['lv_name'].replace('-', '--')}")
    assert os.path.realpath(src[0]) == layer
    lv_dev = os.path.basename(os.path.realpath(f"/dev/{lvm.vg.name}/{lv['lv_name']}"))
    assert os.listdir(f"/sys/class/block/{os.path.basename(layer)}/slaves") == [lv_dev]
    want = _write(os.path.join(target, "payload"), 4 * MIB, fs)
    _umount(lvm, vol, fs)
    target = _mount(lvm, vol, cap, fs)
    assert _digest(os.path.join(target, "payload")) == want
    _umount(lvm, vol, fs)


def test_block_volume_round_trip(lvm: LvmEnv) -> None:
    cap = block_cap()
    vol = _create(lvm, "raw", 16 * MIB, cap)
    dev = _mount(lvm, vol, cap, "raw")
    want = _write(dev, 1 * MIB, "raw")
    _umount(lvm, vol, "raw")
    dev = _mount(lvm, vol, cap, "raw")
    with open(dev, "rb") as f:
        assert hashlib.sha256(f.read(1 * MIB)).hexdigest() == want
    _umount(lvm, vol, "raw")


def test_snapshot_and_restore(lvm: LvmEnv) -> None:
    cap = mount_cap("ext4")
    vol = _create(lvm, "snap-src", 64 * MIB, cap)
    if not lvm.thin:
        assert CTRL.Value("CREATE_DELETE_SNAPSHOT") not in lvm.client.controller_caps()
        err = expect_code(lvm.client.controller.CreateSnapshot,
                          pb.CreateSnapshotRequest(source_volume_id=vol.volume_id, name="nope"),
                          grpc.StatusCode.INVALID_ARGUMENT)
        assert "snapshot" in err.details()
        return
    target = _mount(lvm, vol, cap, "ssrc")
    old = _write(os.path.join(target, "f"), 2 * MIB, "old")
    snap = lvm.ledger.create_snapshot(pb.CreateSnapshotRequest(source_volume_id=vol.volume_id, name="snap-1"))
    assert snap.ready_to_use and snap.size_bytes == vol.capacity_bytes
    again = lvm.client.controller.CreateSnapshot(pb.CreateSnapshotRequest(source_volume_id=vol.volume_id,
                                                                          name="snap-1")).snapshot
    assert again.snapshot_id == snap.snapshot_id
    new = _write(os.path.join(target, "f"), 2 * MIB, "new")
    assert new != old
    restored = _create(lvm, "restored", 64 * MIB, cap,
                       source=pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(
                           snapshot_id=snap.snapshot_id)))
    assert restored.content_source.snapshot.snapshot_id == snap.snapshot_id
    rtarget = _mount(lvm, restored, cap, "restored")
    assert _digest(os.path.join(rtarget, "f")) == old
    assert _digest(os.path.join(target, "f")) == new
    _umount(lvm, restored, "restored")
    _umount(lvm, vol, "ssrc")
    # the snapshot outlives its source volume (thin snapshots are independent)
    lvm.ledger.delete_volume(vol.volume_id)
    listed = lvm.client.controller.ListSnapshots(pb.ListSnapshotsRequest(snapshot_id=snap.snapshot_id)).entries
    assert [e.snapshot.snapshot_id for e in listed] == [snap.snapshot_id]


def test_clone_is_independent_copy(lvm: LvmEnv) -> None:
    cap = mount_cap("ext4")
    vol = _create(lvm, "clone-src", 64 * MIB, cap)
    target = _mount(lvm, vol, cap, "csrc")
    old = _write(os.path.join(target, "f"), 2 * MIB, "clone-old")
    # clone while the source is mounted and in use: the copy is one point in time
    clone = _create(lvm, "clone", 96 * MIB, cap,
                    source=pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id=vol.volume_id)))
    assert clone.capacity_bytes >= 96 * MIB
    _write(os.path.join(target, "f"), 2 * MIB, "clone-new")
    ctarget = _mount(lvm, clone, cap, "clone")
    assert _digest(os.path.join(ctarget, "f")) == old
    _write(os.path.join(ctarget, "g"), 1 * MIB, "only-in-clone")
    assert not os.path.exists(os.path.join(target, "g"))
    _umount(lvm, clone, "clone")
    _umount(lvm, vol, "csrc")


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_online_expand(lvm: LvmEnv, fs: str) -> None:
    cap = mount_cap(fs)
    size = _size_for(fs)
    vol = _create(lvm, f"grow-{fs}", size, cap)
    target = _mount(lvm, vol, cap, f"grow-{fs}")
    _write(os.path.join(target, "f"), 1 * MIB, "grow")
    before = os.statvfs(target)
    new_size = size + 128 * MIB
    resp = lvm.client.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=new_size), volume_capability=cap))
    assert resp.capacity_bytes >= new_size and resp.node_expansion_required
    assert int(_lv_of(lvm, vol)["lv_size"]) >= new_size
    nresp = lvm.client.node.NodeExpandVolume(pb.NodeExpandVolumeRequest(
        volume_id=vol.volume_id, volume_path=target, capacity_range=pb.CapacityRange(required_bytes=new_size),
        staging_target_path=os.path.join(lvm.workdir, f"stage-grow-{fs}"),
        volume_capability=cap))
    assert nresp.capacity_bytes >= new_size
    after = os.statvfs(target)
    grown = (after.f_blocks * after.f_frsize) - (before.f_blocks * before.f_frsize)
    assert grown >= 100 * MIB, f"filesystem grew by only {grown} bytes while mounted"
    assert _digest(os.path.join(target, "f")) == hashlib.sha256(hashlib.sha256(b"grow").digest() * (MIB // 32)).hexdigest()
    _umount(lvm, vol, f"grow-{fs}")


def test_capacity_moves_with_create_and_delete(lvm: LvmEnv) -> None:
    def available() -> int:
        return lvm.client.controller.GetCapacity(pb.GetCapacityRequest(
            accessible_topology=pb.Topology(segments={TOPO_KEY: lvm.node}))).available_capacity

    other = lvm.client.controller.GetCapacity(pb.GetCapacityRequest(
        accessible_topology=pb.Topology(segments={TOPO_KEY: "some-other-node"}))).available_capacity
    assert other == 0, "another node's capacity is not ours to report"
    before = available()
    vol = _create(lvm, "cap", 200 * MIB, mount_cap("ext4"))
    assert before - available() == vol.capacity_bytes == 200 * MIB
    lvm.ledger.delete_volume(vol.volume_id)
    assert available() == before


def test_topology_and_idempotency(lvm: LvmEnv) -> None:
    cap = mount_cap("ext4")
    req = dict(name="topo", capacity_range=pb.CapacityRange(required_bytes=32 * MIB), volume_capabilities=[cap])
    expect_code(lvm.client.controller.CreateVolume, pb.CreateVolumeRequest(
        accessibility_requirements=pb.TopologyRequirement(requisite=[pb.Topology(segments={TOPO_KEY: "elsewhere"})]),
        **req), grpc.StatusCode.RESOURCE_EXHAUSTED)
    here = pb.TopologyRequirement(requisite=[pb.Topology(segments={TOPO_KEY: "elsewhere"}),
                                             pb.Topology(segments={TOPO_KEY: lvm.node})],
                                  preferred=[pb.Topology(segments={TOPO_KEY: lvm.node})])
    v1 = lvm.ledger.create_volume(pb.CreateVolumeRequest(accessibility_requirements=here, **req))
    v2 = lvm.client.controller.CreateVolume(pb.CreateVolumeRequest(accessibility_requirements=here, **req)).volume
    assert v1.volume_id == v2.volume_id
    bigger = dict(req, capacity_range=pb.CapacityRange(required_bytes=64 * MIB))
    expect_code(lvm.client.controller.CreateVolume, pb.CreateVolumeRequest(**bigger), grpc.StatusCode.ALREADY_EXISTS)
    # a restarted controller finds the volume from LVM alone (no database)
    lvm.restart()
    ids = [e.volume.volume_id for e in lvm.client.controller.ListVolumes(pb.ListVolumesRequest()).entries]
    assert v1.volume_id in ids


def test_out_of_space_and_out_of_range(lvm: LvmEnv) -> None:
    """Bigger than the backend could ever hold: OUT_OF_RANGE; could fit but not now: RESOURCE_EXHAUSTED."""
    cap = lvm.client.controller.GetCapacity(pb.GetCapacityRequest())
    maximum = cap.maximum_volume_size.value
    assert 0 < cap.available_capacity <= maximum
    expect_code(lvm.client.controller.CreateVolume, pb.CreateVolumeRequest(
        name="huge", capacity_range=pb.CapacityRange(required_bytes=maximum + (1 << 30)),
        volume_capabilities=[mount_cap()]), grpc.StatusCode.OUT_OF_RANGE)
    half = _create(lvm, "half", (cap.available_capacity // 2) // (4 * MIB) * (4 * MIB), mount_cap())
    left = lvm.client.controller.GetCapacity(pb.GetCapacityRequest()).available_capacity
    assert left < maximum
    expect_code(lvm.client.controller.CreateVolume, pb.CreateVolumeRequest(
        name="too-much", capacity_range=pb.CapacityRange(required_bytes=left + 4 * MIB),
        volume_capabilities=[mount_cap()]), grpc.StatusCode.RESOURCE_EXHAUSTED)
    lvm.ledger.delete_volume(half.volume_id)
