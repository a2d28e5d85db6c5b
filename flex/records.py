"""Durable per-path mount records for the shim.

kubelet's `unmount` and `unmountdevice` pass only a path. Each mount the shim makes therefore leaves a small JSON file
under `<stateDir>/flex/mounts/` naming the volume behind the path; it is written atomically *before* the mount is
made (so a crash part-way leaves a record that a retried unmount completes) and removed once the unmount succeeded.
The files live on the node's disk, so they outlive a reboot (after which the mounts are gone but the loop devices,
iSCSI sessions, etc. may need the backend's detach).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from dataclasses import asdict, dataclass
from typing import Iterator, Optional

from backends.util import read_json, write_json_atomic

KIND_DEVICE = "device"  # a staging mount: mountdevice's global path, or one the shim made for a pod mount
KIND_POD = "pod"        # a pod's volume directory (mount)


@dataclass
class MountRecord:
    path: str
    kind: str
    volume_id: str
    pv_name: str = ""
    staging_path: str = ""     # for pod records: the staging mount it was bound from
    auto_staged: bool = False  # for device records: made by `mount` itself (attach: false), so unmount unstages it
    readonly: bool = False
    fs_type: str = ""
    fs_group: Optional[int] = None


class Records:
    def __init__(self, state_dir: str) -> None:
        self.root = os.path.join(state_dir, "flex")
        self.mount_dir = os.path.join(self.root, "mounts")
        self.lock_dir = os.path.join(self.root, "locks")
        self.attach_dir = os.path.join(self.root, "attachments")
        for d in (self.mount_dir, self.lock_dir, self.attach_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)

    @staticmethod
    def _key(text: str) -> str:
        # kubelet's arguments arrive as bytes the OS gave Python (undecodable ones as surrogates): hash them as given
        return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:40]

    def _path(self, path: str) -> str:
        return os.path.join(self.mount_dir, self._key(os.path.normpath(path)) + ".json")

    def get(self, path: str) -> Optional[MountRecord]:
        try:
            return MountRecord(**read_json(self._path(path)))
        except FileNotFoundError:
            return None

    def put(self, rec: MountRecord) -> None:
        rec.path = os.path.normpath(rec.path)
        write_json_atomic(self._path(rec.path), asdict(rec))

    def drop(self, path: str) -> None:
        try:
            os.unlink(self._path(path))
        except FileNotFoundError:
            pass

    def all(self) -> list[MountRecord]:
        out = []
        for name in sorted(os.listdir(self.mount_dir)):
            if name.endswith(".json"):
                try:
                    out.append(MountRecord(**read_json(os.path.join(self.mount_dir, name))))
                except (FileNotFoundError, ValueError, TypeError):
                    continue
        return out

    @contextlib.contextmanager
    def volume_lock(self, volume_id: str) -> Iterator[None]:
        """Serialise shim processes working on one volume (kubelet may run mount for two pods at once); the
        in-process locks of NodeOps do not reach across processes."""
        fd = os.open(os.path.join(self.lock_dir, self._key(volume_id) + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # ---- controller-side attachments (attach/detach run in kube-controller-manager) ----------------------
    def _attach_path(self, pv_name: str, node: str) -> str:
        return os.path.join(self.attach_dir, self._key(f"{pv_name}@{node}") + ".json")

    def put_attachment(self, pv_name: str, node: str, volume_id: str, node_id: str) -> None:
        write_json_atomic(self._attach_path(pv_name, node),
                          {"pv_name": pv_name, "node": node, "volume_id": volume_id, "node_id": node_id})

    def get_attachment(self, pv_name: str, node: str) -> Optional[dict]:
        try:
            return read_json(self._attach_path(pv_name, node))
        except FileNotFoundError:
            return None

    def drop_attachment(self, pv_name: str, node: str) -> None:
        try:
            os.unlink(self._attach_path(pv_name, node))
        except FileNotFoundError:
            pass
