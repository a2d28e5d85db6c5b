"""Node logic, free of gRPC: shared by the CSI Node service and the FlexVolume shim.

Stage: attach the backend's device, format it only when blank, mount it at the staging path (mount access) — or
just attach (block access). Publish: bind-mount the staging mount (or the device node) onto the target path.
Unpublish/unstage undo exactly that and succeed when there is nothing of the volume's left to undo.

Ownership (the node plugin runs as root beside the host's `/`): every side effect is written to the volume's node
record (`<stateDir>/node/staged/<hash>.json`, written atomically) *before* it is made — the attach, a staging or
target directory or file the plugin creates, the staging mount, each bind, each read-only loop view — and undone
from that record only:

- a mount is unmounted only when it is provably this volume's: its major:minor in /proc/self/mountinfo (and the
  st_dev / st_rdev of the path) is the volume's device (or its read-only view) as recorded while the device was
  verified in this boot, or as the backend proves now (`Backend.node_attachment_valid`);
- a directory or file is removed only when the record says the plugin created it (and it is still empty);
- a request for a volume the node has no record of never unmounts or removes anything;
- a path that holds something not the volume's (a mount, a non-empty directory, a file with data) is refused with
  FAILED_PRECONDITION naming what is there, and left alone.

A failed stage or publish undoes what it did, in reverse, and restores the record as it was: the node is left
exactly as before the call. A crash part-way leaves a record (written first) from which a retried stage or
unstage finishes or undoes the work. Records are reconciled with the kernel at every stage (the recorded device
must still back this volume, else it is attached again) and when the node plugin starts (`reconcile`).
"""
from __future__ import annotations

import copy
import hashlib
import logging
import os
import stat
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Mapping, Optional, Sequence

from backends.base import Attachment, Backend, CapabilitySpec
from backends.locking import Operation
from backends.errors import (Aborted, AlreadyExists, BackendUnavailable, FailedPrecondition, InvalidArgument,
                             NotFound, TesseraError)
from backends.util import CommandError, read_json, write_json_atomic

from . import constants, filesystems, loopdev, mounts, node_io_limits, stagemode
from .ids import NodeRef, parse_id
from .locks import KeyedLocks
from .paths import check_path, shown
from .registry import Backends

log = logging.getLogger(__name__)

# Record states: what the plugin was doing when it last wrote the record.
ATTACHING = "attaching"  # the device may be attached (or about to be); nothing mounted yet
MOUNTING = "mounting"    # attached (device recorded); the staging mount may be made
STAGED = "staged"        # stage finished

# Target entry states.
PUBLISHING = "publishing"
PUBLISHED = "published"


def boot_id() -> str:
    """This boot of the kernel: device numbers recorded in another boot prove nothing."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _majmin(rdev: int) -> str:
    return f"{os.major(rdev)}:{os.minor(rdev)}"


@dataclass
class StageRecord:
    volume_id: str
    staging_path: str
    device: str = ""
    access_type: str = "mount"
    fs_type: str = ""
    mount_flags: list[str] = field(default_factory=list)
    attachment: dict = field(default_factory=dict)
    # target_path -> {"mode", "readonly", "state", "created": "dir"|"file"|"", "inode", "replaced_dir": {...},
    #                 "device": read-only view, "view_rdev"}
    targets: dict = field(default_factory=dict)
    state: str = STAGED
    device_rdev: int = 0      # st_rdev of `device` when it was attached and verified
    boot_id: str = ""         # the boot in which device_rdev was recorded
    context: dict = field(default_factory=dict)  # the volume context (nothing secret), to verify the device later
    staging_created: bool = False  # the plugin made the staging directory (Flex), so unstage removes it
    staging_mounted: bool = False  # the plugin mounts (or mounted) the device at the staging path

    @classmethod
    def load(cls, data: dict) -> "StageRecord":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


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


class _Undo:
    """Steps to undo, run newest first when an operation fails; a step that fails is logged and stops the undo
    (what is left is still in the record, for a retry)."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, Callable[[], None]]] = []

    def push(self, what: str, fn: Callable[[], None]) -> None:
        self.steps.append((what, fn))

    def run(self) -> bool:
        while self.steps:
            what, fn = self.steps.pop()
            try:
                fn()
            except Exception:  # noqa: BLE001 - the original error is what the caller sees
                log.exception("undoing %s after a failure failed; the record keeps what is left", what)
                return False
        return True


class NodeOps:
    def __init__(self, backends: Backends, max_volumes: int = 0, allowed_prefixes: Sequence[str] = (),
                 locks: Optional[KeyedLocks] = None) -> None:
        self.backends = backends
        self.max_volumes = max_volumes
        self.allowed_prefixes = list(allowed_prefixes)
        self.locks = locks or KeyedLocks()
        self.record_dir = os.path.join(backends.config.state_dir, "node", "staged")
        os.makedirs(self.record_dir, mode=0o700, exist_ok=True)
        self.protected = [backends.config.state_dir]
        for b in backends:
            self.protected.extend(b.owned_paths())
        self.boot = boot_id()

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

    def check_path(self, path: str, what: str) -> str:
        """A request's path, judged by csi/paths.py with this node's allowed prefixes and protected directories."""
        return check_path(path, what, self.allowed_prefixes, self.protected)

    # ---- records --------------------------------------------------------------------------------------
    def _record_path(self, volume_id: str) -> str:
        return os.path.join(self.record_dir, hashlib.sha256(volume_id.encode()).hexdigest()[:40] + ".json")

    def record(self, volume_id: str) -> Optional[StageRecord]:
        try:
            return StageRecord.load(read_json(self._record_path(volume_id)))
        except FileNotFoundError:
            return None

    def records(self) -> list[StageRecord]:
        out = []
        for name in sorted(os.listdir(self.record_dir)):
            if name.endswith(".json") and not name.startswith("."):
                try:
                    out.append(StageRecord.load(read_json(os.path.join(self.record_dir, name))))
                except (OSError, ValueError, TypeError):
                    log.warning("node record %s is unreadable; left alone", name)
        return out

    def _save(self, rec: StageRecord) -> None:
        write_json_atomic(self._record_path(rec.volume_id), asdict(rec))

    def _drop(self, volume_id: str) -> None:
        try:
            os.unlink(self._record_path(volume_id))
        except FileNotFoundError:
            pass

    def _restore(self, volume_id: str, before: Optional[StageRecord]) -> None:
        if before is None:
            self._drop(volume_id)
        else:
            self._save(before)

    def _backend(self, volume_id: str) -> tuple[Backend, str]:
        oid = parse_id(volume_id)
        return self.backends.for_id(oid.backend, f"volume {shown(volume_id)}"), oid.local

    def _claimed_by_other(self, path: str, volume_id: str) -> Optional[str]:
        """The volume ID of another record that claims `path` as its staging or target path."""
        for rec in self.records():
            if rec.volume_id != volume_id and (rec.staging_path == path or path in rec.targets):
                return rec.volume_id
        return None

    # ---- proof of ownership -----------------------------------------------------------------------------
    def _valid(self, rec: StageRecord, backend: Backend, local: str) -> Optional[bool]:
        if not rec.device:
            return False
        try:
            return backend.node_attachment_valid(local, self._attachment(rec), rec.context)
        except Exception:  # noqa: BLE001 - a check that cannot run proves nothing
            log.exception("checking the attachment of %s failed", shown(rec.volume_id))
            return None

    @staticmethod
    def _attachment(rec: StageRecord) -> Attachment:
        return Attachment(rec.attachment.get("device", rec.device), rec.attachment.get("data", {}))

    def _device_rdev(self, rec: StageRecord, backend: Backend, local: str) -> Optional[int]:
        """The device number that is provably this volume's device right now, or None.

        Proven by the backend (the loop device's backing file is the volume's image, ...), or — for a backend that
        cannot tell — by the record: the device was verified in this boot and still has the recorded number."""
        if not rec.device:
            return None
        try:
            st = os.stat(rec.device)
        except OSError:
            return None
        if not stat.S_ISBLK(st.st_mode):
            return None
        valid = self._valid(rec, backend, local)
        if valid:
            return st.st_rdev
        if valid is None and rec.boot_id == self.boot and rec.device_rdev == st.st_rdev:
            return st.st_rdev
        return None

    def _mounted_rdev(self, rec: StageRecord, backend: Backend, local: str) -> Optional[int]:
        """The device number a mount of this volume shows: the recorded one when recorded in this boot (a mounted
        device cannot be given to another volume), else the one proven now."""
        if rec.device_rdev and rec.boot_id == self.boot:
            return rec.device_rdev
        return self._device_rdev(rec, backend, local)

    @staticmethod
    def _staging_mount_ours(entry: mounts.MountEntry, path: str, rdev: Optional[int]) -> bool:
        if rdev is None or entry.major_minor != _majmin(rdev):
            return False
        try:
            return os.stat(path).st_dev == rdev
        except OSError:
            return False

    @staticmethod
    def _target_mount_ours(rec: StageRecord, entry: mounts.MountEntry, path: str, rdev: Optional[int],
                           tentry: Mapping) -> bool:
        """Whether the top mount at target `path` is this volume's: a bind of its staging mount (same device
        number) or a bind of its device node / read-only view (the node's st_rdev)."""
        if rdev is None:
            return False
        try:
            st = os.stat(path)
        except OSError:
            return False
        if rec.access_type == "block":
            wanted = {rdev}
            if tentry.get("view_rdev"):
                wanted.add(int(tentry["view_rdev"]))
            return stat.S_ISBLK(st.st_mode) and st.st_rdev in wanted and st.st_dev == _devnum(entry)
        return entry.major_minor == _majmin(rdev) and st.st_dev == rdev

    def _unmount_ours(self, path: str, is_ours: Callable[[mounts.MountEntry], bool], what: str) -> None:
        """Unmount every mount stacked on `path` while the top one is provably the volume's; stop with
        FAILED_PRECONDITION at the first that is not (it is left alone)."""
        for _ in range(16):
            top = mounts.top_mount(path)
            if top is None:
                return
            if not is_ours(top):
                raise FailedPrecondition(f"{what} {shown(path)} holds a mount of {shown(top.source, 80)} "
                                         f"({top.fstype}, device {top.major_minor}) that is not this volume's; "
                                         "it was left alone")
            try:
                mounts.unmount(path)
            except CommandError as e:
                if "busy" in e.stderr:
                    raise FailedPrecondition(f"{what} {shown(path)} is busy (a process still uses it); "
                                             "retry once it is released") from None
                raise
        raise FailedPrecondition(f"{what} {shown(path)} is still mounted after 16 unmounts")

    # ---- stage ----------------------------------------------------------------------------------------
    def stage(self, volume_id: str, staging_path: str, capability: CapabilitySpec, context: Mapping[str, str],
              publish_context: Mapping[str, str], secrets: Mapping[str, str],
              create_staging: bool = False) -> StageRecord:
        """`create_staging`: the caller (the Flex shim) lets the plugin make the staging directory; a CSI CO makes
        it itself, so a missing one is NOT_FOUND."""
        if not volume_id:
            raise InvalidArgument("volume ID is required")
        staging_path = self.check_path(staging_path, "staging_target_path")
        backend, local = self._backend(volume_id)
        fs_type = ""
        if capability.access_type == "mount":
            fs_type = capability.fs_type or constants.DEFAULT_FS_TYPE
            if fs_type not in constants.SUPPORTED_FS_TYPES:
                raise InvalidArgument(f"fsType {shown(fs_type, 40)} is not supported "
                                      f"(one of {', '.join(constants.SUPPORTED_FS_TYPES)})")
            filesystems.check_mount_flags(capability.mount_flags)
        stagemode.check(capability)  # a multi-node writer mount: INVALID_ARGUMENT before anything is done
        if capability.access_mode not in backend.features().access_modes:
            raise FailedPrecondition(f"access mode {capability.access_mode} is not supported by this volume")
        with self.locks.hold("volume/" + volume_id, operation=Operation("NodeStageVolume", volume_id)):
            before = self.record(volume_id)
            if before is not None:
                if before.staging_path != staging_path:
                    raise AlreadyExists(f"volume {shown(volume_id)} is already staged at {shown(before.staging_path)}")
                if before.access_type != capability.access_type or before.fs_type != fs_type or \
                        sorted(before.mount_flags) != sorted(capability.mount_flags):
                    raise AlreadyExists(f"volume {shown(volume_id)} is already staged at {shown(staging_path)} "
                                        f"with a different capability ({before.access_type} {before.fs_type} "
                                        f"{','.join(before.mount_flags)})")
                if before.state == STAGED and self._stage_intact(before, backend, local):
                    return before
                # incomplete (a crash) or stale (a reboot, a device detached behind our back): redo, from the record
            other = self._claimed_by_other(staging_path, volume_id)
            if other is not None:
                raise FailedPrecondition(f"staging_target_path {shown(staging_path)} is in use by volume "
                                         f"{shown(other)} on this node")
            return self._stage(before, volume_id, staging_path, capability, fs_type, backend, local, context,
                               publish_context, secrets, create_staging)

    def _stage_intact(self, rec: StageRecord, backend: Backend, local: str) -> bool:
        """A finished stage whose device the backend proves is still this volume's, and (mount access) whose
        staging mount is still that device."""
        if self._valid(rec, backend, local) is not True:
            return False
        try:
            rdev = os.stat(rec.device).st_rdev
        except OSError:
            return False
        if rec.access_type == "block":
            return True
        top = mounts.top_mount(rec.staging_path)
        return top is not None and self._staging_mount_ours(top, rec.staging_path, rdev)

    def _stage(self, before: Optional[StageRecord], volume_id: str, staging_path: str, cap: CapabilitySpec,
               fs_type: str, backend: Backend, local: str, context: Mapping[str, str],
               publish_context: Mapping[str, str], secrets: Mapping[str, str], create_staging: bool) -> StageRecord:
        rec = copy.deepcopy(before) if before is not None else StageRecord(
            volume_id, staging_path, access_type=cap.access_type, fs_type=fs_type, mount_flags=list(cap.mount_flags),
            state=ATTACHING)
        rec.context = dict(context)
        undo = _Undo()
        try:
            # what is at the staging path now, and whether any of it is this volume's (a retry after a crash)
            mounted_rdev = self._mounted_rdev(rec, backend, local) if before is not None else None
            top = None
            if os.path.lexists(staging_path):
                if not stat.S_ISDIR(os.lstat(staging_path).st_mode):
                    raise FailedPrecondition(f"staging_target_path {shown(staging_path)} exists and is not a "
                                             "directory; it was left alone")
                top = mounts.top_mount(staging_path)
                if top is not None and not self._staging_mount_ours(top, staging_path, mounted_rdev):
                    raise FailedPrecondition(f"staging_target_path {shown(staging_path)} already holds a mount of "
                                             f"{shown(top.source, 80)} ({top.fstype}) that is not this volume's; "
                                             "it was left alone")
                if top is None and cap.access_type == "mount" and os.listdir(staging_path):
                    raise FailedPrecondition(f"staging_target_path {shown(staging_path)} is a non-empty directory "
                                             "that is not this volume's; it was left alone")
            elif not create_staging:
                raise NotFound(f"staging_target_path {shown(staging_path)} does not exist; the CO creates it")
            else:
                if not os.path.isdir(os.path.dirname(staging_path)):
                    raise NotFound(f"the parent directory of staging path {shown(staging_path)} does not exist")
                rec.staging_created = True
                self._save(rec)  # recorded before it is made
                os.mkdir(staging_path, 0o750)
                undo.push("the staging directory", lambda: _rmdir_if_empty(staging_path))

            # attach (recorded first: a crash after the attach leaves a record a retry completes)
            rec.state = ATTACHING
            self._save(rec)
            att = backend.node_attach(local, context, publish_context, secrets, **stagemode.attach_args(cap))
            if top is None:  # nothing of the volume's is mounted: a failure detaches what this call attached
                undo.push("the attach", lambda: backend.node_detach(local, att))
            try:
                st = os.stat(att.device)
            except OSError as e:
                raise BackendUnavailable(f"the device {att.device} of volume {shown(volume_id)} is not present "
                                         f"after attach ({e.strerror}); retry") from None
            if not stat.S_ISBLK(st.st_mode):
                raise FailedPrecondition(f"{att.device} is not a block device; volume {shown(volume_id)} was not "
                                         "staged")
            if top is not None and top.major_minor != _majmin(st.st_rdev):
                raise FailedPrecondition(f"staging_target_path {shown(staging_path)} holds device {top.major_minor},"
                                         f" but volume {shown(volume_id)} is now attached as {att.device}; "
                                         "unstage it and stage again")
            rec.device, rec.device_rdev, rec.boot_id = att.device, st.st_rdev, self.boot
            rec.attachment = {"device": att.device, "data": att.data}
            rec.state = MOUNTING if cap.access_type == "mount" else STAGED
            self._save(rec)

            if cap.access_type == "mount" and top is None:
                readonly = stagemode.read_only(cap, att.data)  # reader-only: never formats, mounts ro + noload
                stagemode.prepare(att.device, fs_type, readonly)
                rec.staging_mounted = True
                self._save(rec)  # recorded before it is made
                mounts.mount(att.device, staging_path, fs_type,
                             stagemode.mount_options(fs_type, cap.mount_flags, readonly))
                rdev = st.st_rdev
                undo.push("the staging mount", lambda: self._unmount_ours(
                    staging_path, lambda e: self._staging_mount_ours(e, staging_path, rdev), "staging_target_path"))
            rec.state = STAGED
            self._save(rec)
            return rec
        except BaseException:
            if undo.run():
                try:
                    self._restore(volume_id, before)
                except Exception:  # noqa: BLE001
                    log.exception("restoring the node record of %s failed", shown(volume_id))
            raise

    def unstage(self, volume_id: str, staging_path: str) -> None:
        if not volume_id:
            raise InvalidArgument("volume ID is required")
        staging_path = self.check_path(staging_path, "staging_target_path")
        with self.locks.hold("volume/" + volume_id, operation=Operation("NodeUnstageVolume", volume_id)):
            rec = self.record(volume_id)
            if rec is None:
                top = mounts.top_mount(staging_path)
                if top is not None:
                    raise FailedPrecondition(f"volume {shown(volume_id)} is not staged on this node, and "
                                             f"staging_target_path {shown(staging_path)} holds a mount of "
                                             f"{shown(top.source, 80)} ({top.fstype}) that the plugin did not make; "
                                             "it was left alone")
                return
            if rec.staging_path != staging_path:
                raise NotFound(f"volume {shown(volume_id)} is staged at {shown(rec.staging_path)}, "
                               f"not at {shown(staging_path)}")
            try:
                backend, local = self._backend(volume_id)
            except NotFound:
                backend = None
                local = ""
            rdev = self._mounted_rdev(rec, backend, local) if backend is not None else (
                rec.device_rdev if rec.boot_id == self.boot else None)
            busy = [t for t, entry in rec.targets.items()
                    if (m := mounts.top_mount(t)) is not None and self._target_mount_ours(rec, m, t, rdev, entry)]
            if busy:
                raise FailedPrecondition(f"volume {shown(volume_id)} is still published at "
                                         f"{', '.join(shown(t, 120) for t in sorted(busy)[:3])}; unpublish it first")
            self._unmount_ours(staging_path, lambda e: self._staging_mount_ours(e, staging_path, rdev),
                               "staging_target_path")
            if backend is None:
                log.warning("volume %s: its backend is no longer configured; its node record is dropped without "
                            "a detach", shown(volume_id))
            else:
                current = self._device_rdev(rec, backend, local)
                if rec.access_type == "block" and current is not None:
                    for view in loopdev.read_only_views(rec.device):  # left by a publish that crashed mid-way
                        if not any(t.get("device") == view for t in rec.targets.values()):
                            loopdev.detach(view)
                # the recorded device is handed to the backend only when it is still this volume's
                att = self._attachment(rec)
                if current is None:
                    att = Attachment("", att.data)
                backend.node_detach(local, att)
            if rec.staging_created:
                _rmdir_if_empty(staging_path)
            self._drop(volume_id)

    # ---- publish --------------------------------------------------------------------------------------
    def publish(self, volume_id: str, staging_path: str, target_path: str, capability: CapabilitySpec,
                readonly: bool, context: Mapping[str, str] = {}) -> None:
        if not volume_id:
            raise InvalidArgument("volume ID is required")
        target_path = self.check_path(target_path, "target_path")
        if not staging_path:
            raise FailedPrecondition("staging_target_path is required: this plugin stages volumes "
                                     "(STAGE_UNSTAGE_VOLUME); call NodeStageVolume first")
        staging_path = self.check_path(staging_path, "staging_target_path")
        if capability.access_type == "mount":
            filesystems.check_mount_flags(capability.mount_flags)
        if target_path == staging_path:
            raise InvalidArgument("target_path must differ from staging_target_path")
        backend, local = self._backend(volume_id)
        with self.locks.hold("volume/" + volume_id, operation=Operation("NodePublishVolume", volume_id)):
            rec = self.record(volume_id)
            if rec is None:
                self._check_exists(backend, local, volume_id)
            if rec is None or rec.staging_path != staging_path or rec.state != STAGED:
                raise FailedPrecondition(f"volume {shown(volume_id)} is not staged at {shown(staging_path)}; "
                                         "call NodeStageVolume first")
            if rec.access_type != capability.access_type:
                raise FailedPrecondition(f"volume {shown(volume_id)} was staged for {rec.access_type} access, "
                                         f"not {capability.access_type}")
            if capability.access_type == "mount" and capability.fs_type and capability.fs_type != rec.fs_type:
                raise AlreadyExists(f"volume {shown(volume_id)} is staged with {rec.fs_type}, "
                                    f"not {shown(capability.fs_type, 40)}")
            rdev = self._verified_for_publish(rec, backend, local)
            ro = readonly or capability.access_mode in ("SINGLE_NODE_READER_ONLY", "MULTI_NODE_READER_ONLY")
            block = capability.access_type == "block"
            entry_before = rec.targets.get(target_path)
            top = mounts.top_mount(target_path)
            if top is not None:
                if entry_before is not None and self._target_mount_ours(rec, top, target_path, rdev, entry_before):
                    if top.readonly == ro:
                        if entry_before.get("state") != PUBLISHED:  # a crash after the bind, before the record
                            entry_before["state"] = PUBLISHED
                            self._save(rec)
                        return
                    raise AlreadyExists(f"target_path {shown(target_path)} is already published with a different "
                                        "read-only setting")
                raise FailedPrecondition(f"target_path {shown(target_path)} already holds a mount of "
                                         f"{shown(top.source, 80)} ({top.fstype}) that is not this volume's; "
                                         "it was left alone")
            other = self._claimed_by_other(target_path, volume_id)
            if other is not None:
                raise FailedPrecondition(f"target_path {shown(target_path)} is in use by volume {shown(other)} "
                                         "on this node")
            others = {t: v for t, v in rec.targets.items() if t != target_path and
                      (m := mounts.top_mount(t)) is not None and self._target_mount_ours(rec, m, t, rdev, v)}
            single = "SINGLE_NODE_SINGLE_WRITER"
            if others and (capability.access_mode == single or any(v.get("mode") == single for v in others.values())):
                raise FailedPrecondition(f"volume {shown(volume_id)} is already published at "
                                         f"{', '.join(shown(t, 120) for t in sorted(others)[:3])} with access mode "
                                         f"{single}, which allows one target only")
            self._publish(rec, entry_before, target_path, capability, ro, block, rdev, others)
            if node_io_limits.enforce(backend, local, rec.targets[target_path], rdev, self._attachment(rec), context):
                self._save(rec)

    def _verified_for_publish(self, rec: StageRecord, backend: Backend, local: str) -> int:
        """The staged device's number, verified now: publish never binds a device it has not just checked."""
        rdev = self._device_rdev(rec, backend, local)
        if rdev is None:
            raise FailedPrecondition(f"the device {rec.device or '(none)'} recorded for volume "
                                     f"{shown(rec.volume_id)} is no longer this volume's (detached or reused since "
                                     "it was staged); call NodeStageVolume again")
        if rec.access_type == "mount":
            top = mounts.top_mount(rec.staging_path)
            if top is None or not self._staging_mount_ours(top, rec.staging_path, rdev):
                raise FailedPrecondition(f"the staging mount of volume {shown(rec.volume_id)} at "
                                         f"{shown(rec.staging_path)} is gone; call NodeStageVolume again")
        return rdev

    def _publish(self, rec: StageRecord, entry_before: Optional[dict], target: str, cap: CapabilitySpec,
                 ro: bool, block: bool, rdev: int, others: dict) -> None:
        before = copy.deepcopy(rec)
        entry: dict = dict(entry_before or {})
        entry.update({"mode": cap.access_mode, "readonly": ro, "state": PUBLISHING})
        entry.setdefault("created", "")
        undo = _Undo()
        try:
            parent = os.path.dirname(target)
            if not os.path.isdir(parent):
                raise NotFound(f"the parent directory of target_path {shown(target)} does not exist")
            self._prepare_target(rec, entry, target, block, undo)
            source = rec.staging_path
            if block:
                source = rec.device
                if ro:
                    held = frozenset(v["device"] for v in others.values() if v.get("device"))
                    entry["view_pending"] = True
                    rec.targets[target] = entry
                    self._save(rec)  # a crash after this leaves a view that unstage sweeps (it backs onto our device)
                    view = loopdev.attach_read_only_view(rec.device, held)
                    undo.push("the read-only view", lambda: loopdev.detach(view))
                    entry["device"], entry["view_rdev"] = view, os.stat(view).st_rdev
                    entry.pop("view_pending", None)
                    source = view
            entry["state"] = PUBLISHING
            rec.targets[target] = entry
            self._save(rec)  # the bind is recorded before it is made
            opts = (["ro"] if ro else []) + ([] if block else list(cap.mount_flags))
            mounts.mount(source, target, None, opts, bind=True)
            undo.push("the bind mount", lambda: self._unmount_ours(
                target, lambda m: self._target_mount_ours(rec, m, target, rdev, entry), "target_path"))
            entry["state"] = PUBLISHED
            self._save(rec)
        except BaseException:
            if undo.run():
                try:
                    self._save(before)
                except Exception:  # noqa: BLE001
                    log.exception("restoring the node record of %s failed", shown(rec.volume_id))
            raise

    def _prepare_target(self, rec: StageRecord, entry: dict, target: str, block: bool, undo: _Undo) -> None:
        """Make the target a file (block) or a directory (mount), recording what the plugin creates before it is
        made; an existing target is used only when nothing is lost by mounting over it."""
        try:
            st: Optional[os.stat_result] = os.lstat(target)
        except FileNotFoundError:
            st = None
        if st is not None and entry.get("created") and _same_created(entry, st):
            return  # made by an earlier attempt of this publish
        if st is not None:
            entry["created"] = ""
            entry.pop("inode", None)
        if block:
            if st is not None and stat.S_ISDIR(st.st_mode):
                if os.listdir(target):
                    raise FailedPrecondition(f"target_path {shown(target)} is a non-empty directory; a raw block "
                                             "volume is published as a file, and the directory was left alone")
                # an empty directory a tester made (csi-sanity does): moved aside — the same directory, same inode,
                # renamed beside it — while the device's file takes its place, and moved back at unpublish
                aside = _aside_name(target)
                if os.path.lexists(aside):
                    raise FailedPrecondition(f"target_path {shown(target)} is a directory and {shown(aside)}, where "
                                             "it would be kept while the raw block volume is published, exists")
                entry["replaced_dir"] = {"aside": aside, "inode": st.st_ino}
                entry["created"] = "file"
                rec.targets[target] = entry
                self._save(rec)  # recorded before it is moved
                os.rename(target, aside)
                undo.push("the directory moved aside", lambda: _put_back_dir(target, entry["replaced_dir"]))
                st = None
            elif st is not None:
                if not stat.S_ISREG(st.st_mode) or st.st_size != 0 or st.st_nlink != 1:
                    raise FailedPrecondition(f"target_path {shown(target)} exists and is not an empty file the "
                                             "plugin can publish a raw block volume on; it was left alone")
                return  # an empty file the CO made: mounted over, never removed
            if st is None:
                entry["created"] = "file"
                rec.targets[target] = entry
                self._save(rec)  # recorded before it is made
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                os.close(fd)
                entry["inode"] = os.lstat(target).st_ino
                undo.push("the target file", lambda: _unlink_if_created(target, entry))
        else:
            if st is not None:
                if not stat.S_ISDIR(st.st_mode):
                    raise FailedPrecondition(f"target_path {shown(target)} exists and is not a directory; it was "
                                             "left alone")
                if os.listdir(target):
                    raise FailedPrecondition(f"target_path {shown(target)} is a non-empty directory that is not "
                                             "this volume's; it was left alone")
                return  # an empty directory the CO made: mounted over, never removed
            entry["created"] = "dir"
            rec.targets[target] = entry
            self._save(rec)  # recorded before it is made
            os.mkdir(target, 0o750)
            entry["inode"] = os.lstat(target).st_ino
            undo.push("the target directory", lambda: _rmdir_if_empty(target))

    @staticmethod
    def _check_exists(backend: Backend, local: str, volume_id: str) -> None:
        """NOT_FOUND for a volume that does not exist at all (rather than 'not staged'), when the backend can tell
        from this node; any other answer (no credentials here, storage unreachable) leaves the decision to the
        caller's staging check."""
        try:
            backend.get_volume(local, {})
        except NotFound:
            raise NotFound(f"volume {shown(volume_id)} does not exist") from None
        except Exception:  # noqa: BLE001 - only a definite NotFound changes the answer
            pass

    def unpublish(self, volume_id: str, target_path: str) -> None:
        if not volume_id:
            raise InvalidArgument("volume ID is required")
        target_path = self.check_path(target_path, "target_path")
        with self.locks.hold("volume/" + volume_id, operation=Operation("NodeUnpublishVolume", volume_id)):
            rec = self.record(volume_id)
            entry = rec.targets.get(target_path) if rec is not None else None
            if rec is None or entry is None:
                top = mounts.top_mount(target_path)
                if top is not None:
                    raise FailedPrecondition(f"volume {shown(volume_id)} is not published at {shown(target_path)} "
                                             f"on this node, and that path holds a mount of {shown(top.source, 80)} "
                                             f"({top.fstype}) that the plugin did not make for it; it was left alone")
                return  # nothing of the volume's there: nothing to undo, nothing touched
            try:
                backend, local = self._backend(volume_id)
                rdev = self._mounted_rdev(rec, backend, local)
            except NotFound:
                rdev = rec.device_rdev if rec.boot_id == self.boot else None
            self._unmount_ours(target_path, lambda m: self._target_mount_ours(rec, m, target_path, rdev, entry),
                               "target_path")
            view = entry.get("device")
            if view and rec.device and view in loopdev.read_only_views(rec.device):
                loopdev.detach(view)  # a view over this volume's device: provably ours
            created = entry.get("created")
            if created == "dir":
                _rmdir_if_empty(target_path)
            elif created == "file":
                _unlink_if_created(target_path, entry)
                if entry.get("replaced_dir"):
                    _put_back_dir(target_path, entry["replaced_dir"])
            node_io_limits.lift(entry, rdev)
            rec.targets.pop(target_path)
            self._save(rec)

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
        if rec is None or rec.state != STAGED:
            raise NotFound(f"volume {shown(volume_id)} is not staged on node {self.node_name}")
        try:
            self.check_path(volume_path, "volume_path")
        except InvalidArgument as e:
            raise NotFound(f"volume {shown(volume_id)} is not at volume_path {shown(volume_path)}: {e}") from None
        if volume_path != rec.staging_path and volume_path not in rec.targets:
            raise NotFound(f"volume {shown(volume_id)} is not staged or published at {shown(volume_path)}")
        if not os.path.exists(volume_path):
            raise NotFound(f"volume_path {shown(volume_path)} does not exist")
        return rec

    def _path_holds(self, rec: StageRecord, path: str) -> bool:
        try:
            backend, local = self._backend(rec.volume_id)
        except NotFound:
            return False
        rdev = self._device_rdev(rec, backend, local)
        if rdev is None:
            return False
        try:
            st = os.stat(path)
        except OSError:
            return False
        if stat.S_ISBLK(st.st_mode):
            return st.st_rdev == rdev or st.st_rdev == rec.targets.get(path, {}).get("view_rdev")
        return st.st_dev == rdev

    def expand(self, volume_id: str, volume_path: str, staging_path: str = "", required_bytes: int = 0) -> int:
        with self.locks.hold("volume/" + volume_id, operation=Operation("NodeExpandVolume", volume_id)):
            rec = self._staged(volume_id, volume_path)
            if not self._path_holds(rec, volume_path):
                raise NotFound(f"volume {shown(volume_id)} is not mounted at {shown(volume_path)}")
            backend, local = self._backend(volume_id)
            backend.node_refresh_size(local, self._attachment(rec))
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
                raise BackendUnavailable(f"device {device} of volume {shown(volume_id)} still reports {size} bytes "
                                         f"{timeout:.0f}s after the storage grew to {required_bytes}; retry")
            time.sleep(0.1)
            size = filesystems.device_size(device)

    def stats(self, volume_id: str, volume_path: str) -> VolumeStats:
        rec = self._staged(volume_id, volume_path)
        if not os.path.exists(rec.device):
            return VolumeStats(block=rec.access_type == "block", bytes_total=0, abnormal=True,
                               message=f"device {rec.device} of volume {shown(volume_id)} is gone")
        if not self._path_holds(rec, volume_path):
            raise NotFound(f"volume {shown(volume_id)} is not published or staged at {shown(volume_path)}")
        note = self._refresh_io_limits(volume_id, volume_path)
        if stat.S_ISBLK(os.stat(volume_path).st_mode):
            return VolumeStats(block=True, bytes_total=filesystems.device_size(rec.device), message=note)
        u = filesystems.usage(volume_path)
        abnormal = not mounts.is_mountpoint(rec.staging_path)
        return VolumeStats(False, u.bytes_total, u.bytes_available, u.bytes_used, u.inodes_total, u.inodes_free,
                           u.inodes_used, abnormal,
                           f"staging mount {shown(rec.staging_path)} is gone" if abnormal else note)

    def _refresh_io_limits(self, volume_id: str, target_path: str) -> str:
        """Bring a published target's I/O limits up to the volume's current values (node_io_limits.py); returns
        why they are not enforced, if they are not. Skipped while another call holds the volume."""
        try:
            with self.locks.hold("volume/" + volume_id, operation=Operation("NodeGetVolumeStats", volume_id)):
                rec = self.record(volume_id)
                entry = rec.targets.get(target_path) if rec is not None else None
                if rec is None or entry is None:
                    return ""
                backend, local = self._backend(volume_id)
                rdev = self._device_rdev(rec, backend, local)
                if rdev is not None and node_io_limits.enforce(backend, local, entry, rdev, self._attachment(rec)):
                    self._save(rec)
                return node_io_limits.problem(entry)
        except Aborted:
            return ""

    # ---- start-up reconciliation --------------------------------------------------------------------------
    def reconcile(self) -> list[str]:
        """Walk the node records when the node plugin starts: a record none of whose mounts and devices is still
        there (a reboot, a device detached behind the plugin's back) is dropped — only the record: nothing is
        unmounted or detached here. Returns (and logs) what was repaired."""
        repaired = []
        for rec in self.records():
            with self.locks.hold("volume/" + rec.volume_id,
                                 operation=Operation("node start-up repair", rec.volume_id)):
                try:
                    note = self._reconcile_one(rec)
                except Exception:  # noqa: BLE001 - one bad record must not stop the plugin
                    log.exception("reconciling the node record of %s failed; left as it is", shown(rec.volume_id))
                    continue
            if note:
                repaired.append(note)
                log.info("node record repaired: %s", note)
        return repaired

    def _reconcile_one(self, rec: StageRecord) -> str:
        if rec.state != STAGED:
            return ""  # a stage was interrupted: its retry (or the CO's unstage) completes or undoes it
        try:
            backend, local = self._backend(rec.volume_id)
        except (NotFound, TesseraError):
            return ""
        rdev = self._device_rdev(rec, backend, local)
        mounted = self._mounted_rdev(rec, backend, local)
        paths = [rec.staging_path] if rec.access_type == "mount" else []
        any_mount = False
        for p in paths:
            top = mounts.top_mount(p)
            any_mount |= top is not None and self._staging_mount_ours(top, p, mounted)
        for t, entry in rec.targets.items():
            top = mounts.top_mount(t)
            any_mount |= top is not None and self._target_mount_ours(rec, top, t, mounted, entry)
        if rdev is not None or any_mount:
            return ""
        device_there = False
        if rec.device and os.path.exists(rec.device) and self._valid(rec, backend, local) is None \
                and rec.boot_id == self.boot:
            device_there = True  # a backend that cannot tell, same boot: keep
        if device_there:
            return ""
        self._drop(rec.volume_id)
        return (f"volume {shown(rec.volume_id)}: staged at {shown(rec.staging_path)} on device "
                f"{rec.device or '(none)'}, but neither its mounts nor its device are there any more; record dropped")


def _devnum(entry: mounts.MountEntry) -> int:
    major, _, minor = entry.major_minor.partition(":")
    try:
        return os.makedev(int(major), int(minor))
    except ValueError:
        return -1


def _same_created(entry: Mapping, st: os.stat_result) -> bool:
    return bool(entry.get("inode")) and entry.get("inode") == st.st_ino


def _rmdir_if_empty(path: str) -> None:
    """Remove a directory the plugin created, if it is still an empty directory and nothing is mounted on it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode) or mounts.is_mountpoint(path):
        log.warning("%s is no longer an unmounted directory; left alone", shown(path))
        return
    try:
        os.rmdir(path)
    except OSError as e:
        log.warning("directory %s the plugin created was not removed: %s", shown(path), e.strerror)


def _unlink_if_created(path: str, entry: Mapping) -> None:
    """Remove the empty file the plugin created (same inode when recorded), never anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode) or st.st_size != 0 or mounts.is_mountpoint(path) or \
            (entry.get("inode") and entry["inode"] != st.st_ino):
        log.warning("%s is no longer the empty file the plugin created; left alone", shown(path))
        return
    os.unlink(path)


def _aside_name(target: str) -> str:
    """Where an empty directory found at a raw block target is kept while the volume is published there."""
    head, tail = os.path.split(target)
    return os.path.join(head, ".tessera-aside-" + hashlib.sha256(tail.encode("utf-8", "surrogateescape"))
                        .hexdigest()[:16])


def _put_back_dir(path: str, meta: Mapping) -> None:
    """Move the directory set aside by a raw block publish back to `path` — only that directory (same inode)."""
    aside = meta.get("aside", "")
    try:
        st = os.lstat(aside) if aside else None
    except FileNotFoundError:
        st = None
    if st is None or not stat.S_ISDIR(st.st_mode) or st.st_ino != meta.get("inode"):
        log.warning("the directory kept aside for %s is no longer there; nothing put back", shown(path))
        return
    if os.path.lexists(path):
        log.warning("%s exists again; the directory kept aside at %s stays there", shown(path), shown(aside))
        return
    os.rename(aside, path)
