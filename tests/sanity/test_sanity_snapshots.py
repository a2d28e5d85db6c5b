"""Snapshots, restores and clones at the controller (spec §CreateSnapshot, §DeleteSnapshot, §ListSnapshots,
§CreateVolume with volume_content_source). Data equality of restores and clones is in tests/integration."""
from __future__ import annotations

import grpc
import pytest

from csi._pb import csi_pb2 as pb
from tests.sanity.harness import expect_code

C = grpc.StatusCode
UNKNOWN_VOL = "local:vol-00000000-0000-0000-0000-000000000000"
UNKNOWN_SNAP = "local:snap-00000000-0000-0000-0000-000000000000"


def ctl(plugin):
    return plugin.client.controller


@pytest.fixture(autouse=True)
def _snapshots(plugin):
    plugin.require_controller()
    plugin.require("CREATE_DELETE_SNAPSHOT")


def snap_request(plugin, volume_id: str, name: str = "") -> pb.CreateSnapshotRequest:
    return pb.CreateSnapshotRequest(source_volume_id=volume_id, name=name or plugin.unique("snap"))


class TestCreateSnapshot:
    def test_missing_name(self, plugin, ledger):
        vol = ledger.create_volume(plugin.create_request())
        expect_code(ctl(plugin).CreateSnapshot, pb.CreateSnapshotRequest(source_volume_id=vol.volume_id),
                    C.INVALID_ARGUMENT)

    def test_missing_source(self, plugin):
        expect_code(ctl(plugin).CreateSnapshot, pb.CreateSnapshotRequest(name=plugin.unique("snap")),
                    C.INVALID_ARGUMENT)

    def test_unknown_source(self, plugin, unknown_vol):
        expect_code(ctl(plugin).CreateSnapshot, snap_request(plugin, unknown_vol), C.NOT_FOUND)

    def test_create_idempotent(self, plugin, ledger):
        vol = ledger.create_volume(plugin.create_request())
        req = snap_request(plugin, vol.volume_id)
        first = ledger.create_snapshot(req)
        assert first.snapshot_id and len(first.snapshot_id.encode()) <= 128
        assert first.source_volume_id == vol.volume_id
        assert first.HasField("creation_time")
        assert first.size_bytes == 0 or first.size_bytes >= 0
        second = ledger.create_snapshot(req)
        assert second.snapshot_id == first.snapshot_id
        assert second.creation_time == first.creation_time, "the same snapshot reports the same creation time"
        assert second.source_volume_id == first.source_volume_id

    def test_same_name_other_source(self, plugin, ledger):
        a = ledger.create_volume(plugin.create_request())
        b = ledger.create_volume(plugin.create_request())
        req = snap_request(plugin, a.volume_id)
        ledger.create_snapshot(req)
        expect_code(ctl(plugin).CreateSnapshot, snap_request(plugin, b.volume_id, req.name), C.ALREADY_EXISTS)

    def test_maximum_length_name(self, plugin, ledger):
        vol = ledger.create_volume(plugin.create_request())
        name = ("sanity-snap-max-" + "s" * 128)[:128]
        snap = ledger.create_snapshot(snap_request(plugin, vol.volume_id, name))
        assert snap.snapshot_id


class TestDeleteSnapshot:
    def test_missing_id(self, plugin):
        expect_code(ctl(plugin).DeleteSnapshot, pb.DeleteSnapshotRequest(), C.INVALID_ARGUMENT)

    def test_unknown_is_success(self, plugin, unknown_snap):
        ctl(plugin).DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=unknown_snap), timeout=60)
        ctl(plugin).DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id="garbage id"), timeout=60)

    def test_idempotent(self, plugin, ledger):
        vol = ledger.create_volume(plugin.create_request())
        snap = ledger.create_snapshot(snap_request(plugin, vol.volume_id))
        ledger.delete_snapshot(snap.snapshot_id)
        ledger.delete_snapshot(snap.snapshot_id)

    def test_volume_delete_with_snapshot(self, plugin, ledger):
        """Deleting the source volume while a snapshot exists: either it works and the snapshot survives (and is
        still restorable), or FAILED_PRECONDITION (spec: 'Volume has snapshots')."""
        vol = ledger.create_volume(plugin.create_request())
        snap = ledger.create_snapshot(snap_request(plugin, vol.volume_id))
        try:
            ledger.delete_volume(vol.volume_id)
        except grpc.RpcError as e:
            assert e.code() == C.FAILED_PRECONDITION, f"{e.code().name}: {e.details()}"
            return
        req = plugin.create_request()
        req.volume_content_source.snapshot.snapshot_id = snap.snapshot_id
        assert ledger.create_volume(req).content_source.snapshot.snapshot_id == snap.snapshot_id


def list_all(plugin, page: int = 0, **filters) -> list[pb.Snapshot]:
    out, token = [], ""
    for _ in range(10000):
        resp = ctl(plugin).ListSnapshots(pb.ListSnapshotsRequest(max_entries=page, starting_token=token, **filters),
                                         timeout=60)
        out += [e.snapshot for e in resp.entries]
        token = resp.next_token
        if not token:
            return out
    raise AssertionError("ListSnapshots never ended")


class TestListSnapshots:
    @pytest.fixture(autouse=True)
    def _cap(self, plugin):
        plugin.require("LIST_SNAPSHOTS")

    def test_list_and_filters(self, plugin, ledger):
        vol = ledger.create_volume(plugin.create_request())
        other = ledger.create_volume(plugin.create_request())
        snap = ledger.create_snapshot(snap_request(plugin, vol.volume_id))
        snap2 = ledger.create_snapshot(snap_request(plugin, other.volume_id))
        ids = [s.snapshot_id for s in list_all(plugin)]
        assert snap.snapshot_id in ids and snap2.snapshot_id in ids
        by_id = list_all(plugin, snapshot_id=snap.snapshot_id)
        assert [s.snapshot_id for s in by_id] == [snap.snapshot_id]
        assert by_id[0].source_volume_id == vol.volume_id
        by_source = list_all(plugin, source_volume_id=vol.volume_id)
        assert [s.snapshot_id for s in by_source] == [snap.snapshot_id]
        assert all(s.ready_to_use for s in by_id)

    def test_unknown_filters_give_empty(self, plugin, unknown_snap, unknown_vol):
        assert list_all(plugin, snapshot_id=unknown_snap) == []
        assert list_all(plugin, source_volume_id=unknown_vol) == []

    def test_bad_token_aborted(self, plugin):
        expect_code(ctl(plugin).ListSnapshots, pb.ListSnapshotsRequest(starting_token="never-issued-token"),
                    C.ABORTED)

    def test_paging(self, plugin, ledger):
        vol = ledger.create_volume(plugin.create_request())
        made = {ledger.create_snapshot(snap_request(plugin, vol.volume_id)).snapshot_id for _ in range(5)}
        paged = [s.snapshot_id for s in list_all(plugin, page=2)]
        assert len(paged) == len(set(paged)), "a snapshot appeared on two pages"
        assert made <= set(paged)
        assert set(paged) == {s.snapshot_id for s in list_all(plugin)}
        first = ctl(plugin).ListSnapshots(pb.ListSnapshotsRequest(max_entries=2), timeout=60)
        assert len(first.entries) == 2 and first.next_token

    def test_deleted_is_gone(self, plugin, ledger):
        vol = ledger.create_volume(plugin.create_request())
        snap = ledger.create_snapshot(snap_request(plugin, vol.volume_id))
        ledger.delete_snapshot(snap.snapshot_id)
        assert snap.snapshot_id not in {s.snapshot_id for s in list_all(plugin)}
        assert list_all(plugin, snapshot_id=snap.snapshot_id) == []


class TestRestoreAndClone:
    def test_restore_from_snapshot(self, plugin, ledger):
        vol = ledger.create_volume(plugin.create_request())
        snap = ledger.create_snapshot(snap_request(plugin, vol.volume_id))
        req = plugin.create_request()
        req.volume_content_source.snapshot.snapshot_id = snap.snapshot_id
        restored = ledger.create_volume(req)
        assert restored.content_source.snapshot.snapshot_id == snap.snapshot_id
        assert restored.capacity_bytes == 0 or restored.capacity_bytes >= plugin.size
        again = ledger.create_volume(req)
        assert again.volume_id == restored.volume_id

    def test_restore_bigger_than_snapshot(self, plugin, ledger):
        vol = ledger.create_volume(plugin.create_request())
        snap = ledger.create_snapshot(snap_request(plugin, vol.volume_id))
        req = plugin.create_request(size=plugin.size * 2)
        req.volume_content_source.snapshot.snapshot_id = snap.snapshot_id
        restored = ledger.create_volume(req)
        assert restored.capacity_bytes == 0 or restored.capacity_bytes >= plugin.size * 2

    def test_restore_smaller_than_snapshot(self, plugin, ledger):
        vol = ledger.create_volume(plugin.create_request(size=plugin.size * 2))
        snap = ledger.create_snapshot(snap_request(plugin, vol.volume_id))
        req = plugin.create_request(size=plugin.size)
        req.capacity_range.limit_bytes = plugin.size
        req.volume_content_source.snapshot.snapshot_id = snap.snapshot_id
        expect_code(ctl(plugin).CreateVolume, req, C.OUT_OF_RANGE)

    def test_same_name_different_source(self, plugin, ledger):
        vol = ledger.create_volume(plugin.create_request())
        snap = ledger.create_snapshot(snap_request(plugin, vol.volume_id))
        req = plugin.create_request()
        req.volume_content_source.snapshot.snapshot_id = snap.snapshot_id
        ledger.create_volume(req)
        plain = plugin.create_request(name=req.name)
        expect_code(ctl(plugin).CreateVolume, plain, C.ALREADY_EXISTS)

    def test_clone(self, plugin, ledger):
        plugin.require("CLONE_VOLUME")
        src = ledger.create_volume(plugin.create_request())
        req = plugin.create_request()
        req.volume_content_source.volume.volume_id = src.volume_id
        clone = ledger.create_volume(req)
        assert clone.volume_id != src.volume_id
        assert clone.content_source.volume.volume_id == src.volume_id
        assert ledger.create_volume(req).volume_id == clone.volume_id

    def test_clone_smaller_than_source(self, plugin, ledger):
        plugin.require("CLONE_VOLUME")
        src = ledger.create_volume(plugin.create_request(size=plugin.size * 2))
        req = plugin.create_request(size=plugin.size)
        req.capacity_range.limit_bytes = plugin.size
        req.volume_content_source.volume.volume_id = src.volume_id
        expect_code(ctl(plugin).CreateVolume, req, C.OUT_OF_RANGE)

    def test_source_reported_by_get_and_list(self, plugin, ledger):
        vol = ledger.create_volume(plugin.create_request())
        snap = ledger.create_snapshot(snap_request(plugin, vol.volume_id))
        req = plugin.create_request()
        req.volume_content_source.snapshot.snapshot_id = snap.snapshot_id
        restored = ledger.create_volume(req)
        if plugin.has("GET_VOLUME"):
            got = ctl(plugin).ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=restored.volume_id),
                                                  timeout=60)
            assert got.volume.content_source.snapshot.snapshot_id == snap.snapshot_id


class TestGetSnapshot:
    """GetSnapshot (spec §GetSnapshot, CSI v1.12): the snapshot as CreateSnapshot described it; NOT_FOUND once gone."""

    @pytest.fixture(autouse=True)
    def _cap(self, plugin):
        plugin.require("GET_SNAPSHOT")

    def test_missing_id(self, plugin):
        expect_code(ctl(plugin).GetSnapshot, pb.GetSnapshotRequest(), C.INVALID_ARGUMENT)

    def test_unknown_not_found(self, plugin, unknown_snap):
        expect_code(ctl(plugin).GetSnapshot, pb.GetSnapshotRequest(snapshot_id=unknown_snap), C.NOT_FOUND)

    def test_malformed_not_found(self, plugin):
        for raw in ("garbage id", "x" * 300, "local:../../etc/passwd"):
            expect_code(ctl(plugin).GetSnapshot, pb.GetSnapshotRequest(snapshot_id=raw), C.NOT_FOUND)

    def test_get_created(self, plugin, ledger):
        vol = ledger.create_volume(plugin.create_request())
        made = ledger.create_snapshot(snap_request(plugin, vol.volume_id))
        got = ctl(plugin).GetSnapshot(pb.GetSnapshotRequest(snapshot_id=made.snapshot_id), timeout=60).snapshot
        assert got.snapshot_id == made.snapshot_id
        assert got.source_volume_id == vol.volume_id
        assert got.creation_time == made.creation_time
        assert got.size_bytes == made.size_bytes
        assert got.ready_to_use == made.ready_to_use

    def test_deleted_not_found(self, plugin, ledger):
        vol = ledger.create_volume(plugin.create_request())
        snap = ledger.create_snapshot(snap_request(plugin, vol.volume_id))
        ledger.delete_snapshot(snap.snapshot_id)
        expect_code(ctl(plugin).GetSnapshot, pb.GetSnapshotRequest(snapshot_id=snap.snapshot_id), C.NOT_FOUND)
