"""iSCSI backend end to end inside the guest: LIO exports, ControllerPublish grants the node's IQN with CHAP, the
node logs in with os-brick through the real open-iscsi initiator, and the core formats and mounts. Assertions are
what a user checks: bytes come back after a restage, a grown filesystem is bigger while mounted, detaching one
volume leaves another alone, and the target refuses a wrong secret or an unpublished node."""
from __future__ import annotations

import hashlib
import os
import subprocess

import grpc
import pytest

from csi._pb import csi_pb2 as pb
from tests.sanity.harness import MIB, mount_cap

from tests.e2e.inguest.iscsi.env import IscsiEnv, sessions
from tests.e2e.lio import LIO_PREFIX

def _create(env: IscsiEnv, name: str, size: int, cap) -> pb.Volume:
    return env.ledger.create_volume(pb.CreateVolumeRequest(
        name=name, capacity_range=pb.CapacityRange(required_bytes=size), volume_capabilities=[cap]))


def _paths(env: IscsiEnv, tag: str) -> tuple[str, str]:
    staging = os.path.join(env.workdir, f"stage-{tag}")
    os.makedirs(staging, exist_ok=True)
    return staging, os.path.join(env.workdir, f"pub-{tag}")


def _mount(env: IscsiEnv, vol: pb.Volume, cap, tag: str) -> str:
    staging, target = _paths(env, tag)
    pc = env.ledger.controller_publish(vol.volume_id, cap)
    assert pc.get("chapUser") and pc.get("chapPassword")
    assert not any("chap" in k.lower() for k in vol.volume_context)
    env.ledger.stage(vol, staging, cap, pc)
    env.ledger.publish(vol, staging, target, cap, publish_context=pc)
    return target


def _umount(env: IscsiEnv, vol: pb.Volume, tag: str, unpublish: bool = True) -> None:
    staging, target = _paths(env, tag)
    env.ledger.unpublish(vol.volume_id, target)
    env.ledger.unstage(vol.volume_id, staging)
    if unpublish:
        env.ledger.controller_unpublish(vol.volume_id)


def _write(path: str, seed: str, nbytes: int = MIB) -> str:
    data = hashlib.sha256(seed.encode()).digest() * (nbytes // 32)
    with open(path, "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _iqn(vol: pb.Volume) -> str:
    return vol.volume_context["targetIqn"]


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_write_unstage_restage_read_back(iscsi: IscsiEnv, fs: str) -> None:
    cap = mount_cap(fs)
    vol = _create(iscsi, f"data-{fs}", 320 * MIB if fs == "xfs" else 64 * MIB, cap)
    target = _mount(iscsi, vol, cap, fs)
    assert _iqn(vol) in sessions()
    digest = _write(os.path.join(target, "f"), fs)
    _umount(iscsi, vol, fs)
    assert _iqn(vol) not in sessions(), "unstage did not log out of the volume's only session"
    target = _mount(iscsi, vol, cap, fs)
    assert _digest(os.path.join(target, "f")) == digest
    _umount(iscsi, vol, fs)


def test_delete_refused_while_logged_in(iscsi: IscsiEnv) -> None:
    cap = mount_cap("ext4")
    vol = _create(iscsi, "busy", 64 * MIB, cap)
    _mount(iscsi, vol, cap, "busy")
    with pytest.raises(grpc.RpcError) as e:
        iscsi.client.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "logged in" in e.value.details()
    _umount(iscsi, vol, "busy")


def test_online_expand(iscsi: IscsiEnv) -> None:
    cap = mount_cap("ext4")
    vol = _create(iscsi, "grow", 64 * MIB, cap)
    target = _mount(iscsi, vol, cap, "grow")
    digest = _write(os.path.join(target, "f"), "grow")
    before = os.statvfs(target)
    resp = iscsi.client.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=192 * MIB), volume_capability=cap))
    assert resp.capacity_bytes >= 192 * MIB and resp.node_expansion_required
    staging, _ = _paths(iscsi, "grow")
    nresp = iscsi.client.node.NodeExpandVolume(pb.NodeExpandVolumeRequest(
        volume_id=vol.volume_id, volume_path=target, staging_target_path=staging,
        capacity_range=pb.CapacityRange(required_bytes=192 * MIB), volume_capability=cap))
    assert nresp.capacity_bytes >= 192 * MIB
    after = os.statvfs(target)
    assert after.f_blocks * after.f_frsize - before.f_blocks * before.f_frsize >= 100 * MIB
    assert _digest(os.path.join(target, "f")) == digest
    _umount(iscsi, vol, "grow")


def test_two_volumes_detach_independently(iscsi: IscsiEnv) -> None:
    """One target per volume means one session per volume: detaching one must leave the other logged in and
    readable, and detaching the last leaves no session at all."""
    cap = mount_cap("ext4")
    a = _create(iscsi, "pair-a", 64 * MIB, cap)
    b = _create(iscsi, "pair-b", 64 * MIB, cap)
    ta = _mount(iscsi, a, cap, "pair-a")
    tb = _mount(iscsi, b, cap, "pair-b")
    assert sessions() == sorted([_iqn(a), _iqn(b)])
    db = _write(os.path.join(tb, "f"), "b")
    _write(os.path.join(ta, "f"), "a")
    _umount(iscsi, a, "pair-a")
    assert sessions() == [_iqn(b)]
    with open(os.path.join(tb, "f"), "rb") as f:  # still there and readable after its neighbour left
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    assert _digest(os.path.join(tb, "f")) == db
    _umount(iscsi, b, "pair-b")
    assert sessions() == []


def test_target_refuses_wrong_secret_and_unpublished_node(iscsi: IscsiEnv) -> None:
    cap = mount_cap("ext4")
    vol = _create(iscsi, "guarded", 64 * MIB, cap)
    staging, _ = _paths(iscsi, "guarded")
    pc = iscsi.ledger.controller_publish(vol.volume_id, cap)
    bad = dict(pc, chapPassword="not-the-secret-at-all")
    with pytest.raises(grpc.RpcError) as e:
        iscsi.client.node.NodeStageVolume(pb.NodeStageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=staging, volume_capability=cap, publish_context=bad,
            volume_context=vol.volume_context))
    assert e.value.code() != grpc.StatusCode.OK and "not-the-secret" not in e.value.details()
    assert _iqn(vol) not in sessions()
    # unpublished: the right secret no longer gets in either
    iscsi.ledger.controller_unpublish(vol.volume_id)
    with pytest.raises(grpc.RpcError):
        iscsi.client.node.NodeStageVolume(pb.NodeStageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=staging, volume_capability=cap, publish_context=pc,
            volume_context=vol.volume_context))
    assert _iqn(vol) not in sessions()


def test_zz_nothing_left_exported(iscsi: IscsiEnv) -> None:
    """After every volume of this module is deleted, the target host exports nothing of ours: no LIO target, no
    backstore, no LV (an operator would find a leak here as an initiator still able to reach a deleted volume's
    bytes). Timings of these calls belong in bench/, not here."""
    import rtslib_fb
    root = rtslib_fb.RTSRoot()
    assert [t.wwn for t in root.targets if t.wwn.startswith(LIO_PREFIX)] == []
    assert [so.name for so in root.storage_objects if so.name.startswith("iv-")] == []
    lvs = subprocess.run(["lvs", "--noheadings", "-o", "lv_name", iscsi.vg.name], capture_output=True, text=True,
                         check=True).stdout.split()
    assert [lv for lv in lvs if lv.startswith("iv-")] == []
