"""The embedded default backend: each volume is a sparse file in a local directory, attached through a loop device.

Layout under `directory`:
    volumes/<uuid>.img  + volumes/<uuid>.json     the data and its sidecar (request name, parameters, source)
    snapshots/<uuid>.img + snapshots/<uuid>.json

The sidecar is the commit point: an image without a sidecar is an unfinished create (a retry rebuilds it) or an
unfinished delete (a retry removes it); listings and lookups only see objects whose sidecar exists. Images are
written under `<uuid>.img.tmp`, held with a flock by their writer, fsynced and renamed into place
(`backends.filecopy`), so a failed or crashed create leaves nothing that looks made, and a source deleted while it
is copied answers NOT_FOUND, never INTERNAL.
Copies (snapshots, clones) use reflinks where the filesystem supports them, else a sparse full copy.
"""
from __future__ import annotations

import bisect
import os
import time
from typing import Iterable, Iterator, Mapping, Optional

from pydantic import Field, field_validator

from .base import (Attachment, Backend, BackendOptions, Capacity, ContentSource, CreateVolumeSpec, Features,
                   GroupSnapshot, MutableParameter, Orphan, RangeStream, SINGLE_NODE_MODES, Snapshot, Usage, Volume,
                   object_uuid)
from .errors import BackendUnavailable, CapacityExceeded, InUse, InvalidArgument, NotFound, OutOfRange
from .errors import listing
from . import file_diff, file_group, io_limits
from .filecopy import copy_fd, open_source, remove_temp, staging
from .range_diff import BLOCK
from .util import read_json, write_json_atomic

VOLUME_PREFIX = "vol-"
# The largest backing file every file system we meet holds: ext4 with 4 KiB blocks stops at 16 TiB (EFBIG past it);
# xfs and btrfs go further, but the directory's own size caps a volume long before that on any real host.
MAX_FILE_BYTES = (16 << 40) - (1 << 20)
SNAPSHOT_PREFIX = "snap-"


class FileOptions(BackendOptions):
    directory: str = Field(description="directory holding the volume files (created if missing)")
    directIO: bool = Field(True, description="attach loop devices with direct I/O where the filesystem allows")

    @field_validator("directory")
    @classmethod
    def _abs(cls, v: str) -> str:
        if not os.path.isabs(v):
            raise ValueError("must be an absolute path")
        return os.path.normpath(v)


class FileBackend(Backend):
    type_name = "file"
    options_model = FileOptions
    options: FileOptions

    def __init__(self, name, options, runtime) -> None:
        super().__init__(name, options, runtime)
        self.vol_dir = os.path.join(options.directory, "volumes")
        self.snap_dir = os.path.join(options.directory, "snapshots")
        self.group_dir = os.path.join(options.directory, "groups")  # group snapshot records (backends/file_group.py)
        self.snapshot_prefix = SNAPSHOT_PREFIX
        os.makedirs(self.vol_dir, exist_ok=True)
        os.makedirs(self.snap_dir, exist_ok=True)
        os.makedirs(self.group_dir, exist_ok=True)

    def features(self) -> Features:
        return Features(snapshots=True, clones=True, expand=True, online_expand=True, node_local=True,
                        access_modes=SINGLE_NODE_MODES, group_snapshots=True)

    def validate_parameters(self, parameters: Mapping[str, str]) -> None:
        if parameters:
            raise InvalidArgument(f"the file backend takes no StorageClass parameters; got {listing(parameters)}")

    def max_volume_bytes(self, parameters: Mapping[str, str] = {}) -> int:
        """A sparse image may not be larger than the whole file system holding it, nor than its largest file."""
        st = os.statvfs(self.vol_dir)
        return min(st.f_blocks * st.f_frsize, MAX_FILE_BYTES)

    def probe(self) -> None:
        if not os.access(self.vol_dir, os.W_OK):
            raise BackendUnavailable(f"volume directory {self.vol_dir} is not writable")

    # ---- paths ------------------------------------------------------------------------------------------
    def _uuid(self, local_id: str, prefix: str) -> str:
        if not local_id.startswith(prefix):
            raise NotFound(f"{'volume' if prefix == VOLUME_PREFIX else 'snapshot'} {self.name}:{local_id} does not exist")
        return local_id[len(prefix):]

    def _vol_paths(self, local_id: str) -> tuple[str, str]:
        u = self._uuid(local_id, VOLUME_PREFIX)
        return os.path.join(self.vol_dir, u + ".img"), os.path.join(self.vol_dir, u + ".json")

    def _snap_paths(self, local_id: str) -> tuple[str, str]:
        u = self._uuid(local_id, SNAPSHOT_PREFIX)
        return os.path.join(self.snap_dir, u + ".img"), os.path.join(self.snap_dir, u + ".json")

    def _topology(self) -> list[dict[str, str]]:
        return [{self.runtime.topology_key: self.runtime.node_name}]

    # ---- volumes ----------------------------------------------------------------------------------------
    def _load_volume(self, local_id: str) -> Optional[Volume]:
        img, meta = self._vol_paths(local_id)
        try:
            m = read_json(meta)
        except FileNotFoundError:
            return None
        try:
            size = os.stat(img).st_size
            abnormal, message = False, ""
        except FileNotFoundError:
            size, abnormal, message = m["size"], True, f"backing file {img} is missing"
        src = m.get("source")
        return Volume(local_id=local_id, capacity_bytes=size, name=m["name"], parameters=m.get("parameters", {}),
                      context={"path": img}, source=ContentSource(src["kind"], src["local_id"]) if src else None,
                      topology=self._topology(), abnormal=abnormal, condition_message=message,
                      mutable_parameters=dict(m.get("mutable", {})))

    # ---- mutable parameters: node I/O limits (backends/io_limits.py) --------------------------------------
    def mutable_parameters(self) -> Mapping[str, MutableParameter]:
        return io_limits.IO_MAX_PARAMETERS

    def modify_volume(self, local_id: str, changes: Mapping[str, str], secrets: Mapping[str, str]) -> Volume:
        _, meta = self._vol_paths(local_id)
        try:
            m = read_json(meta)
        except FileNotFoundError:
            raise NotFound(f"volume {self.name}:{local_id} does not exist") from None
        m["mutable"] = {**m.get("mutable", {}), **changes}
        write_json_atomic(meta, m)
        vol = self._load_volume(local_id)
        assert vol is not None
        return vol

    def node_io_limits(self, local_id: str, attachment: Optional[Attachment] = None) -> Mapping[str, str]:
        try:
            vol = self._load_volume(local_id)
        except (NotFound, ValueError):
            return {}
        return vol.mutable_parameters if vol is not None else {}

    def local_id_for_name(self, kind: str, name: str, parameters: Mapping[str, str]) -> Optional[str]:
        if kind == "volume":
            return VOLUME_PREFIX + object_uuid(self.runtime.driver_name, name)
        return SNAPSHOT_PREFIX + object_uuid(self.runtime.driver_name, "snapshot/" + name)

    def find_by_name(self, name: str, secrets: Mapping[str, str]) -> Optional[Volume]:
        return self._load_volume(VOLUME_PREFIX + object_uuid(self.runtime.driver_name, name))

    def create_volume(self, spec: CreateVolumeSpec) -> Volume:
        local_id = VOLUME_PREFIX + object_uuid(self.runtime.driver_name, spec.name)
        existing = self._load_volume(local_id)
        if existing is not None:
            return existing
        img, meta = self._vol_paths(local_id)
        st = os.statvfs(self.vol_dir)
        if spec.size_bytes > st.f_blocks * st.f_frsize:
            raise OutOfRange(f"{spec.size_bytes} bytes is more than the whole filesystem of {self.vol_dir} "
                                   f"({st.f_blocks * st.f_frsize} bytes)")
        if spec.source is None:
            with staging(img) as fd:
                os.ftruncate(fd, spec.size_bytes)
        else:
            src = self._open_source(spec.source)
            try:
                src_size = os.fstat(src).st_size
                if spec.size_bytes < src_size:
                    raise OutOfRange(f"requested {spec.size_bytes} bytes is smaller than the source "
                                     f"{spec.source.kind} ({src_size} bytes)")
                if spec.limit_bytes and src_size > spec.limit_bytes:
                    raise OutOfRange(f"the source {spec.source.kind} ({src_size} bytes) exceeds limit_bytes {spec.limit_bytes}")
                with staging(img) as fd:
                    copied = copy_fd(src, fd)
                    if spec.size_bytes > copied:
                        os.ftruncate(fd, spec.size_bytes)
            finally:
                os.close(src)
        source = {"kind": spec.source.kind, "local_id": spec.source.local_id} if spec.source else None
        write_json_atomic(meta, {"name": spec.name, "size": spec.size_bytes, "parameters": spec.parameters,
                                 "source": source, "created": time.time()})
        vol = self._load_volume(local_id)
        assert vol is not None
        return vol

    def _open_source(self, source: ContentSource) -> int:
        """A descriptor of the source's image: once open, a delete of the source cannot disturb the copy."""
        if source.kind == "snapshot":
            img, meta = self._snap_paths(source.local_id)
        else:
            img, meta = self._vol_paths(source.local_id)
        what = f"source {source.kind} {self.name}:{source.local_id}"
        if not os.path.exists(meta) or (source.kind == "snapshot" and self._load_snapshot(source.local_id) is None):
            raise NotFound(f"{what} does not exist")
        return open_source(img, what)

    def delete_volume(self, local_id: str, secrets: Mapping[str, str]) -> None:
        try:
            img, meta = self._vol_paths(local_id)
        except NotFound:
            return
        if os.path.exists(img):
            from csi import loopdev  # node-side helper; a controller-only host never reaches here with a device
            dev = loopdev.find(img)
            if dev:
                raise InUse(f"volume {self.name}:{local_id} is still attached as {dev} on this node; unstage it first")
        for path in (meta, img):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        remove_temp(img)

    def get_volume(self, local_id: str, secrets: Mapping[str, str]) -> Volume:
        vol = self._load_volume(local_id) if local_id.startswith(VOLUME_PREFIX) else None
        if vol is None:
            raise NotFound(f"volume {self.name}:{local_id} does not exist")
        return vol

    def list_volumes(self, secrets: Mapping[str, str]) -> Iterable[Volume]:
        return self.iter_volumes("", secrets)

    def iter_volumes(self, start_after: str, secrets: Mapping[str, str]) -> Iterator[Volume]:
        """One directory scan (names only), sorted; a volume's metadata is read only when the caller gets to it."""
        for local_id in _ids_after(self.vol_dir, VOLUME_PREFIX, start_after):
            vol = self._load_volume(local_id)
            if vol is not None:
                yield vol

    def get_capacity(self, parameters: Mapping[str, str], segments: Optional[Mapping[str, str]]) -> Capacity:
        st = os.statvfs(self.vol_dir)
        avail = st.f_bavail * st.f_frsize
        return Capacity(available_bytes=avail, maximum_volume_size=self.max_volume_bytes())

    def expand_volume(self, local_id: str, size_bytes: int, secrets: Mapping[str, str]) -> tuple[int, bool]:
        vol = self.get_volume(local_id, secrets)
        img, _ = self._vol_paths(local_id)
        if vol.capacity_bytes < size_bytes:
            try:
                with open(img, "r+b") as f:
                    f.truncate(size_bytes)
                    os.fsync(f.fileno())
            except FileNotFoundError:
                raise NotFound(f"volume {self.name}:{local_id} does not exist (its backing file is gone)") from None
        return max(vol.capacity_bytes, size_bytes), True

    # ---- snapshots --------------------------------------------------------------------------------------
    def _load_snapshot(self, local_id: str) -> Optional[Snapshot]:
        img, meta = self._snap_paths(local_id)
        try:
            m = read_json(meta)
        except FileNotFoundError:
            return None
        group = m.get("group", "")
        if group and not file_group.committed(self, group):
            return None  # a member of a group create that has not reached its commit point (file_group.py)
        return Snapshot(local_id=local_id, source_volume_local_id=m["source_volume"], size_bytes=m["size"],
                        creation_time=m["created"], ready_to_use=os.path.exists(img), name=m["name"],
                        group_local_id=group)

    def create_snapshot(self, source_local_id: str, name: str, parameters: Mapping[str, str],
                        secrets: Mapping[str, str]) -> Snapshot:
        if parameters:
            raise InvalidArgument(f"the file backend takes no snapshot parameters; got {listing(parameters)}")
        local_id = SNAPSHOT_PREFIX + object_uuid(self.runtime.driver_name, "snapshot/" + name)
        existing = self._load_snapshot(local_id)
        if existing is not None:
            return existing
        img, meta = self._snap_paths(local_id)
        src = self._open_source(ContentSource("volume", source_local_id))
        try:
            with staging(img) as fd:
                size = copy_fd(src, fd)
        finally:
            os.close(src)
        write_json_atomic(meta, {"name": name, "source_volume": source_local_id, "size": size,
                                 "created": time.time()})
        snap = self._load_snapshot(local_id)
        assert snap is not None
        return snap

    def delete_snapshot(self, local_id: str, secrets: Mapping[str, str]) -> None:
        self._remove_snapshot_files(local_id)

    def _remove_snapshot_files(self, local_id: str) -> None:
        """The record first (the snapshot is gone from then on), then the image and any temporary copy."""
        try:
            img, meta = self._snap_paths(local_id)
        except NotFound:
            return
        for path in (meta, img):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        remove_temp(img)

    def get_snapshot(self, local_id: str, secrets: Mapping[str, str]) -> Snapshot:
        snap = self._load_snapshot(local_id) if local_id.startswith(SNAPSHOT_PREFIX) else None
        if snap is None:
            raise NotFound(f"snapshot {self.name}:{local_id} does not exist")
        return snap

    def list_snapshots(self, secrets: Mapping[str, str]) -> Iterable[Snapshot]:
        return self.iter_snapshots("", secrets)

    def iter_snapshots(self, start_after: str, secrets: Mapping[str, str]) -> Iterator[Snapshot]:
        for local_id in _ids_after(self.snap_dir, SNAPSHOT_PREFIX, start_after):
            snap = self._load_snapshot(local_id)
            if snap is not None:
                yield snap

    # ---- node -------------------------------------------------------------------------------------------
    def node_attach(self, local_id: str, context: Mapping[str, str], publish_context: Mapping[str, str],
                    secrets: Mapping[str, str], *, readonly: bool = False,
                    multi_writer: bool = False) -> Attachment:
        # the volume context is not read: the path comes from the volume ID under this backend's directory, so a
        # static PV cannot point the node at any other file
        from csi import loopdev
        img, meta = self._vol_paths(local_id)
        if not os.path.exists(meta) or not os.path.exists(img):
            raise NotFound(f"volume {self.name}:{local_id} does not exist on this node ({img})")
        return Attachment(device=loopdev.attach(img, direct_io=self.options.directIO, read_only=readonly),
                          data={"path": img, "readonly": readonly})

    def node_detach(self, local_id: str, attachment: Attachment) -> None:
        from csi import loopdev
        img, _ = self._vol_paths(local_id)
        # a file may have been attached more than once by an earlier crash-and-retry; free every device
        for _ in range(8):
            device = loopdev.find(attachment.data.get("path", img))
            if not device:
                return
            loopdev.detach(device)

    def node_refresh_size(self, local_id: str, attachment: Attachment) -> None:
        from csi import loopdev
        loopdev.refresh(attachment.device)

    def node_attachment_valid(self, local_id: str, attachment: Attachment,
                              context: Mapping[str, str]) -> Optional[bool]:
        """The loop device is this volume's when the kernel says its backing file is this volume's image: the
        same inode on the same filesystem (a loop device freed and reattached to another image, or left over a
        deleted image of the same name, is not)."""
        from csi import loopdev
        try:
            img, _ = self._vol_paths(local_id)
        except NotFound:
            return False
        if not attachment.device or not os.path.exists(attachment.device):
            return False
        return loopdev.backs(attachment.device, img)

    def owned_paths(self) -> list[str]:
        return [self.options.directory]

    def orphans(self) -> list[Orphan]:
        """Images without their record (a create that crashed before its commit point, or a delete after removing
        the record), records without their image, and temporary copies no live writer holds."""
        out: list[Orphan] = []
        for kind, directory in (("volume", self.vol_dir), ("snapshot", self.snap_dir)):
            names = set(os.listdir(directory))
            for n in sorted(names):
                path = os.path.join(directory, n)
                if n.endswith(".img") and n[:-4] + ".json" not in names:
                    out.append(Orphan(path, f"{kind} image without its record: a create that crashed before its "
                                            "commit point (retrying that create completes it) or an interrupted "
                                            "delete"))
                elif n.endswith(".json") and not n.startswith(".") and n[:-5] + ".img" not in names:
                    out.append(Orphan(path, f"{kind} record whose image is missing"))
                elif n.endswith(".img.tmp") and not _flock_held(path):
                    out.append(Orphan(path, "temporary copy left by a crashed create (no writer holds it)"))
                elif kind == "snapshot" and n.endswith(".json") and not n.startswith("."):
                    group = self._group_of_record(path)
                    if group and not file_group.committed(self, group):
                        out.append(Orphan(path, f"member snapshot of group snapshot {group} whose create did not "
                                                "reach its commit point (retrying that create removes and redoes "
                                                "it)"))
        return out

    @staticmethod
    def _group_of_record(path: str) -> str:
        try:
            return str(read_json(path).get("group", ""))
        except (OSError, ValueError, AttributeError):
            return ""

    def usage(self) -> Usage:
        """The backing directory's filesystem, and the counts from the volume and snapshot records."""
        out = super().usage()
        try:
            st = os.statvfs(self.options.directory)
            out.total_bytes = st.f_blocks * st.f_frsize
        except OSError as e:
            out.problems.append(f"total_bytes: {e}")
        return out

    # ---- changed-block tracking (backends/file_diff.py) ------------------------------------------------
    def metadata_block_size(self) -> Optional[int]:
        return BLOCK

    def _snapshot_image(self, local_id: str) -> tuple[str, str, int]:
        """(image path, description, size) of an existing snapshot; NotFound otherwise."""
        self.get_snapshot(local_id, {})  # NotFound unless its record exists
        img, _ = self._snap_paths(local_id)
        what = f"snapshot {self.name}:{local_id}"
        try:
            return img, what, os.stat(img).st_size
        except FileNotFoundError:
            raise NotFound(f"{what} does not exist (its image is gone)") from None

    def allocated_ranges(self, snapshot_local_id: str, start: int, secrets: Mapping[str, str]) -> RangeStream:
        img, what, size = self._snapshot_image(snapshot_local_id)
        return RangeStream(size, file_diff.allocated(img, what, size, start, BLOCK))

    def changed_ranges(self, base_local_id: str, target_local_id: str, start: int,
                       secrets: Mapping[str, str]) -> RangeStream:
        base, base_what, _ = self._snapshot_image(base_local_id)
        target, target_what, size = self._snapshot_image(target_local_id)
        return RangeStream(size, file_diff.changed(base, base_what, target, target_what, size, start, BLOCK))

    # ---- group snapshots (backends/file_group.py: freeze, copy, thaw) ------------------------------------
    def group_local_id_for_name(self, name: str) -> Optional[str]:
        return file_group.group_local_id(self.runtime.driver_name, name)

    def create_group_snapshot(self, name: str, source_local_ids: list[str], parameters: Mapping[str, str],
                              secrets: Mapping[str, str]) -> GroupSnapshot:
        return file_group.create(self, name, source_local_ids, parameters)

    def delete_group_snapshot(self, local_id: str, secrets: Mapping[str, str]) -> None:
        file_group.delete(self, local_id)

    def get_group_snapshot(self, local_id: str, secrets: Mapping[str, str]) -> GroupSnapshot:
        return file_group.get(self, local_id)


# directory -> ((inode, mtime_ns, ctime_ns), sorted local IDs): the last scan of a directory that has not changed since
_SCANS: dict[str, tuple[tuple[int, int, int], list[str]]] = {}
_CLOCK_TICK_NS = 50_000_000  # more than the kernel's coarse clock step that file times are taken from (1-10 ms)


def _ids_after(directory: str, prefix: str, start_after: str) -> list[str]:
    """The local IDs of the metadata files in `directory` that sort after `start_after`, ascending: names only.

    Why a kept scan: reading a directory of 20,000 entries costs more than loading a page of 100 volumes, and a
    paged listing reads it once per page. The scan is reused while the directory's mtime and ctime are unchanged
    (every create and delete changes them). File times come from a coarse clock, so a change in the same clock step
    as the scan could leave them unchanged: a scan is kept only when the directory's mtime is older than one step."""
    st = os.stat(directory)
    key = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
    kept = _SCANS.get(directory)
    if kept is not None and kept[0] == key:
        ids = kept[1]
    else:
        now = time.time_ns()
        with os.scandir(directory) as it:
            ids = sorted(prefix + e.name[:-5] for e in it if e.name.endswith(".json") and not e.name.startswith("."))
        if now - max(st.st_mtime_ns, st.st_ctime_ns) > _CLOCK_TICK_NS:
            _SCANS[directory] = (key, ids)
    return ids[bisect.bisect_right(ids, start_after):]


def _flock_held(path: str) -> bool:
    """Whether some process holds a lock on `path`, read from /proc/locks: looking must not take the lock itself
    (a writer starting at that instant would then meet it and answer ABORTED)."""
    try:
        st = os.stat(path)
        with open("/proc/locks") as f:
            locks = f.read().split("\n")
    except OSError:
        return False
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    return any(want in line.split() for line in locks)


BACKEND = FileBackend
