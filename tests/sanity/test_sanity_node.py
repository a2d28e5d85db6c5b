"""Node service (spec §Node Service RPC) and full volume lifecycles through the controller and the node."""
from __future__ import annotations

import errno
import os
import stat

import grpc
import pytest

from csi._pb import csi_pb2 as pb
from tests.sanity.harness import block_cap, expect_code, is_block, mount_cap

C = grpc.StatusCode
UNKNOWN_VOL = "local:vol-00000000-0000-0000-0000-000000000000"


def node(plugin):
    return plugin.client.node


# ---- mount table ------------------------------------------------------------------------------------------------
def _unescape(s: str) -> str:
    return s.encode().decode("unicode_escape") if "\\" in s else s


def mount_entry(path: str):
    """(source-options, per-mount options, fstype) of the top mount at `path`, or None."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            sep = parts.index("-")
            if _unescape(parts[4]) == path:
                found = {"options": set(parts[5].split(",")), "fstype": parts[sep + 1],
                         "super": set(parts[sep + 3].split(","))}
    return found


def is_mounted(path: str) -> bool:
    return mount_entry(path) is not None


# ---- helpers ----------------------------------------------------------------------------------------------------
KINDS = ["ext4", "xfs", "block"]


def cap_for(plugin, kind: str, mode: str = "SINGLE_NODE_WRITER", flags=()) -> pb.VolumeCapability:
    if kind == "block":
        plugin.require_block()
        return block_cap(mode)
    plugin.require_fs(kind)
    return mount_cap(kind, mode, flags)


def make_volume(plugin, ledger, cap: pb.VolumeCapability, kind: str = "ext4"):
    return ledger.create_volume(plugin.create_request(size=plugin.size_for(kind), cap=cap))


def staged_volume(plugin, ledger, kind: str = "ext4", cap=None):
    """A created (and controller-published when the plugin needs it) and staged volume: (vol, cap, staging, pctx)."""
    cap = cap or cap_for(plugin, kind)
    vol = make_volume(plugin, ledger, cap, kind)
    pctx = ledger.controller_publish(vol.volume_id, cap)
    staging = plugin.staging_dir()
    ledger.stage(vol, staging, cap, pctx)
    return vol, cap, staging, pctx


@pytest.fixture(autouse=True)
def _node_stage(plugin):
    """This plugin family stages; a plugin without STAGE_UNSTAGE_VOLUME gets the publish-only path of the tests."""
    return None


def requires_stage(plugin):
    plugin.require_node("STAGE_UNSTAGE_VOLUME")


# ---- capabilities and info --------------------------------------------------------------------------------------
def test_node_get_capabilities(plugin):
    resp = node(plugin).NodeGetCapabilities(pb.NodeGetCapabilitiesRequest(), timeout=30)
    for c in resp.capabilities:
        assert c.WhichOneof("type") == "rpc"
        assert c.rpc.type != pb.NodeServiceCapability.RPC.UNKNOWN
    assert node(plugin).NodeGetCapabilities(pb.NodeGetCapabilitiesRequest(), timeout=30) == resp


def test_node_get_info(plugin):
    resp = node(plugin).NodeGetInfo(pb.NodeGetInfoRequest(), timeout=30)
    assert resp.node_id, "node_id is REQUIRED"
    assert len(resp.node_id.encode()) <= 256
    assert resp.max_volumes_per_node >= 0
    for k, v in resp.accessible_topology.segments.items():
        assert k and len(k) <= 128 and len(v) <= 63
    assert node(plugin).NodeGetInfo(pb.NodeGetInfoRequest(), timeout=30) == resp


# ---- NodeStageVolume / NodeUnstageVolume errors -----------------------------------------------------------------
class TestStageErrors:
    @pytest.fixture(autouse=True)
    def _cap(self, plugin):
        requires_stage(plugin)

    def test_missing_volume_id(self, plugin):
        expect_code(node(plugin).NodeStageVolume, pb.NodeStageVolumeRequest(
            staging_target_path=plugin.staging_dir(), volume_capability=mount_cap()), C.INVALID_ARGUMENT)

    def test_missing_staging_path(self, plugin, ledger):
        vol = make_volume(plugin, ledger, mount_cap())
        expect_code(node(plugin).NodeStageVolume, pb.NodeStageVolumeRequest(
            volume_id=vol.volume_id, volume_capability=mount_cap(), volume_context=vol.volume_context),
            C.INVALID_ARGUMENT)

    def test_missing_capability(self, plugin, ledger):
        vol = make_volume(plugin, ledger, mount_cap())
        expect_code(node(plugin).NodeStageVolume, pb.NodeStageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=plugin.staging_dir(), volume_context=vol.volume_context),
            C.INVALID_ARGUMENT)

    def test_unknown_volume(self, plugin, unknown_vol):
        expect_code(node(plugin).NodeStageVolume, pb.NodeStageVolumeRequest(
            volume_id=unknown_vol, staging_target_path=plugin.staging_dir(), volume_capability=mount_cap()),
            C.NOT_FOUND)

    def test_relative_staging_path(self, plugin, ledger):
        vol = make_volume(plugin, ledger, mount_cap())
        expect_code(node(plugin).NodeStageVolume, pb.NodeStageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path="relative/staging", volume_capability=mount_cap(),
            volume_context=vol.volume_context), C.INVALID_ARGUMENT)

    def test_dotdot_staging_path(self, plugin, ledger):
        vol = make_volume(plugin, ledger, mount_cap())
        path = os.path.join(plugin.staging_dir(), "..", "escape")
        expect_code(node(plugin).NodeStageVolume, pb.NodeStageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=path, volume_capability=mount_cap(),
            volume_context=vol.volume_context), C.INVALID_ARGUMENT)

    def test_unstage_missing_fields(self, plugin):
        expect_code(node(plugin).NodeUnstageVolume, pb.NodeUnstageVolumeRequest(
            staging_target_path=plugin.staging_dir()), C.INVALID_ARGUMENT)
        expect_code(node(plugin).NodeUnstageVolume, pb.NodeUnstageVolumeRequest(volume_id=UNKNOWN_VOL),
                    C.INVALID_ARGUMENT)

    def test_unstage_never_staged_is_ok(self, plugin, ledger):
        vol = make_volume(plugin, ledger, mount_cap())
        node(plugin).NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vol.volume_id,
                                                                   staging_target_path=plugin.staging_dir()),
                                       timeout=60)

    def test_incompatible_restage(self, plugin, ledger):
        """Staged with ext4, then asked for xfs at the same path: ALREADY_EXISTS (spec table)."""
        plugin.require_fs("xfs")
        vol, cap, staging, pctx = staged_volume(plugin, ledger, "ext4")
        expect_code(node(plugin).NodeStageVolume, pb.NodeStageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=staging, volume_capability=mount_cap("xfs"),
            volume_context=vol.volume_context, publish_context=pctx), C.ALREADY_EXISTS)


# ---- NodePublishVolume / NodeUnpublishVolume errors -------------------------------------------------------------
class TestPublishErrors:
    def test_missing_volume_id(self, plugin):
        expect_code(node(plugin).NodePublishVolume, pb.NodePublishVolumeRequest(
            target_path=plugin.target_path(), staging_target_path=plugin.staging_dir(),
            volume_capability=mount_cap()), C.INVALID_ARGUMENT)

    def test_missing_target_path(self, plugin, ledger):
        vol = make_volume(plugin, ledger, mount_cap())
        expect_code(node(plugin).NodePublishVolume, pb.NodePublishVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=plugin.staging_dir(), volume_capability=mount_cap(),
            volume_context=vol.volume_context), C.INVALID_ARGUMENT)

    def test_missing_capability(self, plugin, ledger):
        vol = make_volume(plugin, ledger, mount_cap())
        expect_code(node(plugin).NodePublishVolume, pb.NodePublishVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=plugin.staging_dir(), target_path=plugin.target_path(),
            volume_context=vol.volume_context), C.INVALID_ARGUMENT)

    def test_no_staging_path(self, plugin, ledger):
        requires_stage(plugin)
        vol = make_volume(plugin, ledger, mount_cap())
        expect_code(node(plugin).NodePublishVolume, pb.NodePublishVolumeRequest(
            volume_id=vol.volume_id, target_path=plugin.target_path(), volume_capability=mount_cap(),
            volume_context=vol.volume_context), C.FAILED_PRECONDITION)

    def test_not_staged(self, plugin, ledger):
        requires_stage(plugin)
        vol = make_volume(plugin, ledger, mount_cap())
        expect_code(node(plugin).NodePublishVolume, pb.NodePublishVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=plugin.staging_dir(), target_path=plugin.target_path(),
            volume_capability=mount_cap(), volume_context=vol.volume_context), C.FAILED_PRECONDITION)

    def test_unknown_volume(self, plugin, unknown_vol):
        expect_code(node(plugin).NodePublishVolume, pb.NodePublishVolumeRequest(
            volume_id=unknown_vol, staging_target_path=plugin.staging_dir(), target_path=plugin.target_path(),
            volume_capability=mount_cap()), C.NOT_FOUND)

    def test_unpublish_missing_fields(self, plugin):
        expect_code(node(plugin).NodeUnpublishVolume, pb.NodeUnpublishVolumeRequest(
            target_path=plugin.target_path()), C.INVALID_ARGUMENT)
        expect_code(node(plugin).NodeUnpublishVolume, pb.NodeUnpublishVolumeRequest(volume_id=UNKNOWN_VOL),
                    C.INVALID_ARGUMENT)

    def test_unpublish_never_published_is_ok(self, plugin, ledger):
        vol = make_volume(plugin, ledger, mount_cap())
        target = plugin.target_path()
        node(plugin).NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=target),
                                         timeout=60)
        os.makedirs(target)  # a tester-made empty target dir, never mounted
        node(plugin).NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=target),
                                         timeout=60)

    def test_incompatible_republish(self, plugin, ledger):
        """Same target, different readonly flag: ALREADY_EXISTS (spec: T1=T2, P1!=P2)."""
        requires_stage(plugin)
        vol, cap, staging, pctx = staged_volume(plugin, ledger)
        target = plugin.target_path()
        ledger.publish(vol, staging, target, cap, publish_context=pctx)
        expect_code(node(plugin).NodePublishVolume, pb.NodePublishVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=staging, target_path=target, volume_capability=cap,
            readonly=True, volume_context=vol.volume_context, publish_context=pctx), C.ALREADY_EXISTS)

    def test_wrong_access_type(self, plugin, ledger):
        """Staged for a filesystem, published as raw block: refused (capability mismatch)."""
        requires_stage(plugin)
        plugin.require_block()
        vol, cap, staging, pctx = staged_volume(plugin, ledger)
        err = None
        with pytest.raises(grpc.RpcError) as info:
            node(plugin).NodePublishVolume(pb.NodePublishVolumeRequest(
                volume_id=vol.volume_id, staging_target_path=staging, target_path=plugin.target_path(),
                volume_capability=block_cap(), volume_context=vol.volume_context, publish_context=pctx), timeout=60)
        err = info.value
        assert err.code() in (C.FAILED_PRECONDITION, C.ALREADY_EXISTS, C.INVALID_ARGUMENT), err.code().name

    def test_single_node_single_writer_second_target(self, plugin, ledger):
        """SINGLE_NODE_SINGLE_WRITER published at a second target: FAILED_PRECONDITION (spec table)."""
        requires_stage(plugin)
        # the mode exists for plugins with the SINGLE_NODE_MULTI_WRITER capability (spec); with it, it must work
        plugin.require_node("SINGLE_NODE_MULTI_WRITER")
        plugin.require("SINGLE_NODE_MULTI_WRITER")
        cap = mount_cap("ext4", "SINGLE_NODE_SINGLE_WRITER")
        vol, cap, staging, pctx = staged_volume(plugin, ledger, cap=cap)
        ledger.publish(vol, staging, plugin.target_path(), cap, publish_context=pctx)
        second = plugin.target_path()
        try:
            ledger.publish(vol, staging, second, cap, publish_context=pctx)  # registered for cleanup if it works
        except grpc.RpcError as e:
            assert e.code() == C.FAILED_PRECONDITION, f"{e.code().name}: {e.details()}"
            assert e.details()
            return
        pytest.fail("SINGLE_NODE_SINGLE_WRITER volume was published at a second target path; the spec's table "
                    "says FAILED_PRECONDITION")


# ---- lifecycles ---------------------------------------------------------------------------------------------------
def check_published(plugin, cap: pb.VolumeCapability, target: str, readonly: bool) -> None:
    if is_block(cap):
        st = os.stat(target)
        assert stat.S_ISBLK(st.st_mode), f"{target} is not a block device node"
        with open(target, "rb") as f:
            f.read(4096)
        if not readonly:
            fd = os.open(target, os.O_WRONLY)
            try:
                os.pwrite(fd, b"sanity", 0)
            finally:
                os.close(fd)
        return
    entry = mount_entry(target)
    assert entry is not None, f"{target} is not a mount point"
    if cap.mount.fs_type:
        assert entry["fstype"] == cap.mount.fs_type
    probe = os.path.join(target, "sanity-probe")
    if readonly:
        assert "ro" in entry["options"], f"read-only publish mounted with {entry['options']}"
        with pytest.raises(OSError) as info:
            with open(probe, "w") as f:
                f.write("x")
        assert info.value.errno == errno.EROFS
    else:
        with open(probe, "w") as f:
            f.write("sanity")
        os.unlink(probe)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("readonly", [False, True], ids=["rw", "ro"])
def test_full_lifecycle(plugin, ledger, kind, readonly):
    """create → (controller publish) → stage → publish → use → unpublish → unstage → (unpublish) → delete; every
    call made twice (idempotency)."""
    cap = cap_for(plugin, kind)
    vol = make_volume(plugin, ledger, cap, kind)
    if readonly and not is_block(cap) and plugin.has("PUBLISH_READONLY") and \
            plugin.has_node("STAGE_UNSTAGE_VOLUME"):
        # ControllerPublishVolume(readonly) makes the volume read-only on the node, so a blank volume cannot get
        # its filesystem then (a reader-only stage never formats): as with a read-only PVC, a writer made it first.
        rw_ctx = ledger.controller_publish(vol.volume_id, cap, False)
        first = plugin.staging_dir()
        ledger.stage(vol, first, cap, rw_ctx)
        ledger.unstage(vol.volume_id, first)
        ledger.controller_unpublish(vol.volume_id)
    pctx = ledger.controller_publish(vol.volume_id, cap, readonly)
    assert ledger.controller_publish(vol.volume_id, cap, readonly) == pctx
    staging = ""
    if plugin.has_node("STAGE_UNSTAGE_VOLUME"):
        staging = plugin.staging_dir()
        ledger.stage(vol, staging, cap, pctx)
        ledger.stage(vol, staging, cap, pctx)
        if not is_block(cap):
            assert is_mounted(staging), "a staged filesystem volume is mounted at the staging path"
    target = plugin.target_path()
    ledger.publish(vol, staging, target, cap, readonly, pctx)
    ledger.publish(vol, staging, target, cap, readonly, pctx)
    check_published(plugin, cap, target, readonly)
    if plugin.has_node("GET_VOLUME_STATS"):
        stats = node(plugin).NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id=vol.volume_id,
                                                                             volume_path=target), timeout=60)
        assert stats.usage
    ledger.unpublish(vol.volume_id, target)
    assert not is_mounted(target)
    # spec: the SP created target_path, so NodeUnpublishVolume removes it (csi-sanity "should remove target path")
    assert not os.path.lexists(target), f"{target} left behind after NodeUnpublishVolume"
    ledger.unpublish(vol.volume_id, target)
    if staging:
        ledger.unstage(vol.volume_id, staging)
        assert not is_mounted(staging)
        ledger.unstage(vol.volume_id, staging)
    ledger.controller_unpublish(vol.volume_id)
    ledger.controller_unpublish(vol.volume_id)
    ledger.delete_volume(vol.volume_id)


def test_lifecycle_with_tester_made_target_dir(plugin, ledger):
    """csi-sanity creates the target directory itself before NodePublishVolume; that must work too."""
    cap = mount_cap("ext4")
    vol, cap, staging, pctx = staged_volume(plugin, ledger, cap=cap)
    target = plugin.target_path()
    os.makedirs(target)
    ledger.publish(vol, staging, target, cap, publish_context=pctx)
    check_published(plugin, cap, target, False)


def test_block_with_tester_made_target_dir(plugin, ledger):
    requires_stage(plugin)
    plugin.require_block()
    vol, cap, staging, pctx = staged_volume(plugin, ledger, "block")
    target = plugin.target_path()
    os.makedirs(target)
    ledger.publish(vol, staging, target, cap, publish_context=pctx)
    check_published(plugin, cap, target, False)


def test_block_with_tester_made_target_file(plugin, ledger):
    requires_stage(plugin)
    plugin.require_block()
    vol, cap, staging, pctx = staged_volume(plugin, ledger, "block")
    target = plugin.target_path()
    open(target, "w").close()
    ledger.publish(vol, staging, target, cap, publish_context=pctx)
    check_published(plugin, cap, target, False)


def test_default_fs_type(plugin, ledger):
    """fs_type empty: the plugin picks its default and mounts it."""
    requires_stage(plugin)
    cap = mount_cap("")
    vol, cap, staging, pctx = staged_volume(plugin, ledger, cap=cap)
    target = plugin.target_path()
    ledger.publish(vol, staging, target, cap, publish_context=pctx)
    check_published(plugin, cap, target, False)


def test_mount_flags_honoured(plugin, ledger):
    requires_stage(plugin)
    cap = mount_cap("ext4", flags=["noatime"])
    vol, cap, staging, pctx = staged_volume(plugin, ledger, cap=cap)
    assert "noatime" in mount_entry(staging)["options"]
    target = plugin.target_path()
    ledger.publish(vol, staging, target, cap, publish_context=pctx)
    assert "noatime" in mount_entry(target)["options"]


def test_reader_only_mode_publishes_read_only(plugin, ledger):
    requires_stage(plugin)
    cap = mount_cap("ext4", "SINGLE_NODE_READER_ONLY")
    writer = mount_cap("ext4")
    vol = make_volume(plugin, ledger, writer)
    # format first through a writer stage, as a CO restoring data would; a blank reader-only volume may be refused.
    # The CO's order each time: ControllerPublish (with the capability), stage; unstage, ControllerUnpublish.
    staging = plugin.staging_dir()
    ledger.stage(vol, staging, writer, ledger.controller_publish(vol.volume_id, writer))
    ledger.unstage(vol.volume_id, staging)
    ledger.controller_unpublish(vol.volume_id)
    pctx = ledger.controller_publish(vol.volume_id, cap, readonly=True)
    ledger.stage(vol, staging, cap, pctx)
    target = plugin.target_path()
    ledger.publish(vol, staging, target, cap, publish_context=pctx)
    check_published(plugin, cap, target, True)


def test_reader_only_stage_never_writes(plugin, ledger):
    """A reader-only stage mounts read-only at the staging path too (not only the publish bind): nothing can be
    written there, and what the writer left is what the reader sees (the guest stage checksums the device too)."""
    requires_stage(plugin)
    writer, reader = mount_cap("ext4"), mount_cap("ext4", "SINGLE_NODE_READER_ONLY")
    vol = make_volume(plugin, ledger, writer)
    staging = plugin.staging_dir()
    ledger.stage(vol, staging, writer, ledger.controller_publish(vol.volume_id, writer))
    target = plugin.target_path()
    ledger.publish(vol, staging, target, writer)
    with open(os.path.join(target, "kept"), "w") as f:
        f.write("data")
    ledger.unpublish(vol.volume_id, target)
    ledger.unstage(vol.volume_id, staging)
    ledger.controller_unpublish(vol.volume_id)
    ledger.stage(vol, staging, reader, ledger.controller_publish(vol.volume_id, reader, readonly=True))
    assert "ro" in mount_entry(staging)["options"], mount_entry(staging)
    with pytest.raises(OSError) as info:
        open(os.path.join(staging, "new"), "w").close()
    assert info.value.errno == errno.EROFS
    with open(os.path.join(staging, "kept")) as f:
        assert f.read() == "data"


def test_reader_only_stage_of_blank_volume_refused(plugin, ledger):
    """A reader-only stage never formats: a blank volume has nothing to read, FAILED_PRECONDITION says so."""
    requires_stage(plugin)
    reader = mount_cap("ext4", "SINGLE_NODE_READER_ONLY")
    vol = make_volume(plugin, ledger, reader)
    pctx = ledger.controller_publish(vol.volume_id, reader, readonly=True)
    staging = plugin.staging_dir()
    err = expect_code(node(plugin).NodeStageVolume, pb.NodeStageVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=staging, volume_capability=reader, publish_context=pctx,
        volume_context=vol.volume_context), C.FAILED_PRECONDITION)
    assert "blank" in err.details() or "filesystem" in err.details(), err.details()
    assert not is_mounted(staging)


def test_multi_node_writer_mount_stage_refused(plugin, ledger):
    """A multi-node writer mount reaching the node (a CO that skipped the controller's answer, a static PV):
    INVALID_ARGUMENT there too, before anything is attached or mounted."""
    requires_stage(plugin)
    writer = mount_cap("ext4")
    vol = make_volume(plugin, ledger, writer)
    pctx = ledger.controller_publish(vol.volume_id, writer)
    staging = plugin.staging_dir()
    expect_code(node(plugin).NodeStageVolume, pb.NodeStageVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=staging, volume_capability=mount_cap("ext4", "MULTI_NODE_MULTI_WRITER"),
        publish_context=pctx, volume_context=vol.volume_context), C.INVALID_ARGUMENT)
    assert not is_mounted(staging)


def test_two_targets_on_one_node(plugin, ledger):
    """SINGLE_NODE_WRITER at two target paths of one node: the spec's table says FAILED_PRECONDITION (SHOULD);
    Kubernetes publishes a RWO volume to several pods of one node, so OK is what drivers do. Both are accepted;
    anything else (or a second mount of another volume) is not."""
    requires_stage(plugin)
    vol, cap, staging, pctx = staged_volume(plugin, ledger)
    t1, t2 = plugin.target_path(), plugin.target_path()
    ledger.publish(vol, staging, t1, cap, publish_context=pctx)
    try:
        ledger.publish(vol, staging, t2, cap, publish_context=pctx)
    except grpc.RpcError as e:
        assert e.code() == C.FAILED_PRECONDITION, f"{e.code().name}: {e.details()}"
        return
    with open(os.path.join(t1, "shared"), "w") as f:
        f.write("both")
    with open(os.path.join(t2, "shared")) as f:
        assert f.read() == "both"


def test_delete_while_staged(plugin, ledger):
    """DeleteVolume of a volume in use either refuses with FAILED_PRECONDITION or the plugin survives it."""
    requires_stage(plugin)
    plugin.require("CREATE_DELETE_VOLUME")
    vol, cap, staging, pctx = staged_volume(plugin, ledger)
    try:
        plugin.client.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id), timeout=60)
    except grpc.RpcError as e:
        assert e.code() == C.FAILED_PRECONDITION, f"{e.code().name}: {e.details()}"
        assert is_mounted(staging)


# ---- NodeGetVolumeStats -------------------------------------------------------------------------------------------
class TestVolumeStats:
    @pytest.fixture(autouse=True)
    def _cap(self, plugin):
        plugin.require_node("GET_VOLUME_STATS")

    def test_missing_fields(self, plugin):
        expect_code(node(plugin).NodeGetVolumeStats, pb.NodeGetVolumeStatsRequest(volume_path=plugin.staging_dir()),
                    C.INVALID_ARGUMENT)
        expect_code(node(plugin).NodeGetVolumeStats, pb.NodeGetVolumeStatsRequest(volume_id=UNKNOWN_VOL),
                    C.INVALID_ARGUMENT)

    def test_unknown_volume(self, plugin, unknown_vol):
        expect_code(node(plugin).NodeGetVolumeStats, pb.NodeGetVolumeStatsRequest(
            volume_id=unknown_vol, volume_path=plugin.staging_dir()), C.NOT_FOUND)

    def test_path_does_not_exist(self, plugin, ledger):
        vol, cap, staging, pctx = staged_volume(plugin, ledger)
        expect_code(node(plugin).NodeGetVolumeStats, pb.NodeGetVolumeStatsRequest(
            volume_id=vol.volume_id, volume_path=os.path.join(plugin.workdir, "no", "such", "path")), C.NOT_FOUND)

    def test_relative_path_unknown_volume(self, plugin, unknown_vol):
        """csi-sanity's exact request: an unknown volume at the relative path "some/path" is NOT_FOUND."""
        expect_code(node(plugin).NodeGetVolumeStats, pb.NodeGetVolumeStatsRequest(
            volume_id=unknown_vol, volume_path="some/path"), C.NOT_FOUND)

    def test_relative_path_is_not_the_volume(self, plugin, ledger):
        """csi-sanity "should fail when volume does not exist on the specified path": a published volume asked
        at "some/path" is NOT_FOUND (no volume can live at a relative path)."""
        vol, cap, staging, pctx = staged_volume(plugin, ledger)
        ledger.publish(vol, staging, plugin.target_path(), cap, publish_context=pctx)
        expect_code(node(plugin).NodeGetVolumeStats, pb.NodeGetVolumeStatsRequest(
            volume_id=vol.volume_id, volume_path="some/path"), C.NOT_FOUND)

    def test_path_is_not_the_volume(self, plugin, ledger):
        vol, cap, staging, pctx = staged_volume(plugin, ledger)
        other = plugin.staging_dir()
        expect_code(node(plugin).NodeGetVolumeStats, pb.NodeGetVolumeStatsRequest(
            volume_id=vol.volume_id, volume_path=other), C.NOT_FOUND)

    def test_other_volume_path(self, plugin, ledger):
        """The path of volume B asked as volume A: NOT_FOUND, not B's figures."""
        a, _, sa, _ = staged_volume(plugin, ledger)
        b, _, sb, _ = staged_volume(plugin, ledger)
        expect_code(node(plugin).NodeGetVolumeStats, pb.NodeGetVolumeStatsRequest(volume_id=a.volume_id,
                                                                                 volume_path=sb), C.NOT_FOUND)

    @pytest.mark.parametrize("kind", KINDS)
    def test_stats(self, plugin, ledger, kind):
        vol, cap, staging, pctx = staged_volume(plugin, ledger, kind)
        target = plugin.target_path()
        ledger.publish(vol, staging, target, cap, publish_context=pctx)
        req = pb.NodeGetVolumeStatsRequest(volume_id=vol.volume_id, volume_path=target, staging_target_path=staging)
        resp = node(plugin).NodeGetVolumeStats(req, timeout=60)
        units = {u.unit: u for u in resp.usage}
        assert pb.VolumeUsage.BYTES in units
        b = units[pb.VolumeUsage.BYTES]
        assert 0 < b.total <= plugin.size_for(kind) + (1 << 20)
        if kind == "block":
            assert b.total == plugin.size_for(kind) or vol.capacity_bytes == b.total
        else:
            assert pb.VolumeUsage.INODES in units and units[pb.VolumeUsage.INODES].total > 0
            assert b.available <= b.total and b.used <= b.total
        if plugin.has_node("VOLUME_CONDITION"):
            assert resp.HasField("volume_condition") and not resp.volume_condition.abnormal
        if kind != "block":
            staging_resp = node(plugin).NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(
                volume_id=vol.volume_id, volume_path=staging), timeout=60)
            assert staging_resp.usage


# ---- NodeExpandVolume -----------------------------------------------------------------------------------------------
class TestNodeExpand:
    @pytest.fixture(autouse=True)
    def _cap(self, plugin):
        plugin.require_node("EXPAND_VOLUME")

    def test_missing_fields(self, plugin):
        expect_code(node(plugin).NodeExpandVolume, pb.NodeExpandVolumeRequest(volume_path=plugin.staging_dir()),
                    C.INVALID_ARGUMENT)
        expect_code(node(plugin).NodeExpandVolume, pb.NodeExpandVolumeRequest(volume_id=UNKNOWN_VOL),
                    C.INVALID_ARGUMENT)

    def test_unknown_volume(self, plugin, unknown_vol):
        expect_code(node(plugin).NodeExpandVolume, pb.NodeExpandVolumeRequest(
            volume_id=unknown_vol, volume_path=plugin.staging_dir()), C.NOT_FOUND)

    def test_relative_path_unknown_volume(self, plugin, unknown_vol):
        """csi-sanity's exact request: NodeExpandVolume of an unknown volume at "some/path" is NOT_FOUND."""
        expect_code(node(plugin).NodeExpandVolume, pb.NodeExpandVolumeRequest(
            volume_id=unknown_vol, volume_path="some/path"), C.NOT_FOUND)

    def test_path_not_the_volume(self, plugin, ledger):
        vol, cap, staging, pctx = staged_volume(plugin, ledger)
        expect_code(node(plugin).NodeExpandVolume, pb.NodeExpandVolumeRequest(
            volume_id=vol.volume_id, volume_path=os.path.join(plugin.workdir, "no-such-path")), C.NOT_FOUND)

    # ext4 online growth needs CAP_SYS_RESOURCE, missing on this host: tested in the real-kernel guest (e2e)
    @pytest.mark.parametrize("kind", ["xfs", "block"])
    def test_online_expand(self, plugin, ledger, kind):
        plugin.require("EXPAND_VOLUME")
        if plugin.client.expansion_type() != pb.PluginCapability.VolumeExpansion.ONLINE:
            pytest.skip("not applicable: the plugin advertises OFFLINE volume expansion (test_offline_expand covers it)")
        vol, cap, staging, pctx = staged_volume(plugin, ledger, kind)
        target = plugin.target_path()
        ledger.publish(vol, staging, target, cap, publish_context=pctx)
        new_size = plugin.size_for(kind) * 2
        resp = plugin.client.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
            volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=new_size), volume_capability=cap),
            timeout=120)
        assert resp.capacity_bytes >= new_size
        if not resp.node_expansion_required:
            return
        req = pb.NodeExpandVolumeRequest(volume_id=vol.volume_id, volume_path=target, staging_target_path=staging,
                                         volume_capability=cap,
                                         capacity_range=pb.CapacityRange(required_bytes=new_size))
        got = node(plugin).NodeExpandVolume(req, timeout=120)
        assert got.capacity_bytes == 0 or got.capacity_bytes >= new_size
        again = node(plugin).NodeExpandVolume(req, timeout=120)
        assert again.capacity_bytes == got.capacity_bytes
        if kind == "block":
            fd = os.open(target, os.O_RDONLY)
            try:
                assert os.lseek(fd, 0, os.SEEK_END) >= new_size
            finally:
                os.close(fd)
        else:
            st = os.statvfs(target)
            assert st.f_blocks * st.f_frsize > plugin.size_for(kind) * 1.5, "the filesystem did not grow"


@pytest.mark.parametrize("kind", ["xfs", "block"])
def test_offline_expand(plugin, ledger, kind):
    """The CO's OFFLINE flow, which every plugin that expands must support: the volume is detached from the node,
    ControllerExpandVolume grows it, and after the next stage (and NodeExpandVolume when asked for) the filesystem or
    device has the new size, with the data written before intact."""
    plugin.require("EXPAND_VOLUME")
    vol, cap, staging, pctx = staged_volume(plugin, ledger, kind)
    target = plugin.target_path()
    ledger.publish(vol, staging, target, cap, publish_context=pctx)
    marker = os.urandom(4096)
    if kind == "block":
        fd = os.open(target, os.O_WRONLY)
        try:
            os.pwrite(fd, marker, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
    else:
        with open(os.path.join(target, "marker"), "wb") as f:
            f.write(marker)
    ledger.unpublish(vol.volume_id, target)
    ledger.unstage(vol.volume_id, staging)
    ledger.controller_unpublish(vol.volume_id)
    new_size = plugin.size_for(kind) * 2
    resp = plugin.client.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=new_size), volume_capability=cap),
        timeout=120)
    assert resp.capacity_bytes >= new_size
    pctx = ledger.controller_publish(vol.volume_id, cap)
    ledger.stage(vol, staging, cap, pctx)
    ledger.publish(vol, staging, target, cap, publish_context=pctx)
    if resp.node_expansion_required:
        got = node(plugin).NodeExpandVolume(pb.NodeExpandVolumeRequest(
            volume_id=vol.volume_id, volume_path=target, staging_target_path=staging, volume_capability=cap,
            capacity_range=pb.CapacityRange(required_bytes=new_size)), timeout=120)
        assert got.capacity_bytes == 0 or got.capacity_bytes >= new_size
    if kind == "block":
        fd = os.open(target, os.O_RDONLY)
        try:
            assert os.lseek(fd, 0, os.SEEK_END) >= new_size
            assert os.pread(fd, len(marker), 0) == marker
        finally:
            os.close(fd)
    else:
        st = os.statvfs(target)
        assert st.f_blocks * st.f_frsize > plugin.size_for(kind) * 1.5, "the filesystem did not grow"
        with open(os.path.join(target, "marker"), "rb") as f:
            assert f.read() == marker
