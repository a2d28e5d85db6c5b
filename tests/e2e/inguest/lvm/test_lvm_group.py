"""LVM group snapshots in the e2e guest (real device-mapper, thin pool, ext4), through a real `tessera-csi serve`:

- three thin volumes written in lockstep (record n to A, then B, then C) while groups are cut: every restored
  member holds records 1..n in order, and the three fit one instant of the write sequence (see
  tests/integration/test_group_snapshot_file.py for why that is (n, n, n), (n, n-1, n-1) or (n, n, n-1)); the
  writer goes on after each cut (every member was resumed);
- a staged volume is used through Tessera's own device-mapper layer over its LV, which goes with the unstage;
- a member whose LV is open without that layer cannot be paused: FAILED_PRECONDITION, and nothing is left paused;
- a thick backend does not offer group snapshots at all (the capability is not advertised)."""
from __future__ import annotations

import json
import os
import subprocess
import uuid

import grpc

from csi._pb import csi_pb2 as pb
from csi._pb import csi_pb2_grpc as rpc
from tests.integration.test_group_snapshot_file import LockstepWriter, last_record
from tests.sanity.harness import MIB, expect_code, mount_cap

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conftest import LvmEnv

SIZE = 64 * MIB


def _create(env: "LvmEnv", cap, source=None) -> pb.Volume:
    return env.ledger.create_volume(pb.CreateVolumeRequest(
        name=f"grp-{uuid.uuid4().hex[:8]}", capacity_range=pb.CapacityRange(required_bytes=SIZE),
        volume_capabilities=[cap], volume_content_source=source))


def _attach(env: "LvmEnv", vol: pb.Volume, cap) -> str:
    tag = uuid.uuid4().hex[:8]
    staging = os.path.join(env.workdir, f"gstage-{tag}")
    os.makedirs(staging)
    target = os.path.join(env.workdir, f"gpub-{tag}")
    env.ledger.stage(vol, staging, cap)
    env.ledger.publish(vol, staging, target, cap)
    return target


def _group(env: "LvmEnv", groups, volume_ids: list[str]) -> pb.VolumeGroupSnapshot:
    group = groups.CreateVolumeGroupSnapshot(pb.CreateVolumeGroupSnapshotRequest(
        name=f"group-{uuid.uuid4().hex[:8]}", source_volume_ids=volume_ids), timeout=300).group_snapshot
    gid = group.group_snapshot_id
    env.ledger.push("group " + gid, lambda: groups.DeleteVolumeGroupSnapshot(
        pb.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=gid), timeout=300))
    return group


def _dm_devices() -> dict[str, dict]:
    out = subprocess.run(["dmsetup", "info", "-c", "--noheadings", "--separator", ";", "-o", "name,attr,open"],
                         capture_output=True, text=True, check=True).stdout
    rows = [line.strip().split(";") for line in out.splitlines() if line.strip()]
    return {r[0]: {"attr": r[1], "open": int(r[2])} for r in rows if len(r) == 3}


def _layer_of(env: "LvmEnv", vol: pb.Volume) -> str:
    lv = vol.volume_id.split(":", 1)[1]
    return "tessera-" + env.vg.name.replace("-", "--") + "-" + lv.replace("-", "--")


def _group_controller_offered(env: "LvmEnv") -> bool:
    caps = env.client.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest(), timeout=30).capabilities
    want = pb.PluginCapability.Service.GROUP_CONTROLLER_SERVICE
    return any(c.service.type == want for c in caps)


def test_group_of_three_written_in_lockstep_is_consistent(lvm: "LvmEnv") -> None:
    if not lvm.thin:
        assert not _group_controller_offered(lvm), "thick LVs keep no snapshots: no group snapshots either"
        return
    assert _group_controller_offered(lvm)
    groups = rpc.GroupControllerStub(lvm.client.channel)
    cap = mount_cap("ext4")
    vols = [_create(lvm, cap) for _ in range(3)]
    targets = [_attach(lvm, v, cap) for v in vols]
    layers = _dm_devices()
    for v in vols:  # the filesystem sits on Tessera's layer, which holds the LV open
        assert layers.get(_layer_of(lvm, v), {}).get("open", 0) >= 1, (v.volume_id, layers)
    writer = LockstepWriter([os.path.join(t, "log") for t in targets])
    writer.start()
    cut: list[pb.VolumeGroupSnapshot] = []
    try:
        for _ in range(2):
            writer.wait_for(500)
            cut.append(_group(lvm, groups, [v.volume_id for v in vols]))
        writer.wait_for(500)  # every member was resumed
    finally:
        writer.stop.set()
        writer.join(60)
    assert writer.error is None, writer.error
    assert not [n for n, d in _dm_devices().items() if n.startswith("tessera-") and d["attr"][2:3] == "s"], \
        "a layer was left suspended"
    by_volume = {v.volume_id: i for i, v in enumerate(vols)}
    for group in cut:
        assert group.ready_to_use and len(group.snapshots) == 3
        again = groups.GetVolumeGroupSnapshot(pb.GetVolumeGroupSnapshotRequest(
            group_snapshot_id=group.group_snapshot_id), timeout=60).group_snapshot
        assert sorted(s.snapshot_id for s in again.snapshots) == sorted(s.snapshot_id for s in group.snapshots)
        counts = [0, 0, 0]
        for s in group.snapshots:
            assert s.group_snapshot_id == group.group_snapshot_id
            src = pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=s.snapshot_id))
            restored = _create(lvm, cap, src)
            target = _attach(lvm, restored, cap)
            with open(os.path.join(target, "log"), "rb") as f:
                counts[by_volume[s.source_volume_id]] = last_record(f.read())
        a, b, c = counts
        assert a > 0, "the group was cut after records were written"
        assert a >= b >= c >= a - 1, f"members at records {counts}: not one instant of the write sequence"


def test_unstage_removes_the_layer_and_releases_the_lv(lvm: "LvmEnv") -> None:
    cap = mount_cap("ext4")
    vol = _create(lvm, cap)
    staging = os.path.join(lvm.workdir, f"gstage-{uuid.uuid4().hex[:8]}")
    os.makedirs(staging)
    lvm.ledger.stage(vol, staging, cap)
    assert _layer_of(lvm, vol) in _dm_devices()
    lvm.ledger.unstage(vol.volume_id, staging)
    assert _layer_of(lvm, vol) not in _dm_devices()
    lv = vol.volume_id.split(":", 1)[1]
    out = subprocess.run(["lvs", "--reportformat", "json", "-o", "lv_name,lv_active", f"{lvm.vg.name}/{lv}"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["report"][0]["lv"][0]["lv_active"] != "active"


def test_a_member_open_without_the_layer_is_refused(lvm: "LvmEnv") -> None:
    if not lvm.thin:
        return  # no group snapshots on thick LVs (checked above)
    groups = rpc.GroupControllerStub(lvm.client.channel)
    cap = mount_cap("ext4")
    paused_ok = _create(lvm, cap)
    _attach(lvm, paused_ok, cap)
    bare = _create(lvm, cap)
    lv = f"{lvm.vg.name}/{bare.volume_id.split(':', 1)[1]}"
    subprocess.run(["lvchange", "-ay", "-K", lv], check=True)
    fd = os.open(f"/dev/{lv}", os.O_RDWR)  # what a volume staged straight on its LV looks like to the controller
    try:
        err = expect_code(groups.CreateVolumeGroupSnapshot, pb.CreateVolumeGroupSnapshotRequest(
            name=f"group-{uuid.uuid4().hex[:8]}", source_volume_ids=[paused_ok.volume_id, bare.volume_id]),
            grpc.StatusCode.FAILED_PRECONDITION)
        assert "device layer" in err.details()
    finally:
        os.close(fd)
        subprocess.run(["lvchange", "-an", lv], check=False)
    assert not [n for n, d in _dm_devices().items() if n.startswith("tessera-") and d["attr"][2:3] == "s"]
