"""Hypothesis strategies for CSI requests, valid and hostile mixed, across every Identity, Controller, Node,
SnapshotMetadata and GroupController RPC.

A generated `Call` is symbolic: volume IDs and paths are tokens (`@F`, `{stage0}` ...) that the driver resolves
against its live world (the free volume, the volumes created so far, the decoys). Large values (10,000-key maps,
100 kB strings) are built from a small drawn choice, because Hypothesis draws at most a few kB per example.

Every path a request carries lies under the run's temporary directory: the suite never names a real host file."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hypothesis import strategies as st

from csi._pb import csi_pb2 as pb

Mode = pb.VolumeCapability.AccessMode
VALID_MODES = [Mode.SINGLE_NODE_WRITER, Mode.SINGLE_NODE_SINGLE_WRITER, Mode.SINGLE_NODE_MULTI_WRITER,
               Mode.SINGLE_NODE_READER_ONLY]
OTHER_MODES = [Mode.MULTI_NODE_READER_ONLY, Mode.MULTI_NODE_SINGLE_WRITER, Mode.MULTI_NODE_MULTI_WRITER]
BAD_MODES = [0, 8, 99, -1, 2 ** 30, -(2 ** 31), 2 ** 31 - 1]
MIB = 1 << 20
SECRET = "HOSTILE-SECRET-VALUE-7731"  # must never reach the log

# ---- symbolic values ---------------------------------------------------------------------------------------------
# the free volume, volumes created during the run, and (`@STAGED_VOL`) one that is staged now, if any
VALID_IDS = ["@F", "@C0", "@C1", "@STAGED_VOL", "@STAGED_VOL"]
PROTECTED_IDS = ["@P1", "@P2"]  # published volumes whose paths are decoys
HOSTILE_IDS = ["", "x", ":", "local:", "local:vol-nothing", "local:vol-00000000-0000-0000-0000-000000000000",
               "nope:vol-1", "local:../../decoys/passwd", "local:vol-../../x", "local:snap-nothing", "LOCAL:VOL-1",
               "local:vol-\u00e9\u00e8", "local:vol-a\nb", "local:vol-a b", "local:vol-%2e%2e%2f", "\x00",
               "local:vol-\x00", "a" * 129, "@LONG5000", "@LONG200000", "@P1img", "{kubelet}/decoys/full"]
SNAPSHOT_IDS = ["@S0", "@S1", "@S2", "@M0", "", "local:snap-nothing", "nope:snap-1", "local:vol-x", "@LONG5000",
                "local:snap-../../x"]  # @M0: a member snapshot of a group made during the run
GROUP_IDS = ["@G0", "@G1", "", "local:group-nothing", "local:group-00000000-0000-0000-0000-000000000000",
             "nope:group-1", "local:group-../../x", "local:snap-nothing", "@LONG5000", "local:vol-x"]

# `@STAGED`: where the request's volume is staged now (if anywhere); `@PUBLISHED`: one of its targets now
VALID_STAGE = ["{stage0}", "{stage1}", "{stage2}", "{stage3}", "@STAGED", "@STAGED", "@STAGED"]
VALID_TARGET = ["{target0}", "{target1}", "{target2}", "{target3}", "@PUBLISHED", "@PUBLISHED"]
DECOY_PATHS = [
    "{kubelet}/decoys/passwd", "{kubelet}/decoys/empty", "{kubelet}/decoys/full", "{kubelet}/decoys/full/keep.txt",
    "{kubelet}/decoys/tmpfs", "{kubelet}/decoys/link-to-full", "{kubelet}/decoys/link-to-full/sub",
    "{kubelet}/decoys/link-to-passwd", "{kubelet}/decoys/full/new-dir",
    "{state}/decoys/passwd", "{state}/decoys/empty", "{state}/decoys/full", "{state}/decoys/tmpfs",
    "{state}/decoys/link-to-full", "{state}", "{state}/file", "{state}/file/volumes", "{state}/node",
    "{P1stage}", "{P1target}", "{P2stage}", "{P2target}", "{P1img}", "{P2img}",
]
HOSTILE_PATHS = [
    "", "relative/path", "./x", "{kubelet}//decoys/full", "//{kubelet}/decoys/empty", "{scratch}/../decoys/full",
    "{scratch}/./stage-0", "{scratch}/stage-0/", "{scratch}/stage-0/..", "{scratch}/nope/deeper/x",
    "{scratch}/pod-0", "{kubelet}/decoys/empty/../full", "{scratch}/bad\x00nul", "{scratch}/new\nline",
    "{scratch}/" + "n" * 300, "@LONGPATH", "{root}", "{kubelet}", "{scratch}",
]


def mix(*groups: list, weights: Optional[list[int]] = None) -> st.SearchStrategy:
    """One of the groups, the earlier (valid) ones drawn as often as their weight says."""
    weights = weights or [1] * len(groups)
    return st.one_of(*[st.sampled_from(g) for g, w in zip(groups, weights) for _ in range(w)])


volume_ids = mix(VALID_IDS, PROTECTED_IDS, HOSTILE_IDS, weights=[3, 1, 2])
stage_paths = mix(VALID_STAGE, DECOY_PATHS, HOSTILE_PATHS, weights=[3, 2, 1])
target_paths = mix(VALID_TARGET, DECOY_PATHS, HOSTILE_PATHS, weights=[3, 2, 1])
any_path = mix(VALID_STAGE, VALID_TARGET, DECOY_PATHS, HOSTILE_PATHS)
sizes = mix([0, 1, 4096, MIB, 8 * MIB, 32 * MIB, 64 * MIB],
            [1 << 30, 16 << 40, (16 << 40) - 1, 2 ** 62, 2 ** 63 - 1, -1, -(2 ** 63), 1 << 50], weights=[2, 1])
modes = mix(VALID_MODES, OTHER_MODES, BAD_MODES, weights=[4, 1, 1])
fs_types = mix(["", "ext4"], ["xfs", "btrfs", "EXT4", "../../ext4", "ext4 -o remount", "@LONG5000"], weights=[3, 1])
flag = st.sampled_from(["ro", "noexec", "nosuid", "remount", "offset=4096", "bind", "rbind", "bogus", "a,b",
                        "loop", "x-mount.mkdir", "@LONG5000", "", "sizelimit=1"])
mount_flags = st.one_of(st.just([]), st.just([]), st.just([]), st.lists(flag, max_size=3))
names = mix([f"h-{i}" for i in range(6)], ["", "a" * 129, "@LONG200000", "名前", "a/../b", "x\x00y", " "],
            weights=[3, 1])
maps = st.sampled_from(["{}"] * 5 + ["@HUGE_MAP", "@WIDE_MAP", "@LONG_KEY"])
parameters = st.sampled_from(["{}", "{}", "{}", "@HUGE_MAP", "@BACKEND_LOCAL", "@BACKEND_NOPE", "@BACKEND_LONG",
                              "@PVC_META", "@ONE_UNKNOWN", "@LONG_KEY"])
contexts = st.sampled_from(["{}"] * 6 + ["@CTX_P1IMG", "@CTX_DECOY", "@HUGE_MAP", "@CTX_RELATIVE"])
secrets = st.sampled_from(["{}"] * 4 + ["@SECRET", "@HUGE_MAP"])
node_ids = mix(["@NODE"], ["", "other-node", "a?b=c&&d", "@LONG5000", "node\x00", "x" * 300], weights=[2, 1])
tokens = st.sampled_from(["", "", "t1.", "t1.!!!", "t1.bG9jYWw6dm9sLXg", "garbage", "@LONG5000"])
max_entries = st.sampled_from([0, 0, 1, 2, -1, 2 ** 31 - 1, -(2 ** 31)])
bools = st.booleans()


@st.composite
def capabilities(draw, block: Optional[bool] = None) -> pb.VolumeCapability:
    kind = draw(st.sampled_from(["mount", "mount", "block", "none"])) if block is None else \
        ("block" if block else "mount")
    cap = pb.VolumeCapability()
    if kind == "mount":
        cap.mount.fs_type = draw(fs_types)
        cap.mount.mount_flags.extend(draw(mount_flags))
        if draw(st.integers(0, 9)) == 0:
            cap.mount.volume_mount_group = draw(st.sampled_from(["1000", "-1", "root", "@LONG5000"]))
    elif kind == "block":
        cap.block.SetInParent()
    if draw(st.integers(0, 9)) != 0:
        cap.access_mode.mode = draw(modes)
    return cap


@st.composite
def valid_capabilities(draw) -> pb.VolumeCapability:
    """What a CO sends for a volume of this plugin: mount ext4 (or the default) or block, a single-node mode."""
    cap = pb.VolumeCapability(access_mode=Mode(mode=draw(st.sampled_from(VALID_MODES))))
    if draw(st.integers(0, 2)) == 0:
        cap.block.SetInParent()
    else:
        cap.mount.fs_type = draw(st.sampled_from(["", "ext4"]))
    return cap


some_capability = st.one_of(valid_capabilities(), valid_capabilities(), valid_capabilities(), capabilities(),
                            st.none())
capability_lists = st.one_of(st.lists(valid_capabilities(), min_size=1, max_size=2),
                             st.lists(capabilities(), min_size=0, max_size=3))


@dataclass
class Call:
    """One request: the method, its symbolic fields, and how it travels (`corrupt`: a string field's bytes are made
    invalid UTF-8 on the wire; `raw`: these bytes are sent instead of any message)."""
    method: str
    fields: dict[str, Any] = field(default_factory=dict)
    corrupt: bool = False
    raw: Optional[bytes] = None


def call(method: str, **fields: st.SearchStrategy) -> st.SearchStrategy:
    return st.builds(lambda f, c: Call(method, f, corrupt=c), st.fixed_dictionaries(fields),
                     st.sampled_from([False] * 11 + [True]))


def _capacity() -> st.SearchStrategy:
    return st.one_of(st.just(None), st.tuples(sizes, sizes), st.tuples(sizes, st.just(0)), st.tuples(sizes, st.just(0)))


# Methods whose arbitrary bytes are harmless wherever they decode (no path or ID acted on): raw garbage goes there.
GARBAGE_METHODS = ["/csi.v1.Identity/GetPluginInfo", "/csi.v1.Identity/Probe", "/csi.v1.Identity/GetPluginCapabilities",
                   "/csi.v1.Controller/ControllerGetCapabilities", "/csi.v1.Controller/ListVolumes",
                   "/csi.v1.Controller/GetCapacity", "/csi.v1.Controller/ValidateVolumeCapabilities",
                   "/csi.v1.Node/NodeGetInfo", "/csi.v1.Node/NodeGetCapabilities"]

garbage = st.builds(lambda m, b: Call(m, raw=b), st.sampled_from(GARBAGE_METHODS),
                    st.one_of(st.binary(max_size=48), st.sampled_from([b"\x0a\x05ab", b"\xff" * 8, b"\x0a\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01"])))

# What a CO does on a node, to give the plugin real state among the hostile requests: stage a volume at a fresh
# staging directory (or an empty directory nobody owns), publish a staged one where it was staged (`@STAGED_CAP`: a
# capability of the access type it was staged with) to a fresh target, an empty directory, or a new directory inside
# a non-empty one.
valid_node = st.one_of(
    call("NodeStageVolume", volume_id=st.sampled_from(["@F", "@C0", "@C1"]),
         staging=st.sampled_from(VALID_STAGE[:4] + ["{kubelet}/decoys/empty"]), cap=valid_capabilities(),
         context=st.just("{}"), publish_context=st.just("{}"), secrets=st.just("{}")),
    call("NodePublishVolume", volume_id=st.just("@STAGED_VOL"), staging=st.just("@STAGED"),
         target=st.sampled_from(VALID_TARGET[:4] + ["{kubelet}/decoys/empty", "{kubelet}/decoys/full/new-dir"]),
         cap=st.just("@STAGED_CAP"), readonly=bools, context=st.just("{}"), publish_context=st.just("{}"),
         secrets=st.just("{}")),
)

CALLS = st.one_of(
    valid_node, valid_node,
    # Identity
    call("GetPluginInfo"), call("GetPluginCapabilities"), call("Probe"),
    # Controller
    call("CreateVolume", name=names, capacity=_capacity(), caps=capability_lists, parameters=parameters,
         secrets=secrets, source=st.one_of(st.just(None), st.tuples(st.sampled_from(["snapshot", "volume"]),
                                                                     mix(SNAPSHOT_IDS, VALID_IDS, HOSTILE_IDS))),
         topology=st.sampled_from([None, "@NODE", "other-node", "@WIDE_TOPOLOGY"])),
    call("DeleteVolume", volume_id=volume_ids, secrets=secrets),
    call("ControllerPublishVolume", volume_id=volume_ids, node_id=node_ids, cap=some_capability,
         readonly=bools, context=contexts, secrets=secrets),
    call("ControllerUnpublishVolume", volume_id=volume_ids, node_id=node_ids, secrets=secrets),
    call("ValidateVolumeCapabilities", volume_id=volume_ids, caps=capability_lists, context=contexts,
         parameters=parameters, secrets=secrets),
    call("ListVolumes", max_entries=max_entries, token=tokens),
    call("GetCapacity", caps=capability_lists, parameters=parameters, topology=st.sampled_from([None, "@NODE",
                                                                                                "other-node"])),
    call("ControllerGetCapabilities"),
    call("CreateSnapshot", source=volume_ids, name=names, parameters=parameters, secrets=secrets),
    call("DeleteSnapshot", snapshot_id=mix(SNAPSHOT_IDS, HOSTILE_IDS), secrets=secrets),
    call("ListSnapshots", max_entries=max_entries, token=tokens, snapshot_id=st.one_of(st.just(""), mix(SNAPSHOT_IDS)),
         source=st.one_of(st.just(""), volume_ids)),
    call("GetSnapshot", snapshot_id=mix(SNAPSHOT_IDS)),
    call("ControllerExpandVolume", volume_id=volume_ids, capacity=_capacity(), cap=some_capability,
         secrets=secrets),
    call("ControllerGetVolume", volume_id=volume_ids),
    call("ControllerModifyVolume", volume_id=volume_ids, mutable=maps),
    # Node
    call("NodeStageVolume", volume_id=volume_ids, staging=stage_paths, cap=some_capability,
         context=contexts, publish_context=maps, secrets=secrets),
    call("NodeUnstageVolume", volume_id=volume_ids, staging=stage_paths),
    call("NodePublishVolume", volume_id=volume_ids, staging=stage_paths, target=target_paths,
         cap=some_capability, readonly=bools, context=contexts, publish_context=maps,
         secrets=secrets),
    call("NodeUnpublishVolume", volume_id=volume_ids, target=target_paths),
    call("NodeGetVolumeStats", volume_id=volume_ids, path=any_path, staging=st.one_of(st.just(""), stage_paths)),
    call("NodeExpandVolume", volume_id=volume_ids, path=any_path, staging=st.one_of(st.just(""), stage_paths),
         capacity=_capacity(), cap=some_capability),
    call("NodeGetCapabilities"), call("NodeGetInfo"),
    # SnapshotMetadata (server-streaming)
    call("GetMetadataAllocated", snapshot_id=mix(SNAPSHOT_IDS, HOSTILE_IDS), offset=sizes,
         max_results=st.sampled_from([0, 1, 256, 4096, 4097, -1, 2 ** 31 - 1, -(2 ** 31)]), secrets=secrets),
    call("GetMetadataDelta", base=mix(SNAPSHOT_IDS, HOSTILE_IDS), target=mix(SNAPSHOT_IDS, HOSTILE_IDS),
         offset=sizes, max_results=st.sampled_from([0, 1, 256, 4097, -1]), secrets=secrets),
    # GroupController
    call("GroupControllerGetCapabilities"),
    call("CreateVolumeGroupSnapshot", name=names,
         sources=st.lists(mix(["@F", "@C0", "@C1", "@STAGED_VOL"], HOSTILE_IDS, weights=[8, 1]),
                          min_size=1, max_size=3, unique=True),
         parameters=st.sampled_from(["{}"] * 6 + ["@PVC_META", "@HUGE_MAP", "@ONE_UNKNOWN", "@BACKEND_LOCAL"]),
         secrets=secrets),
    call("DeleteVolumeGroupSnapshot", group=mix(GROUP_IDS, HOSTILE_IDS, weights=[3, 1]),
         snapshot_ids=st.lists(mix(SNAPSHOT_IDS), max_size=3), secrets=secrets),
    call("GetVolumeGroupSnapshot", group=mix(GROUP_IDS, HOSTILE_IDS, weights=[3, 1]),
         snapshot_ids=st.lists(mix(SNAPSHOT_IDS), max_size=3), secrets=secrets),
    # raw bytes protobuf cannot (or can only oddly) decode
    garbage,
)

SERVICE = {
    "GetPluginInfo": "Identity", "GetPluginCapabilities": "Identity", "Probe": "Identity",
    "NodeStageVolume": "Node", "NodeUnstageVolume": "Node", "NodePublishVolume": "Node",
    "NodeUnpublishVolume": "Node", "NodeGetVolumeStats": "Node", "NodeExpandVolume": "Node",
    "NodeGetCapabilities": "Node", "NodeGetInfo": "Node",
    "GetMetadataAllocated": "SnapshotMetadata", "GetMetadataDelta": "SnapshotMetadata",
    "GroupControllerGetCapabilities": "GroupController", "CreateVolumeGroupSnapshot": "GroupController",
    "DeleteVolumeGroupSnapshot": "GroupController", "GetVolumeGroupSnapshot": "GroupController",
}
STREAMING = frozenset({"GetMetadataAllocated", "GetMetadataDelta"})
ALL_METHODS = sorted({"GetPluginInfo", "GetPluginCapabilities", "Probe", "CreateVolume", "DeleteVolume",
                      "ControllerPublishVolume", "ControllerUnpublishVolume", "ValidateVolumeCapabilities",
                      "ListVolumes", "GetCapacity", "ControllerGetCapabilities", "CreateSnapshot", "DeleteSnapshot",
                      "ListSnapshots", "GetSnapshot", "ControllerExpandVolume", "ControllerGetVolume",
                      "ControllerModifyVolume", *[m for m, s in SERVICE.items() if s in ("Node", "SnapshotMetadata", "GroupController")]})


def full_method(method: str) -> str:
    return f"/csi.v1.{SERVICE.get(method, 'Controller')}/{method}"
