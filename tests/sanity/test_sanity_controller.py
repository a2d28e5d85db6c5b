"""Controller service (spec §Controller Service RPC): volumes, capabilities, listing, capacity, expansion."""
from __future__ import annotations

import grpc
import pytest

from csi._pb import csi_pb2 as pb
from tests.sanity.harness import CTRL, MIB, block_cap, expect_code, mount_cap

C = grpc.StatusCode


@pytest.fixture(autouse=True)
def _controller(plugin):
    plugin.require_controller()


def ctl(plugin):
    return plugin.client.controller


# ---- ControllerGetCapabilities ---------------------------------------------------------------------------------
def test_controller_get_capabilities(plugin):
    resp = ctl(plugin).ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest(), timeout=30)
    for c in resp.capabilities:
        assert c.WhichOneof("type") == "rpc"
        assert c.rpc.type != CTRL.Value("UNKNOWN")
    assert ctl(plugin).ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest(), timeout=30) == resp
    if plugin.has("LIST_SNAPSHOTS"):
        assert plugin.has("CREATE_DELETE_SNAPSHOT"), "LIST_SNAPSHOTS without CREATE_DELETE_SNAPSHOT"
    if plugin.has("PUBLISH_READONLY"):
        pass  # meaningful with or without controller publish


# ---- CreateVolume ----------------------------------------------------------------------------------------------
class TestCreateVolume:
    @pytest.fixture(autouse=True)
    def _cap(self, plugin):
        plugin.require("CREATE_DELETE_VOLUME")

    def test_missing_name(self, plugin):
        req = plugin.create_request()
        req.name = ""
        expect_code(ctl(plugin).CreateVolume, req, C.INVALID_ARGUMENT)

    def test_missing_capabilities(self, plugin):
        req = plugin.create_request()
        del req.volume_capabilities[:]
        expect_code(ctl(plugin).CreateVolume, req, C.INVALID_ARGUMENT)

    def test_capability_without_access_type(self, plugin):
        req = plugin.create_request()
        req.volume_capabilities[0].ClearField("mount")
        expect_code(ctl(plugin).CreateVolume, req, C.INVALID_ARGUMENT)

    def test_capability_without_access_mode(self, plugin):
        req = plugin.create_request()
        req.volume_capabilities[0].ClearField("access_mode")
        expect_code(ctl(plugin).CreateVolume, req, C.INVALID_ARGUMENT)

    def test_create_and_delete(self, plugin, ledger):
        vol = ledger.create_volume(plugin.create_request())
        assert vol.volume_id
        assert len(vol.volume_id.encode()) <= 128
        assert vol.capacity_bytes == 0 or vol.capacity_bytes >= plugin.size
        ledger.delete_volume(vol.volume_id)

    def test_no_capacity_range(self, plugin, ledger):
        req = plugin.create_request()
        req.ClearField("capacity_range")
        vol = ledger.create_volume(req)
        assert vol.volume_id

    def test_exact_size_range(self, plugin, ledger):
        req = plugin.create_request(size=plugin.size)
        req.capacity_range.limit_bytes = plugin.size
        vol = ledger.create_volume(req)
        assert vol.capacity_bytes in (0, plugin.size)

    def test_size_rounded_within_limit(self, plugin, ledger):
        """required 1 byte, no limit: the plugin may round up; the volume must be at least 1 byte."""
        req = plugin.create_request(size=1)
        vol = ledger.create_volume(req)
        assert vol.capacity_bytes == 0 or vol.capacity_bytes >= 1

    def test_limit_below_required(self, plugin):
        req = plugin.create_request(size=plugin.size)
        req.capacity_range.limit_bytes = plugin.size // 2
        err = expect_code_any(ctl(plugin).CreateVolume, req, {C.INVALID_ARGUMENT, C.OUT_OF_RANGE})
        assert err

    def test_negative_size(self, plugin):
        req = plugin.create_request()
        req.capacity_range.required_bytes = -1
        expect_code_any(ctl(plugin).CreateVolume, req, {C.INVALID_ARGUMENT, C.OUT_OF_RANGE})

    def test_limit_smaller_than_allocation_unit(self, plugin):
        """required=limit=1 byte: no plugin here allocates single bytes → OUT_OF_RANGE (unsupported range)."""
        req = plugin.create_request(size=1)
        req.capacity_range.limit_bytes = 1
        expect_code(ctl(plugin).CreateVolume, req, C.OUT_OF_RANGE)

    def test_above_maximum_volume_size(self, plugin):
        if not plugin.has("GET_CAPACITY"):
            pytest.skip("not applicable: the plugin does not advertise GET_CAPACITY (no maximum_volume_size known)")
        cap = ctl(plugin).GetCapacity(pb.GetCapacityRequest(volume_capabilities=[mount_cap()],
                                                            parameters=plugin.params), timeout=60)
        if not cap.HasField("maximum_volume_size"):
            pytest.skip("not applicable: GetCapacity reports no maximum_volume_size")
        req = plugin.create_request(size=cap.maximum_volume_size.value + (1 << 30))
        expect_code(ctl(plugin).CreateVolume, req, C.OUT_OF_RANGE)

    def test_idempotent(self, plugin, ledger):
        req = plugin.create_request()
        first = ledger.create_volume(req)
        second = ledger.create_volume(req)
        assert second.volume_id == first.volume_id
        assert second.capacity_bytes == first.capacity_bytes
        assert dict(second.volume_context) == dict(first.volume_context)
        assert list(second.accessible_topology) == list(first.accessible_topology)

    def test_same_name_different_size(self, plugin, ledger):
        req = plugin.create_request(size=plugin.size)
        req.capacity_range.limit_bytes = plugin.size
        ledger.create_volume(req)
        bigger = plugin.create_request(name=req.name, size=plugin.size * 2)
        bigger.capacity_range.limit_bytes = plugin.size * 2
        expect_code(ctl(plugin).CreateVolume, bigger, C.ALREADY_EXISTS)

    def test_same_name_compatible_range(self, plugin, ledger):
        """A second request whose range still contains the existing size is the same volume (spec: compatible)."""
        req = plugin.create_request(size=plugin.size)
        first = ledger.create_volume(req)
        again = plugin.create_request(name=req.name, size=plugin.size // 2)
        again.capacity_range.limit_bytes = plugin.size * 4
        assert ledger.create_volume(again).volume_id == first.volume_id

    def test_maximum_length_name(self, plugin, ledger):
        name = ("sanity-max-" + "x" * 128)[:128]
        vol = ledger.create_volume(plugin.create_request(name=name))
        assert vol.volume_id
        assert ledger.create_volume(plugin.create_request(name=name)).volume_id == vol.volume_id

    def test_unusual_name_characters(self, plugin, ledger):
        """Names are opaque to the plugin: slashes, dots and spaces must not reach a path or a shell."""
        name = f"../{plugin.unique()} $(touch x);/etc/passwd"
        vol = ledger.create_volume(plugin.create_request(name=name))
        assert vol.volume_id

    def test_block_volume(self, plugin, ledger):
        plugin.require_block()
        vol = ledger.create_volume(plugin.create_request(cap=block_cap()))
        assert vol.volume_id

    def test_unknown_source_snapshot(self, plugin, unknown_snap):
        plugin.require("CREATE_DELETE_SNAPSHOT")
        req = plugin.create_request()
        req.volume_content_source.snapshot.snapshot_id = unknown_snap
        expect_code(ctl(plugin).CreateVolume, req, C.NOT_FOUND)

    def test_unknown_source_volume(self, plugin, unknown_vol):
        plugin.require("CLONE_VOLUME")
        req = plugin.create_request()
        req.volume_content_source.volume.volume_id = unknown_vol
        expect_code(ctl(plugin).CreateVolume, req, C.NOT_FOUND)

    def test_topology_reported(self, plugin, ledger):
        vol = ledger.create_volume(plugin.create_request())
        from tests.sanity.harness import PLUGIN
        if PLUGIN.Value("VOLUME_ACCESSIBILITY_CONSTRAINTS") in plugin.plugin_caps:
            assert vol.accessible_topology, "a plugin with accessibility constraints must report the topology"
            node_segs = dict(plugin.node_info.accessible_topology.segments)
            assert any(dict(t.segments).items() <= node_segs.items() for t in vol.accessible_topology), \
                "the volume must be accessible from the node that asked for it"


def expect_code_any(call, request, codes: set, timeout: float = 120.0) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=timeout)
    assert info.value.code() in codes, f"expected one of {[c.name for c in codes]}, got " \
                                       f"{info.value.code().name}: {info.value.details()}"
    assert info.value.details()
    return info.value


# ---- DeleteVolume ----------------------------------------------------------------------------------------------
class TestDeleteVolume:
    @pytest.fixture(autouse=True)
    def _cap(self, plugin):
        plugin.require("CREATE_DELETE_VOLUME")

    def test_missing_id(self, plugin):
        expect_code(ctl(plugin).DeleteVolume, pb.DeleteVolumeRequest(), C.INVALID_ARGUMENT)

    def test_unknown_id_is_success(self, plugin, unknown_vol):
        ctl(plugin).DeleteVolume(pb.DeleteVolumeRequest(volume_id=unknown_vol), timeout=60)
        ctl(plugin).DeleteVolume(pb.DeleteVolumeRequest(volume_id="garbage id with spaces"), timeout=60)

    def test_bad_token_numeric(self, plugin):
        """csi-sanity sends a decimal token larger than the number of volumes: ABORTED."""
        plugin.require("LIST_VOLUMES")
        expect_code(ctl(plugin).ListVolumes, pb.ListVolumesRequest(starting_token="1000005"), C.ABORTED)

    def test_idempotent(self, plugin, ledger):
        vol = ledger.create_volume(plugin.create_request())
        ledger.delete_volume(vol.volume_id)
        ledger.delete_volume(vol.volume_id)

    def test_gone_after_delete(self, plugin, ledger):
        vol = ledger.create_volume(plugin.create_request())
        ledger.delete_volume(vol.volume_id)
        if plugin.has("GET_VOLUME"):
            expect_code(ctl(plugin).ControllerGetVolume, pb.ControllerGetVolumeRequest(volume_id=vol.volume_id),
                        C.NOT_FOUND)
        if plugin.has("LIST_VOLUMES"):
            assert vol.volume_id not in list_all_volume_ids(plugin)


# ---- ValidateVolumeCapabilities --------------------------------------------------------------------------------
class TestValidateVolumeCapabilities:
    def test_missing_id(self, plugin):
        expect_code(ctl(plugin).ValidateVolumeCapabilities,
                    pb.ValidateVolumeCapabilitiesRequest(volume_capabilities=[mount_cap()]), C.INVALID_ARGUMENT)

    def test_missing_capabilities(self, plugin, ledger):
        plugin.require("CREATE_DELETE_VOLUME")
        vol = ledger.create_volume(plugin.create_request())
        expect_code(ctl(plugin).ValidateVolumeCapabilities,
                    pb.ValidateVolumeCapabilitiesRequest(volume_id=vol.volume_id), C.INVALID_ARGUMENT)

    def test_unknown_volume(self, plugin, unknown_vol):
        expect_code(ctl(plugin).ValidateVolumeCapabilities, pb.ValidateVolumeCapabilitiesRequest(
            volume_id=unknown_vol, volume_capabilities=[mount_cap()]),
            C.NOT_FOUND)

    def test_confirmed(self, plugin, ledger):
        plugin.require("CREATE_DELETE_VOLUME")
        vol = ledger.create_volume(plugin.create_request())
        req = pb.ValidateVolumeCapabilitiesRequest(volume_id=vol.volume_id, volume_capabilities=[mount_cap()],
                                                   volume_context=vol.volume_context, parameters=plugin.params)
        resp = ctl(plugin).ValidateVolumeCapabilities(req, timeout=60)
        assert resp.HasField("confirmed"), f"not confirmed: {resp.message}"
        assert list(resp.confirmed.volume_capabilities) == list(req.volume_capabilities)
        assert ctl(plugin).ValidateVolumeCapabilities(req, timeout=60) == resp

    def test_multi_node_writer_mount_not_confirmed(self, plugin, ledger):
        """ext4 and xfs are single-host filesystems: several nodes mounting one read-write corrupt it, so a
        MULTI_NODE_MULTI_WRITER (or _SINGLE_WRITER) *mount* capability is never confirmed, with a message."""
        plugin.require("CREATE_DELETE_VOLUME")
        vol = ledger.create_volume(plugin.create_request())
        for mode in ("MULTI_NODE_MULTI_WRITER", "MULTI_NODE_SINGLE_WRITER"):
            req = pb.ValidateVolumeCapabilitiesRequest(volume_id=vol.volume_id, volume_capabilities=[mount_cap(mode=mode)])
            resp = ctl(plugin).ValidateVolumeCapabilities(req, timeout=60)
            assert not resp.HasField("confirmed"), f"{mode} mount confirmed on a single-host filesystem"
            assert resp.message

    def test_multi_node_writer_mount_refused_at_create(self, plugin, ledger):
        """CreateVolume asking for a multi-node writer mount: INVALID_ARGUMENT (the capability cannot be served)."""
        plugin.require("CREATE_DELETE_VOLUME")
        req = plugin.create_request(cap=mount_cap(mode="MULTI_NODE_MULTI_WRITER"))
        err = expect_code(ctl(plugin).CreateVolume, req, C.INVALID_ARGUMENT)
        assert "block" in err.details(), err.details()


# ---- ListVolumes -----------------------------------------------------------------------------------------------
def list_all_volume_ids(plugin, page: int = 0) -> list[str]:
    ids, token = [], ""
    for _ in range(10000):
        resp = ctl(plugin).ListVolumes(pb.ListVolumesRequest(max_entries=page, starting_token=token), timeout=60)
        ids += [e.volume.volume_id for e in resp.entries]
        token = resp.next_token
        if not token:
            return ids
    raise AssertionError("ListVolumes never ended")


class TestListVolumes:
    @pytest.fixture(autouse=True)
    def _cap(self, plugin):
        plugin.require("LIST_VOLUMES")

    def test_list(self, plugin, ledger):
        vol = ledger.create_volume(plugin.create_request())
        resp = ctl(plugin).ListVolumes(pb.ListVolumesRequest(), timeout=60)
        assert not resp.next_token, "no max_entries: everything in one page"
        entry = [e for e in resp.entries if e.volume.volume_id == vol.volume_id]
        assert len(entry) == 1
        assert entry[0].volume.capacity_bytes == vol.capacity_bytes

    def test_bad_token_aborted(self, plugin):
        expect_code(ctl(plugin).ListVolumes, pb.ListVolumesRequest(starting_token="this-token-was-never-issued"),
                    C.ABORTED)

    def test_negative_max_entries(self, plugin):
        expect_code(ctl(plugin).ListVolumes, pb.ListVolumesRequest(max_entries=-1), C.INVALID_ARGUMENT)

    def test_presence_and_absence(self, plugin, ledger):
        before = set(list_all_volume_ids(plugin))
        vol = ledger.create_volume(plugin.create_request())
        assert set(list_all_volume_ids(plugin)) == before | {vol.volume_id}
        ledger.delete_volume(vol.volume_id)
        assert set(list_all_volume_ids(plugin)) == before

    def test_paging(self, plugin, ledger):
        made = {ledger.create_volume(plugin.create_request()).volume_id for _ in range(5)}
        everything = list_all_volume_ids(plugin)
        paged = list_all_volume_ids(plugin, page=2)
        assert len(paged) == len(set(paged)), "a volume appeared on two pages"
        assert set(paged) == set(everything)
        assert made <= set(paged)
        resp = ctl(plugin).ListVolumes(pb.ListVolumesRequest(max_entries=2), timeout=60)
        assert len(resp.entries) <= 2
        assert resp.next_token, "more than 2 volumes exist: next_token is required"
        assert ctl(plugin).ListVolumes(pb.ListVolumesRequest(max_entries=2), timeout=60) == resp, "not repeatable"

    def test_paging_survives_changes(self, plugin, ledger):
        """csi-sanity: a token stays valid when the last volume of the page is deleted and new ones are added."""
        for _ in range(4):
            ledger.create_volume(plugin.create_request())
        first = ctl(plugin).ListVolumes(pb.ListVolumesRequest(max_entries=2), timeout=60)
        assert first.next_token
        seen = [e.volume.volume_id for e in first.entries]
        ours = {v for v in seen if v in {k.split(" ", 1)[1] for k, _ in ledger._undo if k.startswith("volume ")}}
        if ours:
            ledger.delete_volume(sorted(ours)[-1])
        new = ledger.create_volume(plugin.create_request()).volume_id
        rest, token = [], first.next_token
        while token:
            resp = ctl(plugin).ListVolumes(pb.ListVolumesRequest(max_entries=2, starting_token=token), timeout=60)
            rest += [e.volume.volume_id for e in resp.entries]
            token = resp.next_token
        assert not set(rest) & set(seen), "volumes of page one came again"
        everything = set(list_all_volume_ids(plugin))
        assert new in everything
        # every volume that existed all along appears on some page
        assert (everything - {new}) <= set(seen) | set(rest)


# ---- ControllerGetVolume ---------------------------------------------------------------------------------------
class TestControllerGetVolume:
    @pytest.fixture(autouse=True)
    def _cap(self, plugin):
        plugin.require("GET_VOLUME")

    def test_missing_id(self, plugin):
        expect_code(ctl(plugin).ControllerGetVolume, pb.ControllerGetVolumeRequest(), C.INVALID_ARGUMENT)

    def test_unknown(self, plugin, unknown_vol):
        expect_code(ctl(plugin).ControllerGetVolume,
                    pb.ControllerGetVolumeRequest(volume_id=unknown_vol),
                    C.NOT_FOUND)

    def test_get(self, plugin, ledger):
        vol = ledger.create_volume(plugin.create_request())
        resp = ctl(plugin).ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=vol.volume_id), timeout=60)
        assert resp.volume.volume_id == vol.volume_id
        assert resp.volume.capacity_bytes == vol.capacity_bytes
        if plugin.has("VOLUME_CONDITION"):
            assert resp.status.HasField("volume_condition")
            assert not resp.status.volume_condition.abnormal
        assert ctl(plugin).ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=vol.volume_id),
                                               timeout=60) == resp


# ---- GetCapacity -----------------------------------------------------------------------------------------------
class TestGetCapacity:
    @pytest.fixture(autouse=True)
    def _cap(self, plugin):
        plugin.require("GET_CAPACITY")

    def test_plain(self, plugin):
        resp = ctl(plugin).GetCapacity(pb.GetCapacityRequest(), timeout=60)
        assert resp.available_capacity >= 0

    def test_with_capabilities_and_parameters(self, plugin):
        req = pb.GetCapacityRequest(volume_capabilities=[mount_cap()], parameters=plugin.params)
        resp = ctl(plugin).GetCapacity(req, timeout=60)
        assert resp.available_capacity >= 0
        if resp.HasField("maximum_volume_size") and resp.HasField("minimum_volume_size"):
            assert resp.minimum_volume_size.value <= resp.maximum_volume_size.value

    def test_with_node_topology(self, plugin):
        segs = dict(plugin.node_info.accessible_topology.segments)
        if not segs:
            pytest.skip("not applicable: the node reports no topology")
        resp = ctl(plugin).GetCapacity(pb.GetCapacityRequest(accessible_topology=pb.Topology(segments=segs)),
                                       timeout=60)
        assert resp.available_capacity > 0, "the node the plugin runs on has room"


# ---- ControllerPublish / Unpublish -----------------------------------------------------------------------------
class TestControllerPublish:
    def test_not_advertised_is_unimplemented(self, plugin):
        if plugin.has("PUBLISH_UNPUBLISH_VOLUME"):
            pytest.skip("not applicable: the plugin advertises PUBLISH_UNPUBLISH_VOLUME")
        expect_code(ctl(plugin).ControllerPublishVolume, pb.ControllerPublishVolumeRequest(
            volume_id="x:y", node_id=plugin.node_id, volume_capability=mount_cap()), C.UNIMPLEMENTED)

    def test_missing_fields(self, plugin, ledger):
        plugin.require("PUBLISH_UNPUBLISH_VOLUME")
        vol = ledger.create_volume(plugin.create_request())
        publish = ctl(plugin).ControllerPublishVolume
        expect_code(publish, pb.ControllerPublishVolumeRequest(node_id=plugin.node_id, volume_capability=mount_cap()),
                    C.INVALID_ARGUMENT)
        expect_code(publish, pb.ControllerPublishVolumeRequest(volume_id=vol.volume_id, volume_capability=mount_cap()),
                    C.INVALID_ARGUMENT)
        expect_code(publish, pb.ControllerPublishVolumeRequest(volume_id=vol.volume_id, node_id=plugin.node_id),
                    C.INVALID_ARGUMENT)
        expect_code(ctl(plugin).ControllerUnpublishVolume, pb.ControllerUnpublishVolumeRequest(node_id=plugin.node_id),
                    C.INVALID_ARGUMENT)

    def test_unknown_volume_and_node(self, plugin, ledger, unknown_vol):
        plugin.require("PUBLISH_UNPUBLISH_VOLUME")
        publish = ctl(plugin).ControllerPublishVolume
        expect_code(publish, pb.ControllerPublishVolumeRequest(
            volume_id=unknown_vol, node_id=plugin.node_id,
            volume_capability=mount_cap()), C.NOT_FOUND)
        vol = ledger.create_volume(plugin.create_request())
        expect_code(publish, pb.ControllerPublishVolumeRequest(volume_id=vol.volume_id, node_id="no-such-node-x",
                                                               volume_capability=mount_cap()), C.NOT_FOUND)

    def test_publish_unpublish_idempotent(self, plugin, ledger):
        plugin.require("PUBLISH_UNPUBLISH_VOLUME")
        vol = ledger.create_volume(plugin.create_request())
        a = ledger.controller_publish(vol.volume_id, mount_cap())
        b = ledger.controller_publish(vol.volume_id, mount_cap())
        assert a == b
        ledger.controller_unpublish(vol.volume_id)
        ledger.controller_unpublish(vol.volume_id)

    def test_incompatible_republish_to_the_same_node(self, plugin, ledger):
        """Published to a node, then asked again for that node with another readonly flag: ALREADY_EXISTS (spec:
        "already published at the node ... but is incompatible with the specified volume_capability or readonly
        flag"). The same request again stays idempotent."""
        plugin.require("PUBLISH_UNPUBLISH_VOLUME")
        plugin.require("PUBLISH_READONLY")
        vol = ledger.create_volume(plugin.create_request())
        first = ledger.controller_publish(vol.volume_id, mount_cap())
        expect_code(ctl(plugin).ControllerPublishVolume, pb.ControllerPublishVolumeRequest(
            volume_id=vol.volume_id, node_id=plugin.node_id, volume_capability=mount_cap(), readonly=True),
            C.ALREADY_EXISTS)
        assert ledger.controller_publish(vol.volume_id, mount_cap()) == first


# ---- ControllerExpandVolume ------------------------------------------------------------------------------------
class TestControllerExpand:
    @pytest.fixture(autouse=True)
    def _cap(self, plugin):
        plugin.require("EXPAND_VOLUME")

    def test_missing_id(self, plugin):
        expect_code(ctl(plugin).ControllerExpandVolume, pb.ControllerExpandVolumeRequest(
            capacity_range=pb.CapacityRange(required_bytes=plugin.size)), C.INVALID_ARGUMENT)

    def test_missing_range(self, plugin, ledger):
        vol = ledger.create_volume(plugin.create_request())
        expect_code(ctl(plugin).ControllerExpandVolume,
                    pb.ControllerExpandVolumeRequest(volume_id=vol.volume_id), C.INVALID_ARGUMENT)

    def test_unknown_volume(self, plugin, unknown_vol):
        expect_code(ctl(plugin).ControllerExpandVolume, pb.ControllerExpandVolumeRequest(
            volume_id=unknown_vol,
            capacity_range=pb.CapacityRange(required_bytes=plugin.size)), C.NOT_FOUND)

    def test_expand_idempotent(self, plugin, ledger):
        vol = ledger.create_volume(plugin.create_request())
        req = pb.ControllerExpandVolumeRequest(volume_id=vol.volume_id, volume_capability=mount_cap(),
                                               capacity_range=pb.CapacityRange(required_bytes=plugin.size * 2))
        first = ctl(plugin).ControllerExpandVolume(req, timeout=120)
        assert first.capacity_bytes >= plugin.size * 2
        second = ctl(plugin).ControllerExpandVolume(req, timeout=120)
        assert second.capacity_bytes == first.capacity_bytes
        if plugin.has("GET_VOLUME"):
            got = ctl(plugin).ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=vol.volume_id), timeout=60)
            assert got.volume.capacity_bytes == first.capacity_bytes

    def test_shrink_is_not_done(self, plugin, ledger):
        """A smaller required size: the volume never shrinks (success with the current size, or OUT_OF_RANGE)."""
        vol = ledger.create_volume(plugin.create_request(size=plugin.size * 2))
        req = pb.ControllerExpandVolumeRequest(volume_id=vol.volume_id,
                                               capacity_range=pb.CapacityRange(required_bytes=plugin.size))
        try:
            resp = ctl(plugin).ControllerExpandVolume(req, timeout=120)
        except grpc.RpcError as e:
            assert e.code() == C.OUT_OF_RANGE, f"{e.code().name}: {e.details()}"
            return
        assert resp.capacity_bytes >= plugin.size * 2

    def test_limit_below_required(self, plugin, ledger):
        vol = ledger.create_volume(plugin.create_request())
        req = pb.ControllerExpandVolumeRequest(volume_id=vol.volume_id, capacity_range=pb.CapacityRange(
            required_bytes=plugin.size * 4, limit_bytes=plugin.size * 2))
        expect_code_any(ctl(plugin).ControllerExpandVolume, req, {C.INVALID_ARGUMENT, C.OUT_OF_RANGE})


# ---- not advertised RPCs ---------------------------------------------------------------------------------------
def test_modify_volume_unimplemented_unless_advertised(plugin):
    if plugin.has("MODIFY_VOLUME"):
        pytest.skip("not applicable: the plugin advertises MODIFY_VOLUME")
    expect_code(ctl(plugin).ControllerModifyVolume, pb.ControllerModifyVolumeRequest(volume_id="x:y"),
                C.UNIMPLEMENTED)


def test_get_snapshot_unimplemented_unless_advertised(plugin):
    if plugin.has("GET_SNAPSHOT"):
        pytest.skip("not applicable: the plugin advertises GET_SNAPSHOT")
    expect_code(ctl(plugin).GetSnapshot, pb.GetSnapshotRequest(snapshot_id="x:y"), C.UNIMPLEMENTED)


def test_many_sizes_are_honoured(plugin, ledger):
    """required_bytes is a floor and limit_bytes a ceiling for every size a user might ask."""
    plugin.require("CREATE_DELETE_VOLUME")
    for size in (plugin.size + 1, plugin.size + MIB - 1, plugin.size + 3 * MIB):
        req = plugin.create_request(size=size)
        req.capacity_range.limit_bytes = size + 16 * MIB
        vol = ledger.create_volume(req)
        assert vol.capacity_bytes == 0 or size <= vol.capacity_bytes <= size + 16 * MIB
