"""The one interface between the CSI services and the storage.

The CSI services (`csi/controller.py`, `csi/node.py`) call only what is defined here and never look at a backend's
type. They have already validated the request, taken the per-name/per-volume lock, resolved the capacity range and
parsed IDs; a backend receives plain Python values (no protobuf, no gRPC) and raises `backends.errors` types.

Ground rules every backend keeps:
- *Idempotent by name.* The backing object's name is derived deterministically from the request name
  (`object_uuid`), and the request name and parameters are stored on the object itself, so a retried or concurrent
  create after a crash finds the object instead of making a second one. No database anywhere.
- *Crash-safe.* Every multi-step change is ordered so that a crash leaves either nothing, or something the retry
  of the same call completes or cleans up.
- *Secrets* arrive in `secrets` mappings and are never logged, stored in the volume context, or put in messages.
- *No shell.* External commands run through `backends.util.run` with an argument list.
"""
from __future__ import annotations

import abc
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Iterator, Literal, Mapping, Optional

from pydantic import BaseModel, ConfigDict

from .errors import Unsupported

if TYPE_CHECKING:
    from .locking import LockProvider

AccessType = Literal["mount", "block"]

# CSI access modes by their enum names.
SINGLE_NODE_MODES = frozenset({"SINGLE_NODE_WRITER", "SINGLE_NODE_READER_ONLY",
                               "SINGLE_NODE_SINGLE_WRITER", "SINGLE_NODE_MULTI_WRITER"})
MULTI_NODE_MODES = frozenset({"MULTI_NODE_READER_ONLY", "MULTI_NODE_SINGLE_WRITER", "MULTI_NODE_MULTI_WRITER"})
ALL_MODES = SINGLE_NODE_MODES | MULTI_NODE_MODES
READER_ONLY_MODES = frozenset({"SINGLE_NODE_READER_ONLY", "MULTI_NODE_READER_ONLY"})
MULTI_NODE_WRITER_MODES = frozenset({"MULTI_NODE_SINGLE_WRITER", "MULTI_NODE_MULTI_WRITER"})

_NAME_NAMESPACE = uuid.UUID("5c1f4a8e-6d0b-4b7e-9d7a-2f1c3e8b9a10")


def object_uuid(driver_name: str, request_name: str) -> str:
    """The deterministic backing-object identity for a CO request name (UUIDv5 of driver and name)."""
    return str(uuid.uuid5(_NAME_NAMESPACE, f"{driver_name}/{request_name}"))


class BackendOptions(BaseModel):
    """Base of each backend's config model; unknown keys are errors so typos surface at load time."""
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


@dataclass(frozen=True)
class ContentSource:
    """A CreateVolume content source, already resolved to the same backend as the new volume."""
    kind: Literal["snapshot", "volume"]
    local_id: str


@dataclass(frozen=True)
class CapabilitySpec:
    """One requested volume capability, reduced to what storage decisions depend on."""
    access_type: AccessType
    access_mode: str
    fs_type: str = ""
    mount_flags: tuple[str, ...] = ()


def mount_writer_problem(cap: "CapabilitySpec") -> Optional[str]:
    """Why a capability cannot be served safely by any backend here, or None.

    Every filesystem Tessera formats (ext4, xfs) is a single-host filesystem: it caches metadata and replays its
    journal as if it were alone, so a second node mounting it while one writes (MULTI_NODE_MULTI_WRITER), or even
    reading beside one writer (MULTI_NODE_SINGLE_WRITER: the readers' caches go stale and their journal replay
    fights the writer), corrupts it or shows garbage. Multi-node writer modes are therefore raw block only, where
    the application coordinates its writers."""
    if cap.access_type == "mount" and cap.access_mode in MULTI_NODE_WRITER_MODES:
        return (f"access mode {cap.access_mode} is available for raw block volumes only: a mounted "
                f"{cap.fs_type or 'ext4/xfs'} filesystem is a single-host filesystem, and a second node writing or "
                "reading beside a writer corrupts it; use a block volume or MULTI_NODE_READER_ONLY")
    return None


@dataclass
class CreateVolumeSpec:
    name: str
    size_bytes: int  # the resolved size to create: required_bytes or the default, before rounding
    limit_bytes: int  # 0 = no limit; a backend that rounds up must not exceed it (raise OutOfRange)
    parameters: dict[str, str]
    secrets: Mapping[str, str]
    capabilities: list[CapabilitySpec]
    source: Optional[ContentSource] = None
    # Topology: each entry is a segments dict. Empty lists mean "no requirement".
    requisite: list[dict[str, str]] = field(default_factory=list)
    preferred: list[dict[str, str]] = field(default_factory=list)


@dataclass
class Volume:
    local_id: str
    capacity_bytes: int
    name: str = ""  # the CO request name stored on the object
    context: dict[str, str] = field(default_factory=dict)  # what a node needs to attach it; nothing secret
    parameters: dict[str, str] = field(default_factory=dict)  # creation parameters, for compatibility checks
    source: Optional[ContentSource] = None
    topology: list[dict[str, str]] = field(default_factory=list)  # empty: accessible from every node
    abnormal: bool = False
    condition_message: str = ""
    published_nodes: list[str] = field(default_factory=list)
    # the mutable parameters in force (ControllerModifyVolume, CreateVolume's mutable_parameters), read back from
    # the storage like every other parameter; shown in the volume context
    mutable_parameters: dict[str, str] = field(default_factory=dict)


@dataclass
class Snapshot:
    local_id: str
    source_volume_local_id: str
    size_bytes: int
    creation_time: float  # seconds since the epoch
    ready_to_use: bool = True
    name: str = ""
    # The local ID of the group snapshot this snapshot was cut in ("" for a standalone snapshot). A member is
    # deleted with its group only (DeleteVolumeGroupSnapshot): the spec lets the CO treat it as part of the group.
    group_local_id: str = ""


@dataclass
class Capacity:
    available_bytes: int
    maximum_volume_size: Optional[int] = None
    minimum_volume_size: Optional[int] = None


@dataclass(frozen=True)
class Features:
    """What a backend supports; the controller advertises the union and refuses per volume the rest."""
    snapshots: bool = False
    clones: bool = False
    expand: bool = False
    online_expand: bool = True
    controller_publish: bool = False  # serves ControllerPublish/Unpublish (the controller advertises the RPCs)
    # ControllerPublish grants access a node cannot attach without (iSCSI ACLs): attachRequired must be true, and
    # a FlexVolume `init` answers attach: true. A backend that only records publications (RBD) leaves it false.
    publish_needed: bool = False
    list_volumes: bool = True
    capacity: bool = True
    node_local: bool = False  # volumes live on one node (topology); CreateVolume must run on that node
    # Volume.published_nodes is the truth (the CSI node IDs each volume is controller-published to), so the
    # controller may advertise LIST_VOLUMES_PUBLISHED_NODES when every backend says so
    published_nodes: bool = False
    block: bool = True
    access_modes: frozenset[str] = SINGLE_NODE_MODES
    volume_condition: bool = True
    group_snapshots: bool = False  # create_group_snapshot & co. (the GroupController service)


@dataclass
class Attachment:
    """A device made present on this node; `data` is persisted in the node's stage record so that detach works
    after a restart or reboot without asking anyone."""
    device: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Runtime:
    """Process-wide facts a backend may need."""
    driver_name: str
    node_name: str
    state_dir: str
    topology_key: str


class Backend(abc.ABC):
    """One configured storage backend. Subclasses set `type_name` and `options_model` and implement the methods
    their `features()` promise; the defaults raise Unsupported."""

    type_name: ClassVar[str]
    options_model: ClassVar[type[BackendOptions]]

    def __init__(self, name: str, options: BackendOptions, runtime: Runtime) -> None:
        self.name = name
        self.options = options
        self.runtime = runtime

    # ---- facts -------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def features(self) -> Features: ...

    def allocation_unit(self) -> int:
        """Sizes are rounded up to a multiple of this."""
        return 1 << 20

    def max_volume_bytes(self, parameters: Mapping[str, str] = {}) -> Optional[int]:
        """The largest volume this backend could ever hold with these StorageClass parameters (None: no limit below
        the CSI int64 range). Why: a size past the storage's or the file system's real limit fails deep inside the
        storage (EFBIG, OverflowError, a refused resize) after work has begun; the controller refuses it first with
        OUT_OF_RANGE, and a node knows not to wait for a device to grow that far."""
        return None

    def validate_parameters(self, parameters: Mapping[str, str]) -> None:
        """Raise InvalidArgument for an unknown or malformed StorageClass parameter."""

    def probe(self) -> None:
        """Raise BackendUnavailable when the storage cannot be used right now (Probe RPC of a controller)."""

    def node_probe(self) -> None:
        """Raise BackendUnavailable when this node cannot attach the backend's volumes (Probe RPC of a node plugin).

        Why apart from `probe`: a node plugin's liveness must not follow the storage's control plane (a Ceph
        outage, an iSCSI target host's reboot must not restart every node plugin). Node-local backends keep their
        storage on the node, so by default the two are the same check for them and nothing for shared backends."""
        if self.features().node_local:
            self.probe()

    def close(self) -> None:
        """Release connections at shutdown."""

    # ---- operations that never race (csi/locks.py has the claims and the conflict matrix) -------------------
    def operation_lock_provider(self) -> Optional["LockProvider"]:
        """Where the controller's operation locks on this backend's objects must also hold across processes (a
        backends.locking.LockProvider, e.g. a lease in shared storage that several controller replicas use), or
        None (the default): in-process locks suffice because one process serves this storage (node-local
        backends; a single-instance controller, see `claim_controller`)."""
        return None

    def claim_controller(self) -> None:
        """Called once when a process starts serving the controller service. A backend that must have exactly one
        controller for its storage takes an exclusive claim here (held until the process exits) and raises
        FailedPrecondition naming the other holder, so a second controller refuses to start instead of racing."""

    def local_id_for_name(self, kind: Literal["volume", "snapshot"], name: str,
                          parameters: Mapping[str, str]) -> Optional[str]:
        """The local ID a create of `name` (a CreateVolume or CreateSnapshot request name) gives, derived without
        I/O, so the controller can lock that object before it exists (a delete of it must not remove what the
        create is still writing). None (the default) when the backend cannot say; then only the name is locked."""
        return None

    def find_by_name(self, name: str, secrets: Mapping[str, str]) -> Optional[Volume]:
        """The volume a CreateVolume of `name` made in this backend, wherever it could have gone (every pool or
        group this backend is configured for): one lookup of each deterministic object, no listing. The controller
        asks every backend before creating, so a retry naming another backend or pool answers ALREADY_EXISTS
        instead of making a second volume. None when there is none (the default: the backend cannot tell)."""
        return None

    def find_elsewhere(self, name: str, parameters: Mapping[str, str],
                       secrets: Mapping[str, str]) -> Optional[Volume]:
        """`find_by_name`, minus the one place a create of `name` with `parameters` uses: that place the create
        looks at itself (and returns what it finds there), so the controller's check before a create in this
        backend costs no second lookup of it. The default suits a backend with one place per name: nothing else
        to search."""
        return None

    # ---- controller ---------------------------------------------------------------------------------------
    @abc.abstractmethod
    def create_volume(self, spec: CreateVolumeSpec) -> Volume:
        """Create the volume for `spec.name`, or return the one that already exists for that name (the controller
        then checks compatibility). Raise OutOfRange / CapacityExceeded / NotFound (source) as fitting."""

    @abc.abstractmethod
    def delete_volume(self, local_id: str, secrets: Mapping[str, str]) -> None:
        """Delete; a volume that does not exist is success. InUse when it cannot go yet."""

    @abc.abstractmethod
    def get_volume(self, local_id: str, secrets: Mapping[str, str]) -> Volume:
        """The volume, or NotFound."""

    def list_volumes(self, secrets: Mapping[str, str]) -> Iterable[Volume]:
        raise Unsupported(f"backend {self.name!r} cannot list volumes")

    def iter_volumes(self, start_after: str, secrets: Mapping[str, str]) -> Iterator[Volume]:
        """The volumes whose local ID sorts after `start_after` ('' = all), in ascending local ID order, each loaded
        only when the caller asks for the next one. Why: ListVolumes reads one page of 100 out of 10,000 volumes,
        so a backend that can enumerate its IDs cheaply (a directory scan, one `lvs`, `rbd ls`) must not load the
        other 9,900. This default sorts a full `list_volumes`, so a backend works before it overrides it."""
        return iter(sorted((v for v in self.list_volumes(secrets) if v.local_id > start_after),
                           key=lambda v: v.local_id))

    def get_capacity(self, parameters: Mapping[str, str], segments: Optional[Mapping[str, str]]) -> Capacity:
        raise Unsupported(f"backend {self.name!r} cannot report capacity")

    def create_snapshot(self, source_local_id: str, name: str, parameters: Mapping[str, str],
                        secrets: Mapping[str, str]) -> Snapshot:
        raise Unsupported(f"backend {self.name!r} does not support snapshots")

    def delete_snapshot(self, local_id: str, secrets: Mapping[str, str]) -> None:
        raise Unsupported(f"backend {self.name!r} does not support snapshots")

    def get_snapshot(self, local_id: str, secrets: Mapping[str, str]) -> Snapshot:
        raise Unsupported(f"backend {self.name!r} does not support snapshots")

    def list_snapshots(self, secrets: Mapping[str, str]) -> Iterable[Snapshot]:
        raise Unsupported(f"backend {self.name!r} does not support snapshots")

    def iter_snapshots(self, start_after: str, secrets: Mapping[str, str]) -> Iterator[Snapshot]:
        """The snapshots after `start_after` in ascending local ID order, loaded lazily: as `iter_volumes`."""
        return iter(sorted((s for s in self.list_snapshots(secrets) if s.local_id > start_after),
                           key=lambda s: s.local_id))

    def expand_volume(self, local_id: str, size_bytes: int, secrets: Mapping[str, str]) -> tuple[int, bool]:
        """Grow to at least `size_bytes`; return (new capacity, whether the node must grow something)."""
        raise Unsupported(f"backend {self.name!r} does not support expansion")

    def controller_publish(self, local_id: str, node: Any, readonly: bool, capability: CapabilitySpec,
                           context: Mapping[str, str], secrets: Mapping[str, str]) -> dict[str, str]:
        """Grant `node` (a csi.ids.NodeRef) access; return the publish context (may hold per-volume secrets such
        as CHAP credentials: the node receives them, nothing logs them). Idempotent."""
        return {}

    def controller_unpublish(self, local_id: str, node: Any, secrets: Mapping[str, str]) -> None:
        """Revoke access; `node` None means every node. Idempotent."""

    # ---- node -----------------------------------------------------------------------------------------------
    def node_attributes_for_name(self, node_name: str) -> dict[str, str]:
        """The node attributes (see `node_attributes`) of a node known by name only — a FlexVolume attach runs in
        kube-controller-manager before anything runs on the node. Backends that need attributes derive them from
        the name by a convention the operator configures, or raise FailedPrecondition saying what to set."""
        return {}

    def node_attribute_remedy(self, key: str, want: str) -> str:
        """What an operator does so that this node has attribute `key` = `want` (see `node_attributes_for_name`)."""
        return f"give this node {key}={want}"

    def secret_publish_keys(self) -> frozenset[str]:
        """Keys of this backend's publish context that are credentials. Where the publish context must travel
        through a place others can read (a FlexVolume attach answer lands in the Node object's status), these keys
        are left out and the node asks `node_publish_secrets` for them instead."""
        return frozenset()

    def node_publish_secrets(self, local_id: str) -> dict[str, str]:
        """On the node: the credential part of the publish context (see `secret_publish_keys`), derived from what
        this node's config holds. Raise FailedPrecondition when the node cannot derive them."""
        return {}

    def node_attributes(self) -> dict[str, str]:
        """Facts about this node that the controller needs at publish (e.g. the iSCSI initiator IQN)."""
        return {}

    @abc.abstractmethod
    def node_attach(self, local_id: str, context: Mapping[str, str], publish_context: Mapping[str, str],
                    secrets: Mapping[str, str], *, readonly: bool = False,
                    multi_writer: bool = False) -> Attachment:
        """Make the volume's block device present on this node. Idempotent: attaching an attached volume returns
        the same device.

        `readonly` (a reader-only access mode): attach read-only *at the device* (krbd/rbd-nbd --read-only, a
        write-protected LUN, losetup -r, a read-only dm table), so neither a journal replay nor a stray write can
        change the volume. `multi_writer` (MULTI_NODE_MULTI_WRITER, raw block): other nodes may write at the same
        time. Otherwise a read-write attach while the backend can see another node holding the volume read-write
        (RBD watchers, ...) raises FailedPrecondition naming the holder.

        Every field taken from `context` (which a static PV supplies) is checked against the storage's naming
        rules and the backend's configuration before use: InvalidArgument otherwise."""

    @abc.abstractmethod
    def node_detach(self, local_id: str, attachment: Attachment) -> None:
        """Undo node_attach. Idempotent: a device that is already gone is success."""

    def node_refresh_size(self, local_id: str, attachment: Attachment) -> None:
        """Make the kernel see a grown device (loop capacity refresh, iSCSI rescan, ...)."""

    def node_attachment_valid(self, local_id: str, attachment: Attachment,
                              context: Mapping[str, str]) -> Optional[bool]:
        """Whether `attachment` (as `node_attach` returned it, kept in the node's stage record, possibly from an
        earlier boot) is *still* this volume's device on this node. The node plugin asks before it trusts a record:
        at every NodeStage of a staged volume, before every NodePublish binds the device, before an unstage hands
        the recorded device to `node_detach`, and when it starts.

        Answer from the kernel's state now, never from the record alone, and quickly (no storage round trip where
        the kernel can tell; this runs at every stage and publish):
        - True: proven — `attachment.device` exists and the kernel shows that it is this volume (file: the loop
          device's backing file is the volume's image, same inode and filesystem; rbd: /sys/bus/rbd/devices/<id>/
          {pool,name} name this image, or the nbd device's process serves it; iscsi: the SCSI disk's target IQN and
          LUN are this volume's; lvm: the device-mapper node is this LV).
        - False: proven not — the device is gone or now belongs to something else. The node attaches again
          (`node_attach`) and never passes this device to `node_detach`.
        - None (this default): cannot tell. The node attaches again at NodeStage (node_attach is idempotent, so
          an attached volume gets its same device back); at NodePublish it then relies on the device number it
          recorded in this boot. Override it so that a reboot or a device reused behind the plugin's back is
          caught rather than assumed away.
        Must not raise for a missing or foreign device (answer False); `context` is the volume context recorded
        at stage (nothing secret)."""
        return None

    def owned_paths(self) -> list[str]:
        """Host directories this backend owns (its images, its own state). The node plugin refuses any staging or
        target path that is, or lies under, one of them, whatever the request or the allowed prefixes say."""
        return []

    # ---- what an operator watches (csi/usage_metrics.py exports it) ---------------------------------------
    def orphans(self) -> list["Orphan"]:
        """Backing objects with Tessera's marks that form no complete volume or snapshot: what a crashed create or
        delete left. Read-only: `tessera-csi volumes orphans` shows them, nothing deletes them."""
        raise Unsupported(f"backend {self.name!r} cannot list orphans yet")

    def usage(self) -> "Usage":
        """How full this backend's storage is and how many volumes and snapshots it holds, for the metrics endpoint.
        Called from a background thread every few tens of seconds, never from an RPC. The default counts what the
        list calls return and takes the free space from `get_capacity`; override it to report the total and the
        storage's own figures (a thin pool's data and metadata use). A part that fails is left out and its reason
        kept in `problems`, so one unreachable figure does not hide the others."""
        out = Usage()
        parts = [("volumes", lambda: sum(1 for _ in self.list_volumes({}))),
                 ("free_bytes", lambda: self.get_capacity({}, None).available_bytes)]
        if self.features().snapshots:
            parts.append(("snapshots", lambda: sum(1 for _ in self.list_snapshots({}))))
        for attr, read in parts:
            try:
                setattr(out, attr, read())
            except Unsupported:
                pass
            except Exception as e:  # noqa: BLE001 - reported as a problem, never raised into the metrics thread
                out.problems.append(f"{attr}: {e}")
        return out

    # ---- changed-block tracking (the SnapshotMetadata service, csi/snapshot_metadata.py) --------------------
    def metadata_block_size(self) -> Optional[int]:
        """The unit, in bytes, that `allocated_ranges` and `changed_ranges` align their extents to (each extent
        starts on a multiple of it and ends on one or at the volume's end), or None (the default): this backend
        cannot tell which blocks of a snapshot hold data or changed, and the service answers FAILED_PRECONDITION
        for its snapshots (the caller then makes a full backup)."""
        return None

    def allocated_ranges(self, snapshot_local_id: str, start: int, secrets: Mapping[str, str]) -> "RangeStream":
        """The extents of the snapshot that hold data (were written), from the one holding byte `start` on.
        NotFound for a snapshot that does not exist, raised here, before any range is produced; the ranges
        themselves come lazily (a generator that opens what it reads itself) so memory stays flat."""
        raise Unsupported(f"backend {self.name!r} cannot report the allocated blocks of a snapshot")

    def changed_ranges(self, base_local_id: str, target_local_id: str, start: int,
                       secrets: Mapping[str, str]) -> "RangeStream":
        """The extents whose content differs between two snapshots of one volume (the caller checked that they
        are), from the one holding byte `start` on; the stream's capacity is the target's size. Same rules as
        `allocated_ranges`."""
        raise Unsupported(f"backend {self.name!r} cannot report the changed blocks between snapshots")

    # ---- mutable parameters (ControllerModifyVolume, VolumeAttributesClass) ---------------------------------
    def mutable_parameters(self) -> Mapping[str, "MutableParameter"]:
        """The keys ControllerModifyVolume (and CreateVolume's `mutable_parameters`) may set on this backend's
        volumes, each with its check. Empty (the default): the backend honours none, and any key is refused with
        INVALID_ARGUMENT before anything changes. Why declared, not just tried: the spec forbids a partial change,
        so every key and value is checked against this table before `modify_volume` runs."""
        return {}

    def modify_volume(self, local_id: str, changes: Mapping[str, str], secrets: Mapping[str, str]) -> "Volume":
        """Store and apply `changes` (keys of `mutable_parameters`, values already checked and normalized) on the
        volume itself, so they survive a controller restart; keys not named keep their values (the spec: nothing
        changes because a key is absent). Idempotent. NotFound when the volume does not exist. Returns the volume
        as it is now."""
        raise Unsupported(f"backend {self.name!r} has no mutable parameters")

    def node_io_limits(self, local_id: str, attachment: Optional["Attachment"] = None) -> Mapping[str, str]:
        """On the node: the I/O limits the node must enforce for the volume now, as `io_max_*` keys
        (backends/io_limits.py), read from the storage itself so a ControllerModifyVolume made after the publish is
        seen. `attachment`: how the volume is attached here (a backend whose client enforces limits itself, like
        librbd, returns nothing for it). Empty (the default): nothing to enforce on the node."""
        return {}

    # ---- group snapshots (the GroupController service, csi/group_controller.py over csi/groupops.py) ---------
    def group_local_id_for_name(self, name: str) -> Optional[str]:
        """The local ID a CreateVolumeGroupSnapshot of `name` gives, derived without I/O (for the lock table), or
        None when the backend cannot say."""
        return None

    def create_group_snapshot(self, name: str, source_local_ids: list[str], parameters: Mapping[str, str],
                              secrets: Mapping[str, str]) -> "GroupSnapshot":
        """Snapshot every source volume at one instant (write-order consistent across them), or return the group
        that already exists for `name` (the controller then compares its sources and parameters). Idempotent by
        name and crash-safe: the group is recorded on the storage last, so a create that died half-way is redone
        by its retry and never shows as a group (its leftover member snapshots are removed by that retry). Raise
        FailedPrecondition when the members cannot be paused together (the spec's "cannot snapshot multiple
        volumes together")."""
        raise Unsupported(f"backend {self.name!r} does not support group snapshots")

    def delete_group_snapshot(self, local_id: str, secrets: Mapping[str, str]) -> None:
        """Delete the group and every member snapshot; members first, the group's record last, so a retry after a
        crash still knows what is left. A group that does not exist is success."""
        raise Unsupported(f"backend {self.name!r} does not support group snapshots")

    def get_group_snapshot(self, local_id: str, secrets: Mapping[str, str]) -> "GroupSnapshot":
        """The group and its member snapshots, or NotFound."""
        raise Unsupported(f"backend {self.name!r} does not support group snapshots")


@dataclass
class GroupSnapshot:
    """A group snapshot: member snapshots cut at one instant, each also an ordinary snapshot (restorable, listed)
    that names the group in `group_local_id`."""
    local_id: str
    name: str
    members: list[Snapshot]
    creation_time: float  # seconds since the epoch: the instant the members were cut
    parameters: dict[str, str] = field(default_factory=dict)

    @property
    def ready_to_use(self) -> bool:
        return bool(self.members) and all(m.ready_to_use for m in self.members)

    @property
    def source_volume_local_ids(self) -> list[str]:
        return [m.source_volume_local_id for m in self.members]


@dataclass
class RangeStream:
    """Snapshot metadata from a backend: the volume size the snapshot(s) describe, known before streaming starts
    (the service checks the requested offset against it), and the extents as an ascending, lazily computed
    iterator of (offset, length) (see backends/range_diff.py)."""
    capacity_bytes: int
    ranges: Iterator[tuple[int, int]]


@dataclass
class Usage:
    """One backend's fill level. None: the backend cannot tell (the metric is then absent rather than a guess)."""
    total_bytes: Optional[int] = None
    free_bytes: Optional[int] = None
    volumes: Optional[int] = None
    snapshots: Optional[int] = None
    # the storage's own gauges, e.g. {"thin_data_percent": 71.5, "thin_metadata_percent": 12.0}
    gauges: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Orphan:
    """A backing object that carries Tessera's marks but is no complete volume or snapshot."""
    object: str  # the storage's own name for it (a path, pool/image, vg/lv)
    reason: str  # what is missing or left over, in words an operator can act on


@dataclass(frozen=True)
class MutableParameter:
    """One key a backend lets ControllerModifyVolume change. `check` returns the value as it will be stored
    (normalized, e.g. "0100" -> "100") or raises ValueError with a reason a person can act on."""
    description: str
    check: Callable[[str], str]


def non_negative_int(text: str) -> str:
    """A MutableParameter check: a decimal integer in [0, 2^63-1] (0 usually means "no limit")."""
    if not text.isascii() or not text.isdigit():
        raise ValueError("must be a non-negative decimal integer")
    value = int(text)
    if value > (1 << 63) - 1:
        raise ValueError("is larger than 2^63-1")
    return str(value)
