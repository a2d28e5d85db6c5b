"""Node logic, free of gRPC: shared by the CSI Node service and the FlexVolume shim.

Stage: attach the backend's device, format it only when blank, mount it at the staging path (mount access) — or
just attach (block access). Publish: bind-mount the staging mount (or the device node) onto the target path.
Unpublish/unstage undo exactly that and succeed when there is nothing left to undo.

What was attached is kept in a stage record (`<stateDir>/node/staged/<hash>.json`, written atomically) so that
unstage, expand and stats know the device after a plugin restart or a node reboot without asking anyone. The record
is written after the device exists and the mount is done, and removed after the device is gone: a crash in between
leaves either a record that a retried unstage completes, or an attached device that a retried stage finds again.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import time
from dataclasses import asdict, dataclass, field
from typing import Mapping, Optional, Sequence

from backends.base import Attachment, Backend, CapabilitySpec
from backends.errors import AlreadyExists, BackendUnavailable, FailedPrecondition, InvalidArgument, NotFound
from backends.util import read_json, write_json_atomic

from . import constants, filesystems, loopdev, mounts
from .ids import NodeRef, parse_id
from .locks import KeyedLocks
from .paths import check_path
from .registry import Backends

log = logging.getLogger(__name__)


@dataclass
class StageRecord:
    volume_id: str
    staging_path: str
    device: str
    access_type: str
    fs_type: str = ""
    mount_flags: list[str] = field(default_factory=list)
    attachment: dict = field(default_factory=dict)
    targets: dict = field(default_factory=dict)  # target_path -> {"mode": access mode, "readonly": bool}


@dataclass
class VolumeStats:
    block: bool
    bytes_total: int
    bytes_available: int = 0
    bytes_used: int = 0
    inodes_total: int = 0
    inodes_free: int = 0
    inodes_used: int = 0
    abnormal: bool = False
    message: str = ""


class NodeOps:
    def __init__(self, backends: Backends, max_volumes: int = 0, allowed_prefixes: Sequence[str] = (),
                 locks: Optional[KeyedLocks] = None) -> None:
        self.backends = backends
        self.max_volumes = max_volumes
        self.allowed_prefixes = list(allowed_prefixes)
        self.locks = locks or KeyedLocks()
        self.record_dir = os.path.join(backends.config.state_dir, "node", "staged")
        os.makedirs(self.record_dir, mode=0o700, exist_ok=True)

    @property
    def node_name(self) -> str:
        return self.backends.runtime.node_name

    # ---- info -----------------------------------------------------------------------------------------
    def node_id(self) -> str:
        attrs: dict[str, str] = {}
        for b in self.backends:
            attrs.update(b.node_attributes())
        return NodeRef(self.node_name, attrs).encode()

    def topology(self) -> dict[str, str]:
        return {constants.TOPOLOGY_NODE_KEY: self.node_name}

    # ---- records --------------------------------------------------------------------------------------
    def _record_path(self, volume_id: str) -> str:
        return os.path.join(self.record_dir, hashlib.sha256(volume_id.encode()).hexdigest()[:40] + ".json")

    def record(self, volume_id: str) -> Optional[StageRecord]:
        try:
            return StageRecord(**read_json(self._record_path(volume_id)))
        except FileNotFoundError:
            return None

    def _save(self, rec: StageRecord) -> None:
        write_json_atomic(self._record_path(rec.volume_id), asdict(rec))

    def _drop(self, volume_id: str) -> None:
        try:
            os.unlink(self._record_path(volume_id))
        except FileNotFoundError:
            pass

    def _backend(self, volume_id: str) -> tuple[Backend, str]:
        oid = parse_id(volume_id)
        return self.backends.for_id(oid.backend, f"volume {volume_id!r}"), oid.local

    # ---- stage ----------------------------------------------------------------------------------------
    def stage(self, volume_id: str, staging_path: str, capability: CapabilitySpec, context: Mapping[str, str],
              publish_context: Mapping[str, str], secrets: Mapping[str, str]) -> StageRecord:
        if not volume_id:
            raise InvalidArgument("volume ID is required")
        staging_path = check_path(staging_path, "staging_target_path", self.allowed_prefixes)
        backend, local = self._backend(volume_id)
        fs_type = ""
        if capability.access_type == "mount":
            fs_type = capability.fs_type or constants.DEFAULT_FS_TYPE
            if fs_type not in constants.SUPPORTED_FS_TYPES:
                raise InvalidArgument(f"fsType {fs_type!r} is not supported (one of {', '.join(constants.SUPPORTED_FS_TYPES)})")
        if capability.access_mode not in backend.features().access_modes:
            raise FailedPrecondition(f"access mode {capability.access_mode} is not supported by this volume")
        with self.locks.hold("volume/" + volume_id):
            rec = self.record(volume_id)
            if rec is not None:
                if rec.staging_path != staging_path:
                    raise AlreadyExists(f"volume {volume_id} is already staged at {rec.staging_path}")
                if rec.access_type != capability.access_type or rec.fs_type != fs_type or \
                        sorted(rec.mount_flags) != sorted(capability.mount_flags):
                    raise AlreadyExists(f"volume {volume_id} is already staged at {staging_path} with a different "
                                        f"capability ({rec.access_type} {rec.fs_type} {','.join(rec.mount_flags)})")
                if rec.access_type == "block" or mounts.is_mountpoint(staging_path):
                    return rec
                # the record survived but the mount did not (node reboot): redo the work below
            if not os.path.isdir(staging_path):
                raise NotFound(f"staging_target_path {staging_path} does not exist or is not a directory")
            att = backend.node_attach(local, context, publish_context, secrets)
            rec = StageRecord(volume_id, staging_path, att.device, capability.access_type, fs_type,
                              list(capability.mount_flags), {"device": att.device, "data": att.data})
            if capability.access_type == "mount":
                top = mounts.top_mount(staging_path)
                if top is None:
                    filesystems.ensure_formatted(att.device, fs_type)
                    mounts.mount(att.device, staging_path, fs_type,
                                 filesystems.stage_options(fs_type, capability.mount_flags))
                elif os.stat(staging_path).st_dev != os.stat(att.device).st_rdev:
                    raise AlreadyExists(f"staging_target_path {staging_path} already has something else mounted")
            self._save(rec)
            return rec

    def unstage(self, volume_id: str, staging_path: str) -> None:
        if not volume_id:
            raise InvalidArgument("volume ID is required")
        staging_path = check_path(staging_path, "staging_target_path", self.allowed_prefixes)
        with self.locks.hold("volume/" + volume_id):
            rec = self.record(volume_id)
            if rec is not None and rec.staging_path != staging_path:
                raise NotFound(f"volume {volume_id} is staged at {rec.staging_path}, not at {staging_path}")
            mounts.unmount_all(staging_path)
            if rec is not None and rec.access_type == "block" and os.path.exists(rec.device):
                for view in loopdev.read_only_views(rec.device):  # left by a publish that crashed before its record
                    loopdev.detach(view)
            try:
                backend, local = self._backend(volume_id)
            except NotFound:
                self._drop(volume_id)
                return
            att = rec.attachment if rec else {"device": "", "data": {}}
            backend.node_detach(local, Attachment(att.get("device", ""), att.get("data", {})))
            self._drop(volume_id)

    # ---- publish --------------------------------------------------------------------------------------
    def publish(self, volume_id: str, staging_path: str, target_path: str, capability: CapabilitySpec,
                readonly: bool, context: Mapping[str, str] = {}) -> None:
        if not volume_id:
            raise InvalidArgument("volume ID is required")
        target_path = check_path(target_path, "target_path", self.allowed_prefixes)
        if not staging_path:
            raise FailedPrecondition("staging_target_path is required: this plugin stages volumes "
                                     "(STAGE_UNSTAGE_VOLUME); call NodeStageVolume first")
        staging_path = check_path(staging_path, "staging_target_path", self.allowed_prefixes)
        backend, local = self._backend(volume_id)
        with self.locks.hold("volume/" + volume_id):
            rec = self.record(volume_id)
            if rec is None:
                self._check_exists(backend, local, volume_id)
            if rec is None or rec.staging_path != staging_path:
                raise FailedPrecondition(f"volume {volume_id} is not staged at {staging_path}; call NodeStageVolume first")
            if rec.access_type != capability.access_type:
                raise FailedPrecondition(f"volume {volume_id} was staged for {rec.access_type} access, "
                                         f"not {capability.access_type}")
            if capability.access_type == "mount" and capability.fs_type and capability.fs_type != rec.fs_type:
                raise AlreadyExists(f"volume {volume_id} is staged with {rec.fs_type}, not {capability.fs_type}")
            ro = readonly or capability.access_mode in ("SINGLE_NODE_READER_ONLY", "MULTI_NODE_READER_ONLY")
            block = capability.access_type == "block"
            top = mounts.top_mount(target_path)
            if top is not None:
                same = self._path_holds(rec, target_path) and stat.S_ISBLK(os.stat(target_path).st_mode) == block
                if same and top.readonly == ro:
                    return
                raise AlreadyExists(f"target_path {target_path} is already published "
                                    f"{'with another volume' if not same else 'with a different read-only setting'}")
            others = {t: v for t, v in rec.targets.items() if t != target_path and mounts.is_mountpoint(t)}
            single = "SINGLE_NODE_SINGLE_WRITER"
            if others and (capability.access_mode == single or any(v.get("mode") == single for v in others.values())):
                raise FailedPrecondition(f"volume {volume_id} is already published at {', '.join(sorted(others))} "
                                         f"with access mode {single}, which allows one target only")
            self._prepare_target(target_path, block)
            entry: dict = {"mode": capability.access_mode, "readonly": ro}
            if not block:
                source = staging_path
            elif ro:
                held = frozenset(v["device"] for v in others.values() if v.get("device"))
                source = entry["device"] = loopdev.attach_read_only_view(rec.device, held)
            else:
                source = rec.device
            opts = (["ro"] if ro else []) + ([] if block else list(capability.mount_flags))
            mounts.mount(source, target_path, None, opts, bind=True)
            rec.targets = {**others, target_path: entry}
            self._save(rec)

    @staticmethod
    def _check_exists(backend: Backend, local: str, volume_id: str) -> None:
        """NOT_FOUND for a volume that does not exist at all (rather than 'not staged'), when the backend can tell
        from this node; any other answer (no credentials here, storage unreachable) leaves the decision to the
        caller's staging check."""
        try:
            backend.get_volume(local, {})
        except NotFound:
            raise NotFound(f"volume {volume_id} does not exist") from None
        except Exception:  # noqa: BLE001 - only a definite NotFound changes the answer
            pass

    @staticmethod
    def _prepare_target(target: str, block: bool) -> None:
        parent = os.path.dirname(target)
        if not os.path.isdir(parent):
            raise NotFound(f"the parent directory of target_path {target} does not exist")
        if block:
            if os.path.isdir(target) and not os.path.islink(target):
                try:
                    os.rmdir(target)  # a tester may have made a directory; a block target is a file
                except OSError as e:
                    raise FailedPrecondition(f"target_path {target} is a non-empty directory; a raw block volume "
                                             "is published as a file") from e
            if not os.path.exists(target):
                with open(target, "a"):
                    pass
        else:
            if os.path.exists(target) and not os.path.isdir(target):
                raise FailedPrecondition(f"target_path {target} exists and is not a directory")
            os.makedirs(target, mode=0o750, exist_ok=True)

    def unpublish(self, volume_id: str, target_path: str) -> None:
        if not volume_id:
            raise InvalidArgument("volume ID is required")
        target_path = check_path(target_path, "target_path", self.allowed_prefixes)
        with self.locks.hold("volume/" + volume_id):
            mounts.unmount_all(target_path)
            rec = self.record(volume_id)
            if rec is not None and target_path in rec.targets:
                view = rec.targets[target_path].get("device")
                if view:
                    loopdev.detach(view)
                rec.targets.pop(target_path)
                self._save(rec)
            try:
                if os.path.isdir(target_path) and not os.path.islink(target_path):
                    os.rmdir(target_path)
                elif os.path.lexists(target_path):
                    os.unlink(target_path)
            except OSError as e:
                if e.errno not in (errno.ENOENT,):
                    raise FailedPrecondition(f"could not remove target_path {target_path}: {e.strerror}") from e

    # ---- expand and stats -----------------------------------------------------------------------------
    def _staged(self, volume_id: str, volume_path: str) -> StageRecord:
        if not volume_id:
            raise InvalidArgument("volume ID is required")
        if not volume_path:
            raise InvalidArgument("volume_path is required")
        # The volume is looked up before the path is judged: an unknown volume is NOT_FOUND whatever path came
        # with it (csi-sanity asks with "some/path"), and a path that cannot be where the volume is mounted —
        # relative, not normalized, outside the allowed directories — is NOT_FOUND too, as the spec words it
        # ("volume does not exist on the specified path"). Nothing is ever done at such a path.
        self._backend(volume_id)
        rec = self.record(volume_id)
        if rec is None:
            raise NotFound(f"volume {volume_id} is not staged on node {self.node_name}")
        try:
            check_path(volume_path, "volume_path", self.allowed_prefixes)
        except InvalidArgument as e:
            raise NotFound(f"volume {volume_id} is not at volume_path {volume_path!r}: {e}") from None
        if not os.path.exists(volume_path):
            raise NotFound(f"volume_path {volume_path} does not exist")
        return rec

    def _path_holds(self, rec: StageRecord, path: str) -> bool:
        try:
            st = os.stat(path)
            dev = os.stat(rec.device).st_rdev
        except OSError:
            return False
        if stat.S_ISBLK(st.st_mode):
            if st.st_rdev == dev:
                return True
            view = rec.targets.get(path, {}).get("device")  # a read-only raw block publish shows a view
            try:
                return bool(view) and st.st_rdev == os.stat(view).st_rdev
            except OSError:
                return False
        return st.st_dev == dev

    def expand(self, volume_id: str, volume_path: str, staging_path: str = "", required_bytes: int = 0) -> int:
        with self.locks.hold("volume/" + volume_id):
            rec = self._staged(volume_id, volume_path)
            if not self._path_holds(rec, volume_path):
                raise NotFound(f"volume {volume_id} is not mounted at {volume_path}")
            backend, local = self._backend(volume_id)
            att = Attachment(rec.attachment.get("device", rec.device), rec.attachment.get("data", {}))
            backend.node_refresh_size(local, att)
            if required_bytes:
                self._wait_for_size(volume_id, rec.device, required_bytes)
            for entry in rec.targets.values():
                if entry.get("device"):  # a read-only view sizes itself from the device only when told
                    loopdev.refresh(entry["device"])
            if rec.access_type == "mount":
                filesystems.grow(rec.device, rec.staging_path if mounts.is_mountpoint(rec.staging_path) else volume_path,
                                 rec.fs_type)
            return filesystems.device_size(rec.device)

    @staticmethod
    def _wait_for_size(volume_id: str, device: str, required_bytes: int, timeout: float = 30.0) -> None:
        """Some devices learn a new size on their own, a moment after the storage grew (krbd and rbd-nbd from the
        image header's watch, a SCSI disk after its rescan): growing the filesystem before that would grow it to the
        old size and report success. Wait until the device is at least as large as the CO asked."""
        deadline = time.monotonic() + timeout
        size = filesystems.device_size(device)
        while size < required_bytes:
            if time.monotonic() > deadline:
                raise BackendUnavailable(f"device {device} of volume {volume_id} still reports {size} bytes "
                                         f"{timeout:.0f}s after the storage grew to {required_bytes}; retry")
            time.sleep(0.1)
            size = filesystems.device_size(device)

    def stats(self, volume_id: str, volume_path: str) -> VolumeStats:
        rec = self._staged(volume_id, volume_path)
        if not os.path.exists(rec.device):
            return VolumeStats(block=rec.access_type == "block", bytes_total=0, abnormal=True,
                               message=f"device {rec.device} of volume {volume_id} is gone")
        if not self._path_holds(rec, volume_path):
            raise NotFound(f"volume {volume_id} is not published or staged at {volume_path}")
        if stat.S_ISBLK(os.stat(volume_path).st_mode):
            return VolumeStats(block=True, bytes_total=filesystems.device_size(rec.device))
        u = filesystems.usage(volume_path)
        abnormal = not mounts.is_mountpoint(rec.staging_path)
        return VolumeStats(False, u.bytes_total, u.bytes_available, u.bytes_used, u.inodes_total, u.inodes_free,
                           u.inodes_used, abnormal, f"staging mount {rec.staging_path} is gone" if abnormal else "")
