"""Group snapshots at the GroupController service (spec §Group Controller Service RPCs: CreateVolumeGroupSnapshot,
DeleteVolumeGroupSnapshot, GetVolumeGroupSnapshot; §Snapshot's group_snapshot_id; §DeleteSnapshot "Snapshot is
part of a group"). Runs on every profile whose plugin advertises GROUP_CONTROLLER_SERVICE and the group capability.
Consistency of the members' data is in tests/integration (file: a writer in lockstep; rbd: before and after)."""
from __future__ import annotations

import grpc
import pytest

from csi._pb import csi_pb2 as pb
from csi._pb import csi_pb2_grpc as rpc
from tests.sanity.harness import PLUGIN, expect_code

C = grpc.StatusCode
_GCAP = pb.GroupControllerServiceCapability.RPC
UNKNOWN_GROUPS = ["local:group-00000000-0000-0000-0000-000000000000", "fake-group-snapshot-id-3f1c2a9b7d",
                  "no-such-backend:group-1"]


@pytest.fixture
def groups(plugin):
    plugin.require_controller()
    if PLUGIN.Value("GROUP_CONTROLLER_SERVICE") not in plugin.plugin_caps:
        pytest.skip("not applicable: the plugin does not advertise GROUP_CONTROLLER_SERVICE")
    stub = rpc.GroupControllerStub(plugin.client.channel)
    caps = stub.GroupControllerGetCapabilities(pb.GroupControllerGetCapabilitiesRequest(), timeout=60)
    if _GCAP.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT not in {c.rpc.type for c in caps.capabilities}:
        pytest.skip("not applicable: no CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT")
    return stub


def make_group(plugin, ledger, stub, volume_ids, name=""):
    req = pb.CreateVolumeGroupSnapshotRequest(name=name or plugin.unique("group"), source_volume_ids=volume_ids)
    group = stub.CreateVolumeGroupSnapshot(req, timeout=plugin.client.timeout).group_snapshot
    gid, members = group.group_snapshot_id, [s.snapshot_id for s in group.snapshots]
    key = "group " + gid
    ledger.forget(key)
    ledger.push(key, lambda: stub.DeleteVolumeGroupSnapshot(pb.DeleteVolumeGroupSnapshotRequest(
        group_snapshot_id=gid, snapshot_ids=members), timeout=plugin.client.timeout))
    return req, group


def volumes(plugin, ledger, n=3):
    return [ledger.create_volume(plugin.create_request()).volume_id for _ in range(n)]


def test_capabilities(groups):
    pass  # the fixture asked GroupControllerGetCapabilities and found the capability


class TestCreate:
    def test_missing_name(self, plugin, ledger, groups):
        vids = volumes(plugin, ledger, 1)
        expect_code(groups.CreateVolumeGroupSnapshot, pb.CreateVolumeGroupSnapshotRequest(source_volume_ids=vids),
                    C.INVALID_ARGUMENT)

    def test_missing_sources(self, plugin, groups):
        expect_code(groups.CreateVolumeGroupSnapshot,
                    pb.CreateVolumeGroupSnapshotRequest(name=plugin.unique("group")), C.INVALID_ARGUMENT)

    def test_unknown_source(self, plugin, ledger, groups, unknown_vol):
        vids = volumes(plugin, ledger, 1)
        expect_code(groups.CreateVolumeGroupSnapshot, pb.CreateVolumeGroupSnapshotRequest(
            name=plugin.unique("group"), source_volume_ids=vids + [unknown_vol]), C.NOT_FOUND)

    def test_same_volume_twice(self, plugin, ledger, groups):
        vids = volumes(plugin, ledger, 1)
        expect_code(groups.CreateVolumeGroupSnapshot, pb.CreateVolumeGroupSnapshotRequest(
            name=plugin.unique("group"), source_volume_ids=vids * 2), C.INVALID_ARGUMENT)

    def test_idempotent_by_name(self, plugin, ledger, groups):
        vids = volumes(plugin, ledger)
        req, first = make_group(plugin, ledger, groups, vids)
        assert first.group_snapshot_id and len(first.group_snapshot_id.encode()) <= 128
        assert first.HasField("creation_time")
        assert sorted(s.source_volume_id for s in first.snapshots) == sorted(vids)
        for s in first.snapshots:
            assert s.group_snapshot_id == first.group_snapshot_id, "a member names its group (spec §Snapshot)"
            assert s.snapshot_id and s.HasField("creation_time")
        assert first.ready_to_use == all(s.ready_to_use for s in first.snapshots)
        second = groups.CreateVolumeGroupSnapshot(req, timeout=plugin.client.timeout).group_snapshot
        assert second.group_snapshot_id == first.group_snapshot_id
        assert sorted(s.snapshot_id for s in second.snapshots) == sorted(s.snapshot_id for s in first.snapshots)
        assert second.creation_time == first.creation_time

    def test_same_name_other_sources(self, plugin, ledger, groups):
        vids = volumes(plugin, ledger)
        req, _ = make_group(plugin, ledger, groups, vids)
        expect_code(groups.CreateVolumeGroupSnapshot, pb.CreateVolumeGroupSnapshotRequest(
            name=req.name, source_volume_ids=vids[:2]), C.ALREADY_EXISTS)

    def test_sources_in_two_backends(self, plugin, ledger, groups):
        info = plugin.client.identity.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=60)
        served = [b for b in info.manifest.get("backends", "").split(",") if b]
        mine = volumes(plugin, ledger, 1)
        others = [b for b in served if b != mine[0].partition(":")[0]]
        if not others:
            pytest.skip("not applicable: the plugin serves one backend (tests/unit/test_group_snapshot_ops.py "
                        "covers two)")
        other = others[0]
        req = plugin.create_request()
        req.parameters["backend"] = other
        try:
            theirs = ledger.create_volume(req).volume_id
        except grpc.RpcError as e:
            pytest.skip(f"not applicable: no volume could be made in backend {other!r} with this profile's "
                        f"parameters ({e.code().name})")
        expect_code(groups.CreateVolumeGroupSnapshot, pb.CreateVolumeGroupSnapshotRequest(
            name=plugin.unique("group"), source_volume_ids=mine + [theirs]), C.INVALID_ARGUMENT)


class TestMembers:
    def test_members_are_snapshots(self, plugin, ledger, groups):
        vids = volumes(plugin, ledger)
        _, group = make_group(plugin, ledger, groups, vids)
        ctl = plugin.client.controller
        for s in group.snapshots:
            listed = ctl.ListSnapshots(pb.ListSnapshotsRequest(snapshot_id=s.snapshot_id), timeout=60).entries
            assert [e.snapshot.snapshot_id for e in listed] == [s.snapshot_id]
            assert listed[0].snapshot.group_snapshot_id == group.group_snapshot_id
            assert listed[0].snapshot.source_volume_id == s.source_volume_id
            if plugin.has("GET_SNAPSHOT"):
                got = ctl.GetSnapshot(pb.GetSnapshotRequest(snapshot_id=s.snapshot_id), timeout=60).snapshot
                assert got.group_snapshot_id == group.group_snapshot_id

    def test_restore_from_member(self, plugin, ledger, groups):
        vids = volumes(plugin, ledger, 2)
        _, group = make_group(plugin, ledger, groups, vids)
        for s in group.snapshots:
            vol = ledger.create_volume(plugin.create_request(volume_content_source=pb.VolumeContentSource(
                snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=s.snapshot_id))))
            assert vol.content_source.snapshot.snapshot_id == s.snapshot_id

    def test_member_not_deleted_alone(self, plugin, ledger, groups):
        vids = volumes(plugin, ledger, 2)
        _, group = make_group(plugin, ledger, groups, vids)
        member = group.snapshots[0].snapshot_id
        expect_code(plugin.client.controller.DeleteSnapshot, pb.DeleteSnapshotRequest(snapshot_id=member),
                    C.INVALID_ARGUMENT)
        listed = plugin.client.controller.ListSnapshots(pb.ListSnapshotsRequest(snapshot_id=member), timeout=60)
        assert [e.snapshot.snapshot_id for e in listed.entries] == [member], "the refused delete removed nothing"


class TestGetAndDelete:
    @pytest.mark.parametrize("gid", UNKNOWN_GROUPS, ids=["own-form", "sanity-form", "other-backend"])
    def test_get_unknown(self, groups, gid):
        expect_code(groups.GetVolumeGroupSnapshot, pb.GetVolumeGroupSnapshotRequest(group_snapshot_id=gid),
                    C.NOT_FOUND)

    def test_get_missing_id(self, groups):
        expect_code(groups.GetVolumeGroupSnapshot, pb.GetVolumeGroupSnapshotRequest(), C.INVALID_ARGUMENT)

    def test_get(self, plugin, ledger, groups):
        vids = volumes(plugin, ledger)
        _, group = make_group(plugin, ledger, groups, vids)
        ids = [s.snapshot_id for s in group.snapshots]
        got = groups.GetVolumeGroupSnapshot(pb.GetVolumeGroupSnapshotRequest(
            group_snapshot_id=group.group_snapshot_id, snapshot_ids=ids), timeout=60).group_snapshot
        assert got.group_snapshot_id == group.group_snapshot_id
        assert sorted(s.snapshot_id for s in got.snapshots) == sorted(ids)
        assert got.creation_time == group.creation_time
        expect_code(groups.GetVolumeGroupSnapshot, pb.GetVolumeGroupSnapshotRequest(
            group_snapshot_id=group.group_snapshot_id, snapshot_ids=ids[:1]), C.INVALID_ARGUMENT)

    def test_delete_missing_id(self, groups):
        expect_code(groups.DeleteVolumeGroupSnapshot, pb.DeleteVolumeGroupSnapshotRequest(), C.INVALID_ARGUMENT)

    @pytest.mark.parametrize("gid", UNKNOWN_GROUPS, ids=["own-form", "sanity-form", "other-backend"])
    def test_delete_unknown_is_ok(self, groups, gid):
        groups.DeleteVolumeGroupSnapshot(pb.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=gid), timeout=60)

    def test_delete_removes_members_and_is_idempotent(self, plugin, ledger, groups):
        vids = volumes(plugin, ledger)
        _, group = make_group(plugin, ledger, groups, vids)
        ids = [s.snapshot_id for s in group.snapshots]
        req = pb.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=group.group_snapshot_id, snapshot_ids=ids)
        expect_code(groups.DeleteVolumeGroupSnapshot, pb.DeleteVolumeGroupSnapshotRequest(
            group_snapshot_id=group.group_snapshot_id, snapshot_ids=ids[1:]), C.INVALID_ARGUMENT)
        groups.DeleteVolumeGroupSnapshot(req, timeout=plugin.client.timeout)
        groups.DeleteVolumeGroupSnapshot(req, timeout=plugin.client.timeout)
        expect_code(groups.GetVolumeGroupSnapshot, pb.GetVolumeGroupSnapshotRequest(
            group_snapshot_id=group.group_snapshot_id), C.NOT_FOUND)
        for sid in ids:
            listed = plugin.client.controller.ListSnapshots(pb.ListSnapshotsRequest(snapshot_id=sid), timeout=60)
            assert not listed.entries, f"member {sid} outlived its group"
