"""Node-local volumes as LVM logical volumes: thick LVs in a volume group, or thin LVs in a thin pool.

Deployment consequence: an LV exists on one node only, so every volume reports the topology
`{topology.tessera.csi.dev/node: <node>}` and CreateVolume must run *on that node*. The controller service for this
backend therefore runs on every node (`tessera-csi serve --mode all`) with the external-provisioner in
node-deployment mode; a request whose accessibility requirements exclude this node fails with RESOURCE_EXHAUSTED
("Unable to provision in accessible_topology"), so the CO tries elsewhere.

Metadata lives in LV tags (namespace `tessera`, see `lvm_volumes`): kind, request name, parameters, content source,
snapshot origin and time. A create that needs more than one LVM command (clones, copies, grows) carries the tag
`tessera.state=pending` until its last step; a retry that finds a pending LV removes it and starts again, so a crash
never leaves a half-made volume that looks finished.

What each mode supports:
- thin (thinPool set): snapshots (thin snapshots, block-sharing, independent of their origin), volumes from
  snapshots and clones of volumes (thin snapshots with activation enabled), online expansion. Capacity is
  `pool size × overcommitRatio − Σ virtual sizes of the pool's LVs`; maximum_volume_size is pool size × ratio
  (thick: the VG size); a request above it is OUT_OF_RANGE, one that does not fit now RESOURCE_EXHAUSTED.
- thick: clones of volumes (a full copy read from a transient COW snapshot of the source, so the copy is
  point-in-time consistent), online expansion. *Snapshots are not supported* (a classic LVM snapshot dies with its
  origin and when its COW area fills, which breaks the CSI snapshot contract): CreateSnapshot and volumes from
  snapshots fail with an "unsupported" error telling the operator to configure a thin pool. Capacity is the VG's
  free extents.
"""
from __future__ import annotations

import os
import time
from typing import Iterable, Iterator, Mapping, Optional

from pydantic import Field, field_validator, model_validator

from . import io_limits, lvm_group, lvm_top
from .base import (Attachment, Backend, BackendOptions, Capacity, ContentSource, CreateVolumeSpec, Features,
                   GroupSnapshot, MutableParameter, Orphan, SINGLE_NODE_MODES, Snapshot, Usage, Volume,
                   object_uuid)
from .errors import (BackendUnavailable, CapacityExceeded, FailedPrecondition, InvalidArgument, NotFound, OutOfRange, TesseraError,
                     Unsupported)
from .errors import listing
from .lvm_volumes import LvInfo, LvmVolumes, fields_to_tags, validate_name

VOLUME_PREFIX = "tv-"
SNAPSHOT_PREFIX = "ts-"
TEMP_PREFIX = "tt-"
NS = "tessera"
PENDING_TAG = fields_to_tags(NS, {"state": "pending"})[0]


class LvmOptions(BackendOptions):
    volumeGroup: str = Field(description="the volume group holding the volumes (must exist on every node)")
    thinPool: Optional[str] = Field(None, description="thin pool LV in the VG; unset = thick LVs")
    overcommitRatio: float = Field(1.0, ge=1.0, le=100.0,
                                   description="thin only: virtual sizes may add up to pool size × this")
    commandTimeout: float = Field(120.0, gt=0, description="seconds each LVM command may take")

    @field_validator("volumeGroup", "thinPool")
    @classmethod
    def _name(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            try:
                validate_name(v, "LVM")
            except InvalidArgument as e:
                raise ValueError(str(e)) from None
        return v

    @model_validator(mode="after")
    def _ratio_needs_pool(self) -> "LvmOptions":
        if self.overcommitRatio != 1.0 and not self.thinPool:
            raise ValueError("overcommitRatio applies only to thin volumes: set thinPool too")
        return self


class LvmBackend(Backend):
    type_name = "lvm"
    options_model = LvmOptions
    options: LvmOptions

    def __init__(self, name: str, options: LvmOptions, runtime) -> None:  # type: ignore[no-untyped-def]
        super().__init__(name, options, runtime)
        self.lvm = LvmVolumes(options.volumeGroup, options.thinPool, timeout=options.commandTimeout)
        self._extent: Optional[int] = None

    @property
    def thin(self) -> bool:
        return bool(self.options.thinPool)

    def features(self) -> Features:
        return Features(snapshots=self.thin, clones=True, expand=True, online_expand=True, node_local=True,
                        access_modes=SINGLE_NODE_MODES, group_snapshots=self.thin)

    def allocation_unit(self) -> int:
        if self._extent is None:
            try:
                self._extent = self.lvm.vg_info().extent_size or (4 << 20)
            except TesseraError:
                return 4 << 20  # VG unreachable now; CreateVolume will report that itself
        return self._extent

    def max_volume_bytes(self, parameters: Mapping[str, str] = {}) -> int:
        """Thin: the pool's size × overcommitRatio; thick: the VG's size (see _room)."""
        return self._room()[1]

    def validate_parameters(self, parameters: Mapping[str, str]) -> None:
        if parameters:
            raise InvalidArgument(f"the lvm backend takes no StorageClass parameters; got {listing(parameters)}")

    def probe(self) -> None:
        self.lvm.vg_info()
        if self.thin:
            self.lvm.pool_info()

    # ---- helpers -----------------------------------------------------------------------------------------
    def _topology(self) -> list[dict[str, str]]:
        return [{self.runtime.topology_key: self.runtime.node_name}]

    def _mine(self, lv: LvInfo) -> bool:
        """An LV of this backend: our tags, and in our pool (thin) or outside any pool (thick)."""
        if self.thin:
            return lv.pool == self.options.thinPool
        return not lv.pool and not lv.is_thin and not lv.is_thin_pool

    def _volume(self, lv: LvInfo) -> Volume:
        f = lv.fields(NS)
        src = None
        if "source" in f and ":" in f["source"]:
            kind, _, sid = f["source"].partition(":")
            src = ContentSource(kind, sid)  # type: ignore[arg-type]
        params = {k[2:]: v for k, v in f.items() if k.startswith("p.")}
        mutable = {k[2:]: v for k, v in f.items() if k.startswith("m.")}
        abnormal, msg = False, ""
        if f.get("state") == "pending":
            abnormal, msg = True, "creation did not finish; a retried CreateVolume will redo it"
        elif len(lv.attr) > 8 and lv.attr[8] in "pX":
            abnormal, msg = True, f"LVM reports the volume unhealthy (lv_attr {lv.attr})"
        return Volume(local_id=lv.name, capacity_bytes=lv.size, name=f.get("name", ""),
                      context={"volumeGroup": self.lvm.vg, "logicalVolume": lv.name}, parameters=params, source=src,
                      topology=self._topology(), abnormal=abnormal, condition_message=msg, mutable_parameters=mutable)

    def _snapshot(self, lv: LvInfo) -> Snapshot:
        f = lv.fields(NS)
        try:
            ctime = float(f.get("ctime", "0"))
        except ValueError:
            ctime = 0.0
        return Snapshot(local_id=lv.name, source_volume_local_id=f.get("of", lv.origin), size_bytes=lv.size,
                        creation_time=ctime, ready_to_use=f.get("state") != "pending", name=f.get("name", ""),
                        group_local_id=f.get("group", ""))

    def _paused(self, local_ids: list[str]):  # type: ignore[no-untyped-def]
        """The volumes' device layers on this node suspended for the block (backends/lvm_top.py), with the marker
        that lets the next call resume what a crash left paused."""
        os.makedirs(self.runtime.state_dir, exist_ok=True)
        marker = os.path.join(self.runtime.state_dir, f"lvm-{self.name}.paused.json")
        return lvm_top.paused([(self.lvm.vg, lid) for lid in local_ids], marker)

    def _find(self, local_id: str, kind: str, prefix: str) -> Optional[LvInfo]:
        if not local_id.startswith(prefix):
            return None
        try:
            validate_name(local_id)
        except InvalidArgument:
            return None
        lv = self.lvm.find(local_id)
        if lv is None or not self._mine(lv) or lv.fields(NS).get("kind") != kind:
            return None
        return lv

    def _check_topology(self, spec: CreateVolumeSpec) -> None:
        """Requisite (or, with no requisite, preferred) segments must allow this node; else RESOURCE_EXHAUSTED."""
        key, node = self.runtime.topology_key, self.runtime.node_name
        allowed = spec.requisite or spec.preferred
        if not allowed:
            return
        if not any(set(seg) <= {key} and seg.get(key, node) == node for seg in allowed):
            raise CapacityExceeded(f"Unable to provision in accessible_topology: backend {self.name!r} makes "
                                   f"node-local volumes on node {node!r} only, which the request does not allow")

    def _room(self) -> tuple[int, int]:
        """(free bytes now, the largest volume this backend could ever hold). Thin: the pool's size × ratio minus
        the virtual sizes of its LVs, and pool size × ratio; thick: the VG's free extents, and the VG's size."""
        if self.thin:
            lvs = self.lvm.list()
            pool = next((lv for lv in lvs if lv.name == self.options.thinPool and lv.is_thin_pool), None)
            if pool is None:
                raise BackendUnavailable(f"thin pool {self.lvm.vg}/{self.options.thinPool} not found")
            limit = int(pool.size * self.options.overcommitRatio)
            used = sum(lv.size for lv in lvs if lv.pool == self.options.thinPool)
            return max(0, limit - used), limit
        vg = self.lvm.vg_info()
        return vg.free, vg.size

    def _ensure_room(self, size: int, new_volume_size: int = 0) -> None:
        """OutOfRange when no volume of `new_volume_size` can exist here at all (above maximum_volume_size),
        CapacityExceeded when `size` more bytes do not fit now."""
        free, maximum = self._room()
        where = (f"thin pool {self.lvm.vg}/{self.options.thinPool} (overcommitRatio {self.options.overcommitRatio})"
                 if self.thin else f"volume group {self.lvm.vg}")
        if new_volume_size > maximum:
            raise OutOfRange(f"{new_volume_size} bytes is more than the largest volume {where} can hold "
                             f"({maximum} bytes)")
        if size > free:
            raise CapacityExceeded(f"{where} has room for {free} more bytes; {size} requested")

    def _fix_tags(self, name: str, wanted: list[str]) -> None:
        """Make the LV's tessera tags exactly `wanted` + pending (snapshots may inherit their origin's tags)."""
        lv = self.lvm.find(name)
        if lv is None:
            raise NotFound(f"logical volume {self.lvm.vg}/{name} vanished")
        ours = [t for t in lv.tags if t.startswith(NS + ".")]
        self.lvm.del_tags(name, [t for t in ours if t not in wanted and t != PENDING_TAG])
        self.lvm.add_tags(name, [t for t in wanted if t not in lv.tags])

    # ---- volumes -----------------------------------------------------------------------------------------
    def local_id_for_name(self, kind: str, name: str, parameters: Mapping[str, str]) -> Optional[str]:
        if kind == "volume":
            return VOLUME_PREFIX + object_uuid(self.runtime.driver_name, name)
        return SNAPSHOT_PREFIX + object_uuid(self.runtime.driver_name, "snapshot/" + name)

    def find_by_name(self, name: str, secrets: Mapping[str, str]) -> Optional[Volume]:
        """One `lvs` of the name's LV in this backend's VG (and pool)."""
        lv = self._find(VOLUME_PREFIX + object_uuid(self.runtime.driver_name, name), "volume", VOLUME_PREFIX)
        return self._volume(lv) if lv is not None else None

    def create_volume(self, spec: CreateVolumeSpec) -> Volume:
        self._check_topology(spec)
        local_id = VOLUME_PREFIX + object_uuid(self.runtime.driver_name, spec.name)
        existing = self.lvm.find(local_id)
        if existing is not None:
            if existing.fields(NS).get("state") != "pending":
                return self._volume(existing)
            self.lvm.remove(local_id, wipe=not self.thin)  # an earlier attempt crashed half-way: start over
        fields = {"kind": "volume", "name": spec.name}
        fields.update({f"p.{k}": v for k, v in spec.parameters.items()})
        if spec.source is not None:
            fields["source"] = f"{spec.source.kind}:{spec.source.local_id}"
        tags = fields_to_tags(NS, fields)
        size = spec.size_bytes
        if spec.source is None:
            self._ensure_room(size, size)
            return self._volume(self.lvm.create(local_id, size, tags, thin=self.thin))
        if spec.source.kind == "snapshot":
            src = self._find(spec.source.local_id, "snapshot", SNAPSHOT_PREFIX)
        else:
            src = self._find(spec.source.local_id, "volume", VOLUME_PREFIX)
        if src is None:
            raise NotFound(f"source {spec.source.kind} {self.name}:{spec.source.local_id} does not exist")
        if size < src.size:
            raise OutOfRange(f"requested {size} bytes is smaller than the source {spec.source.kind} "
                             f"({src.size} bytes)")
        if spec.limit_bytes and src.size > spec.limit_bytes:
            raise OutOfRange(f"the source {spec.source.kind} ({src.size} bytes) exceeds limit_bytes {spec.limit_bytes}")
        self._ensure_room(size, size)
        if self.thin:
            # a volume in use is paused for the instant of its snapshot, so its filesystem is cut clean (LVM's own
            # freeze reaches the LV, not the filesystem on Tessera's layer above it)
            with self._paused([src.name] if spec.source.kind == "volume" else []):
                self.lvm.snapshot(src.name, local_id, tags + [PENDING_TAG], activation_skip=False)
            self._fix_tags(local_id, tags)
            self.lvm.resize(local_id, size)
        else:
            if spec.source.kind == "snapshot":
                raise Unsupported(f"backend {self.name!r} uses thick LVs, which have no snapshots; configure a "
                                  "thinPool for snapshots")
            self._thick_copy(src, local_id, size, tags)
        self.lvm.del_tags(local_id, [PENDING_TAG])
        lv = self.lvm.find(local_id)
        assert lv is not None
        return self._volume(lv)

    def _thick_copy(self, src: LvInfo, dest: str, size: int, tags: list[str]) -> None:
        """Full copy of a thick LV, read from a transient COW snapshot so the copy is one point in time even when
        the source is mounted and written meanwhile."""
        self.lvm.create(dest, size, tags + [PENDING_TAG], thin=False)
        temp = TEMP_PREFIX + object_uuid(self.runtime.driver_name, "copy/" + dest)
        self.lvm.remove_cow_snapshot(temp)  # a leftover of a crashed copy
        extent = self.allocation_unit()
        cow = self.lvm.round_up(min(src.size, max(64 << 20, src.size // 5)), extent)
        self.lvm.activate(src.name)
        self.lvm.snapshot(src.name, temp, fields_to_tags(NS, {"kind": "temp"}), activation_skip=False, cow_size=cow)
        try:
            self.lvm.copy(temp, dest, src.size)
        finally:
            self.lvm.remove_cow_snapshot(temp)

    def delete_volume(self, local_id: str, secrets: Mapping[str, str]) -> None:
        lv = self._find(local_id, "volume", VOLUME_PREFIX)
        if lv is not None:
            # thick: zero before the extents return to the VG, so no later volume shows this one's bytes (thin
            # LVs get fresh blocks, which the pool zeroes on first write)
            self.lvm.remove(local_id, wipe=not self.thin)

    def get_volume(self, local_id: str, secrets: Mapping[str, str]) -> Volume:
        lv = self._find(local_id, "volume", VOLUME_PREFIX)
        if lv is None:
            raise NotFound(f"volume {self.name}:{local_id} does not exist")
        return self._volume(lv)

    def list_volumes(self, secrets: Mapping[str, str]) -> Iterable[Volume]:
        return list(self.iter_volumes("", secrets))

    def iter_volumes(self, start_after: str, secrets: Mapping[str, str]) -> Iterator[Volume]:
        """One `lvs` call per page (it returns every LV with its tags); only the page's entries are converted."""
        return (self._volume(lv) for lv in sorted(self.lvm.list(), key=lambda x: x.name)
                if lv.name > start_after and lv.name.startswith(VOLUME_PREFIX) and self._mine(lv)
                and lv.fields(NS).get("kind") == "volume")

    def get_capacity(self, parameters: Mapping[str, str], segments: Optional[Mapping[str, str]]) -> Capacity:
        if segments and segments.get(self.runtime.topology_key, self.runtime.node_name) != self.runtime.node_name:
            return Capacity(0)
        free, maximum = self._room()
        return Capacity(available_bytes=free, maximum_volume_size=maximum, minimum_volume_size=self.allocation_unit())

    def expand_volume(self, local_id: str, size_bytes: int, secrets: Mapping[str, str]) -> tuple[int, bool]:
        lv = self._find(local_id, "volume", VOLUME_PREFIX)
        if lv is None:
            raise NotFound(f"volume {self.name}:{local_id} does not exist")
        if lv.size >= size_bytes:
            return lv.size, False
        self._ensure_room(size_bytes - lv.size, size_bytes)
        return self.lvm.resize(local_id, size_bytes).size, True

    # ---- snapshots --------------------------------------------------------------------------------------
    def create_snapshot(self, source_local_id: str, name: str, parameters: Mapping[str, str],
                        secrets: Mapping[str, str]) -> Snapshot:
        if parameters:
            raise InvalidArgument(f"the lvm backend takes no snapshot parameters; got {listing(parameters)}")
        if not self.thin:
            raise Unsupported(f"backend {self.name!r} uses thick LVs, which cannot keep snapshots; configure a "
                              "thinPool for snapshots")
        local_id = SNAPSHOT_PREFIX + object_uuid(self.runtime.driver_name, "snapshot/" + name)
        existing = self.lvm.find(local_id)
        if existing is not None:
            if existing.fields(NS).get("state") != "pending":
                return self._snapshot(existing)
            self.lvm.remove(local_id)
        src = self._find(source_local_id, "volume", VOLUME_PREFIX)
        if src is None:
            raise NotFound(f"source volume {self.name}:{source_local_id} does not exist")
        self._ensure_room(src.size)
        tags = fields_to_tags(NS, {"kind": "snapshot", "name": name, "of": source_local_id,
                                   "ctime": f"{time.time():.3f}"})
        with self._paused([source_local_id]):  # see create_volume
            self.lvm.snapshot(source_local_id, local_id, tags + [PENDING_TAG], activation_skip=True)
        self._fix_tags(local_id, tags)
        self.lvm.del_tags(local_id, [PENDING_TAG])
        lv = self.lvm.find(local_id)
        assert lv is not None
        return self._snapshot(lv)

    def delete_snapshot(self, local_id: str, secrets: Mapping[str, str]) -> None:
        if self._find(local_id, "snapshot", SNAPSHOT_PREFIX) is not None:
            self.lvm.remove(local_id)

    def get_snapshot(self, local_id: str, secrets: Mapping[str, str]) -> Snapshot:
        lv = self._find(local_id, "snapshot", SNAPSHOT_PREFIX)
        group = lv.fields(NS).get("group") if lv is not None else None
        if lv is None or (group and lvm_group.load(self, group) is None):  # a member of an unfinished group
            raise NotFound(f"snapshot {self.name}:{local_id} does not exist")
        return self._snapshot(lv)

    def list_snapshots(self, secrets: Mapping[str, str]) -> Iterable[Snapshot]:
        return list(self.iter_snapshots("", secrets))

    def iter_snapshots(self, start_after: str, secrets: Mapping[str, str]) -> Iterator[Snapshot]:
        if not self.thin:
            return iter(())
        lvs = self.lvm.list()
        groups = lvm_group.committed_groups(self, lvs)
        return (self._snapshot(lv) for lv in sorted(lvs, key=lambda x: x.name)
                if lv.name > start_after and lv.name.startswith(SNAPSHOT_PREFIX) and self._mine(lv)
                and lv.fields(NS).get("kind") == "snapshot" and lv.fields(NS).get("group", "") in groups | {""})

    # ---- group snapshots (thin): backends/lvm_group.py ------------------------------------------------------
    def group_local_id_for_name(self, name: str) -> Optional[str]:
        return lvm_group.group_local_id(self.runtime.driver_name, name)

    def create_group_snapshot(self, name: str, source_local_ids: list[str], parameters: Mapping[str, str],
                              secrets: Mapping[str, str]) -> GroupSnapshot:
        if not self.thin:
            raise Unsupported(f"backend {self.name!r} uses thick LVs, which cannot keep snapshots; configure a "
                              "thinPool for group snapshots")
        return lvm_group.create(self, name, source_local_ids, parameters)

    def delete_group_snapshot(self, local_id: str, secrets: Mapping[str, str]) -> None:
        lvm_group.delete(self, local_id)

    def get_group_snapshot(self, local_id: str, secrets: Mapping[str, str]) -> GroupSnapshot:
        return lvm_group.get(self, local_id)

    # ---- mutable parameters: node I/O limits (backends/io_limits.py), kept as `m.<key>` tags --------------
    def mutable_parameters(self) -> Mapping[str, MutableParameter]:
        return io_limits.IO_MAX_PARAMETERS

    def modify_volume(self, local_id: str, changes: Mapping[str, str], secrets: Mapping[str, str]) -> Volume:
        lv = self._find(local_id, "volume", VOLUME_PREFIX)
        if lv is None:
            raise NotFound(f"volume {self.name}:{local_id} does not exist")
        old = [t for t in lv.tags if any(t.startswith(f"{NS}.m.{k}=") for k in changes)]
        new = fields_to_tags(NS, {f"m.{k}": v for k, v in changes.items()})
        self.lvm.add_tags(local_id, [t for t in new if t not in lv.tags])
        self.lvm.del_tags(local_id, [t for t in old if t not in new])
        return self.get_volume(local_id, secrets)

    def node_io_limits(self, local_id: str, attachment: Optional[Attachment] = None) -> Mapping[str, str]:
        lv = self._find(local_id, "volume", VOLUME_PREFIX)
        return self._volume(lv).mutable_parameters if lv is not None else {}

    # ---- node -------------------------------------------------------------------------------------------
    def node_attach(self, local_id: str, context: Mapping[str, str], publish_context: Mapping[str, str],
                    secrets: Mapping[str, str], *, readonly: bool = False,
                    multi_writer: bool = False) -> Attachment:
        # A static PV names VG and LV in its context: both must follow LVM's naming rules, the VG must be this
        # backend's and the LV one of its tagged volumes (the LV comes from the volume ID, never from the context
        # alone), so a PV cannot reach any other LV on the node.
        vg = context.get("volumeGroup", self.lvm.vg)
        validate_name(vg, "VG")
        if vg != self.lvm.vg:
            raise FailedPrecondition(f"volume {self.name}:{local_id} is in volume group {vg!r}, but this node's "
                                     f"backend {self.name!r} uses {self.lvm.vg!r}")
        lv_name = context.get("logicalVolume", local_id)
        validate_name(lv_name, "LV")
        if lv_name != local_id:
            raise InvalidArgument(f"volume context names LV {lv_name!r}, but volume {self.name}:{local_id} is LV "
                                  f"{local_id!r}")
        lv = self._find(local_id, "volume", VOLUME_PREFIX)
        if lv is None:
            raise NotFound(f"volume {self.name}:{local_id} does not exist on node {self.runtime.node_name!r}")
        # a reader-only attach gets a read-only LV (the dm table refuses writes: no journal replay, no mkfs); a
        # writer's attach turns it back
        self.lvm.set_permission(local_id, not readonly)
        if not lv.active:
            self.lvm.activate(local_id)
        if not os.path.exists(self.lvm.device_path(local_id)):
            self.lvm.wait_for_device(local_id)
        # the volume is used through Tessera's own device-mapper layer over the LV (backends/lvm_top.py), which a
        # group snapshot suspends to pause the volume's writers
        path = lvm_top.ensure(self.lvm.vg, local_id, readonly)
        return Attachment(device=path, data={"volumeGroup": self.lvm.vg, "logicalVolume": local_id,
                                             "layer": lvm_top.top_name(self.lvm.vg, local_id)})

    def node_detach(self, local_id: str, attachment: Attachment) -> None:
        lv = self._find(local_id, "volume", VOLUME_PREFIX)
        if lv is None:
            return
        lvm_top.remove(self.lvm.vg, local_id)  # only our own layer over this LV; none for a pre-layer stage
        lv = self.lvm.find(local_id)
        if lv is not None and lv.active and not lv.open:
            self.lvm.deactivate(local_id)

    def node_refresh_size(self, local_id: str, attachment: Attachment) -> None:
        """lvextend resized the LV's own table in this same kernel; the layer above it gets a table of the new size
        (a volume staged straight on its LV by an older version has none)."""
        validate_name(local_id, "LV")
        lvm_top.refresh(self.lvm.vg, local_id)

    def node_attachment_valid(self, local_id: str, attachment: Attachment,
                              context: Mapping[str, str]) -> Optional[bool]:
        """The recorded device's number is the device-mapper node LVM made for this backend's VG and this
        volume's LV (its dm name, backends/node_proof.py): a deactivated LV, or a dm minor now another LV's, is
        not. The LV is the volume ID's, never the record's."""
        from . import node_proof
        try:
            validate_name(local_id, "LV")
        except TesseraError:
            return False
        rdev = node_proof.device_rdev(attachment.device)
        return rdev is not None and (lvm_top.is_layer_of(rdev, self.lvm.vg, local_id)
                                     or node_proof.dm_is_lv(rdev, self.lvm.vg, local_id))  # staged before the layer



    def orphans(self) -> list[Orphan]:
        """This backend's LVs whose create never finished (still tagged pending: a retry of that create removes and
        redoes it), and LVs with Tessera's name prefix but without its tags (made by hand, or tags lost)."""
        out: list[Orphan] = []
        for lv in self.lvm.list():
            if not self._mine(lv) or not lv.name.startswith((VOLUME_PREFIX, SNAPSHOT_PREFIX)):
                continue
            f = lv.fields(NS)
            where = f"{lv.vg}/{lv.name}"
            if f.get("state") == "pending":
                out.append(Orphan(where, f"{f.get('kind', 'object')} {f.get('name', '')!r} whose create did not "
                                         "finish (tagged pending); retrying that create removes and redoes it"))
            elif "kind" not in f or "name" not in f:
                out.append(Orphan(where, "LV with Tessera's name prefix but without its tags (no request name)"))
        return out

    def usage(self) -> Usage:
        """The VG's size and free space (thick) or the thin pool's size and room under overcommitRatio (thin), the
        counts from one `lvs`, and for a thin pool its data and metadata use: a pool whose data or metadata reaches
        100 % stops every thin LV in it, so operators alert well before."""
        out = Usage()
        try:
            lvs = self.lvm.list()
            mine = [lv for lv in lvs if self._mine(lv)]
            out.volumes = sum(1 for lv in mine if lv.name.startswith(VOLUME_PREFIX))
            out.snapshots = sum(1 for lv in mine if lv.name.startswith(SNAPSHOT_PREFIX))
            if self.thin:
                pool = next((lv for lv in lvs if lv.name == self.options.thinPool and lv.is_thin_pool), None)
                if pool is None:
                    out.problems.append(f"thin pool {self.lvm.vg}/{self.options.thinPool} not found")
                else:
                    out.gauges["thin_data_percent"] = pool.data_percent
                    out.gauges["thin_metadata_percent"] = pool.metadata_percent
                    out.total_bytes = int(pool.size * self.options.overcommitRatio)
                    used = sum(lv.size for lv in lvs if lv.pool == self.options.thinPool)
                    out.free_bytes = max(0, out.total_bytes - used)
            else:
                vg = self.lvm.vg_info()
                out.total_bytes, out.free_bytes = vg.size, vg.free
        except Exception as e:  # noqa: BLE001 - reported as a problem, never raised into the metrics thread
            out.problems.append(f"lvm: {e}")
        return out

    # ---- changed-block tracking: thin only, from the pool's metadata (backends/lvm_diff.py) --------------
    def _thin_metadata(self):  # type: ignore[no-untyped-def]
        from .lvm_diff import ThinPoolMetadata
        if getattr(self, "_thin_meta", None) is None:
            assert self.options.thinPool
            self._thin_meta = ThinPoolMetadata(self.lvm.vg, self.options.thinPool,
                                               os.path.join(self.runtime.state_dir, "lvm", self.name),
                                               timeout=self.options.commandTimeout)
        return self._thin_meta

    def metadata_block_size(self) -> Optional[int]:
        """Thin: the pool's chunk size (64 KiB, LVM's smallest and a divisor of every chunk size, while the pool
        cannot be read). Thick: None — a thick LV keeps no map of written blocks, and has no snapshots."""
        if not self.thin:
            return None
        from .lvm_diff import MIN_CHUNK
        try:
            return self._thin_metadata().chunk_size()
        except TesseraError:
            return MIN_CHUNK

    def _cbt_snapshot(self, local_id: str) -> LvInfo:
        if not self.thin:
            raise FailedPrecondition(f"backend {self.name!r} uses thick LVs, which keep no map of written blocks "
                                     "(and no snapshots); make a full backup, or configure a thinPool")
        lv = self._find(local_id, "snapshot", SNAPSHOT_PREFIX)
        if lv is None:
            raise NotFound(f"snapshot {self.name}:{local_id} does not exist")
        return lv

    def allocated_ranges(self, snapshot_local_id: str, start: int, secrets: Mapping[str, str]):  # type: ignore[no-untyped-def]
        from .base import RangeStream
        lv = self._cbt_snapshot(snapshot_local_id)
        return RangeStream(lv.size, self._thin_metadata().allocated(lv.name, lv.size, start))

    def changed_ranges(self, base_local_id: str, target_local_id: str, start: int,  # type: ignore[no-untyped-def]
                       secrets: Mapping[str, str]):
        from .base import RangeStream
        base, target = self._cbt_snapshot(base_local_id), self._cbt_snapshot(target_local_id)
        return RangeStream(target.size, self._thin_metadata().changed(base.name, target.name, target.size, start))

BACKEND = LvmBackend
