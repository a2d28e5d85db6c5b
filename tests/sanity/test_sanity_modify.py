"""ControllerModifyVolume and CreateVolume's mutable_parameters (spec §ControllerModifyVolume, CSI v1.12), and the
published_node_ids of ControllerGetVolume / ListVolumes (LIST_VOLUMES_PUBLISHED_NODES).

What to set comes from the profile (`Profile.mutable_parameters`, like csi-sanity's TestVolumeMutableParameters),
never from the plugin: a profile that declares values expects MODIFY_VOLUME, one that declares none expects the
plugin to refuse the RPC.
"""
from __future__ import annotations

import grpc
import pytest

from csi._pb import csi_pb2 as pb
from tests.sanity.harness import Client, expect_code

C = grpc.StatusCode
UNKNOWN_KEY = "tessera-sanity-no-such-key"


@pytest.fixture(autouse=True)
def _controller(plugin):
    plugin.require_controller()
    plugin.require("CREATE_DELETE_VOLUME")


def ctl(plugin):
    return plugin.client.controller


def get_context(plugin, volume_id: str, client=None) -> dict[str, str]:
    c = (client or plugin.client).controller
    return dict(c.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=volume_id), timeout=60).volume
                .volume_context)


def modify(plugin, volume_id: str, params: dict[str, str]) -> None:
    ctl(plugin).ControllerModifyVolume(pb.ControllerModifyVolumeRequest(volume_id=volume_id,
                                                                        mutable_parameters=params), timeout=120)


def values(plugin) -> tuple[dict[str, str], dict[str, str]]:
    sets = plugin.profile.mutable_parameters
    if not sets:
        pytest.skip(f"not applicable: profile {plugin.profile.name} declares no mutable parameters")
    assert plugin.has("MODIFY_VOLUME"), (f"profile {plugin.profile.name} declares mutable parameters but the plugin "
                                         "does not advertise MODIFY_VOLUME")
    return sets[0], sets[1]


def test_capability_matches_profile(plugin):
    """A profile with mutable parameters gets MODIFY_VOLUME; one without gets UNIMPLEMENTED or, when another
    backend of the plugin advertises it, INVALID_ARGUMENT for this profile's volume — never a silent OK."""
    if plugin.profile.mutable_parameters:
        assert plugin.has("MODIFY_VOLUME")
        return
    req = pb.ControllerModifyVolumeRequest(volume_id="no-such-backend:vol-1", mutable_parameters={"k": "v"})
    with pytest.raises(grpc.RpcError) as info:
        ctl(plugin).ControllerModifyVolume(req, timeout=60)
    assert info.value.code() in (C.UNIMPLEMENTED, C.INVALID_ARGUMENT, C.NOT_FOUND), info.value.details()
    if not plugin.has("MODIFY_VOLUME"):
        assert info.value.code() == C.UNIMPLEMENTED


def test_create_with_unsupported_mutable_key_is_refused(plugin, ledger):
    """INVALID_ARGUMENT naming the key, and no volume is made (a create retried without it succeeds afresh)."""
    req = plugin.create_request(mutable_parameters={UNKNOWN_KEY: "1"})
    err = expect_code(ctl(plugin).CreateVolume, req, C.INVALID_ARGUMENT)
    if plugin.has("MODIFY_VOLUME"):
        assert UNKNOWN_KEY in err.details()
    listed = [e.volume.volume_id for e in ctl(plugin).ListVolumes(pb.ListVolumesRequest(), timeout=60).entries] \
        if plugin.has("LIST_VOLUMES") else []
    vol = ledger.create_volume(plugin.create_request(name=req.name))
    assert vol.volume_id not in listed


class TestModifyVolume:
    @pytest.fixture(autouse=True)
    def _cap(self, plugin):
        plugin.require("MODIFY_VOLUME")

    def test_missing_volume_id(self, plugin):
        first, _ = values(plugin)
        expect_code(ctl(plugin).ControllerModifyVolume, pb.ControllerModifyVolumeRequest(mutable_parameters=first),
                    C.INVALID_ARGUMENT)

    def test_unknown_volume(self, plugin, unknown_vol):
        first, _ = values(plugin)
        expect_code(ctl(plugin).ControllerModifyVolume,
                    pb.ControllerModifyVolumeRequest(volume_id=unknown_vol, mutable_parameters=first), C.NOT_FOUND)

    def test_unknown_key_changes_nothing(self, plugin, ledger):
        """A request mixing a valid key with an unknown one is refused whole: the valid one is not applied."""
        first, second = values(plugin)
        vol = ledger.create_volume(plugin.create_request(mutable_parameters=first))
        req = pb.ControllerModifyVolumeRequest(volume_id=vol.volume_id, mutable_parameters={**second, UNKNOWN_KEY: "1"})
        err = expect_code(ctl(plugin).ControllerModifyVolume, req, C.INVALID_ARGUMENT)
        assert UNKNOWN_KEY in err.details()
        ctx = get_context(plugin, vol.volume_id)
        assert {k: ctx.get(k) for k in first} == first

    def test_bad_value_changes_nothing(self, plugin, ledger):
        first, second = values(plugin)
        vol = ledger.create_volume(plugin.create_request(mutable_parameters=first))
        key = sorted(second)[0]
        req = pb.ControllerModifyVolumeRequest(volume_id=vol.volume_id,
                                               mutable_parameters={**second, key: "not a number"})
        err = expect_code(ctl(plugin).ControllerModifyVolume, req, C.INVALID_ARGUMENT)
        assert key in err.details()
        ctx = get_context(plugin, vol.volume_id)
        assert {k: ctx.get(k) for k in first} == first

    def test_created_values_are_visible(self, plugin, ledger):
        first, _ = values(plugin)
        vol = ledger.create_volume(plugin.create_request(mutable_parameters=first))
        assert {k: vol.volume_context.get(k) for k in first} == first
        ctx = get_context(plugin, vol.volume_id)
        assert {k: ctx.get(k) for k in first} == first

    def test_create_is_idempotent_with_mutable_parameters(self, plugin, ledger):
        first, _ = values(plugin)
        req = plugin.create_request(mutable_parameters=first)
        a = ledger.create_volume(req)
        b = ledger.create_volume(req)
        assert a.volume_id == b.volume_id
        assert {k: b.volume_context.get(k) for k in first} == first

    def test_modify_idempotent_and_visible(self, plugin, ledger):
        first, second = values(plugin)
        vol = ledger.create_volume(plugin.create_request())
        modify(plugin, vol.volume_id, first)
        modify(plugin, vol.volume_id, first)  # the same request again: OK, same state
        ctx = get_context(plugin, vol.volume_id)
        assert {k: ctx.get(k) for k in first} == first
        modify(plugin, vol.volume_id, second)
        ctx = get_context(plugin, vol.volume_id)
        assert {k: ctx.get(k) for k in second} == second
        if plugin.has("LIST_VOLUMES"):
            entries = ctl(plugin).ListVolumes(pb.ListVolumesRequest(), timeout=60).entries
            mine = [e.volume for e in entries if e.volume.volume_id == vol.volume_id]
            assert len(mine) == 1
            assert {k: mine[0].volume_context.get(k) for k in second} == second

    def test_absent_keys_are_kept(self, plugin, ledger):
        """The spec: only keys that are specified change anything."""
        first, second = values(plugin)
        vol = ledger.create_volume(plugin.create_request(mutable_parameters=first))
        one = sorted(second)[0]
        modify(plugin, vol.volume_id, {one: second[one]})
        ctx = get_context(plugin, vol.volume_id)
        assert {k: ctx.get(k) for k in first} == {**first, one: second[one]}

    def test_empty_request_changes_nothing(self, plugin, ledger):
        first, _ = values(plugin)
        vol = ledger.create_volume(plugin.create_request(mutable_parameters=first))
        modify(plugin, vol.volume_id, {})
        ctx = get_context(plugin, vol.volume_id)
        assert {k: ctx.get(k) for k in first} == first

    def test_validate_capabilities_checks_mutable_parameters(self, plugin, ledger):
        first, _ = values(plugin)
        vol = ledger.create_volume(plugin.create_request())
        caps = plugin.create_request().volume_capabilities
        ok = ctl(plugin).ValidateVolumeCapabilities(pb.ValidateVolumeCapabilitiesRequest(
            volume_id=vol.volume_id, volume_capabilities=caps, parameters=plugin.params, mutable_parameters=first),
            timeout=60)
        assert ok.HasField("confirmed") and dict(ok.confirmed.mutable_parameters) == first
        bad = ctl(plugin).ValidateVolumeCapabilities(pb.ValidateVolumeCapabilitiesRequest(
            volume_id=vol.volume_id, volume_capabilities=caps, parameters=plugin.params,
            mutable_parameters={UNKNOWN_KEY: "1"}), timeout=60)
        assert not bad.HasField("confirmed") and UNKNOWN_KEY in bad.message

    def test_survives_restart(self, plugin, ledger):
        """The value lives on the storage: a restarted controller (same config, same state directory) reads it."""
        if plugin.server is None:
            pytest.skip("not applicable: the profile uses an endpoint this suite did not start")
        first, second = values(plugin)
        vol = ledger.create_volume(plugin.create_request(mutable_parameters=first))
        modify(plugin, vol.volume_id, second)
        assert plugin.server.stop() == 0, plugin.server.log_tail()
        plugin.server.start()
        fresh = Client(plugin.server.endpoint, timeout=plugin.client.timeout)
        try:
            ctx = get_context(plugin, vol.volume_id, client=fresh)
        finally:
            fresh.close()
        grpc.channel_ready_future(plugin.client.channel).result(timeout=30)  # the session's channel reconnects
        assert {k: ctx.get(k) for k in second} == second


# ---- published_node_ids ----------------------------------------------------------------------------------------
def test_published_nodes_capability_needs_publish(plugin):
    if plugin.has("LIST_VOLUMES_PUBLISHED_NODES"):
        assert plugin.has("PUBLISH_UNPUBLISH_VOLUME"), "the spec: LIST_VOLUMES_PUBLISHED_NODES needs PUBLISH_UNPUBLISH"


def test_published_node_ids(plugin, ledger):
    """After ControllerPublish the node's ID is in ControllerGetVolume's and ListVolumes' published_node_ids, and
    not after ControllerUnpublish."""
    plugin.require("LIST_VOLUMES_PUBLISHED_NODES")
    plugin.require("GET_VOLUME")
    vol = ledger.create_volume(plugin.create_request())
    cap = plugin.create_request().volume_capabilities[0]

    def published() -> tuple[list[str], list[str]]:
        got = ctl(plugin).ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=vol.volume_id), timeout=60)
        listed: list[str] = []
        if plugin.has("LIST_VOLUMES"):
            entries = ctl(plugin).ListVolumes(pb.ListVolumesRequest(), timeout=60).entries
            mine = [e for e in entries if e.volume.volume_id == vol.volume_id]
            assert len(mine) == 1
            listed = list(mine[0].status.published_node_ids)
        return list(got.status.published_node_ids), listed

    assert plugin.node_id not in published()[0]
    ledger.controller_publish(vol.volume_id, cap)
    got, listed = published()
    assert plugin.node_id in got
    if plugin.has("LIST_VOLUMES"):
        assert plugin.node_id in listed
    ctl(plugin).ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=vol.volume_id,
                                                                              node_id=plugin.node_id), timeout=120)
    ledger.forget("controller-publish " + vol.volume_id)
    got, listed = published()
    assert plugin.node_id not in got and plugin.node_id not in listed
