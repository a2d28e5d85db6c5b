"""Backing stores for the iSCSI backend: where a volume's bytes live on the target host.

- `FileStore`: sparse files in a directory, metadata in a JSON sidecar written last (the sidecar is the commit
  point, as in the file backend: an image without one is an unfinished create a retry rebuilds).
- `LvmStore`: logical volumes through the LVM backend's `LvmVolumes` (the same LV code, not a copy), metadata in
  LV tags under the namespace `tiscsi` and LV names `iv-`/`is-` so the lvm backend never lists them. Snapshots need
  a thin pool (a classic snapshot dies with its origin); clones work thick (copy) and thin (writable thin snapshot).

Both speak `Obj` (local id, path, size, metadata fields) so the backend above does not care which one it has.
"""
from __future__ import annotations

import abc
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from .errors import CapacityExceeded, InvalidArgument, NotFound, OutOfRange, Unsupported
from .util import read_json, run, write_json_atomic

VOLUME_PREFIX = "iv-"
SNAPSHOT_PREFIX = "is-"


@dataclass
class Obj:
    local_id: str
    path: str
    size: int
    meta: dict[str, str] = field(default_factory=dict)
    pending: bool = False


class Store(abc.ABC):
    snapshots: bool = True

    @abc.abstractmethod
    def find(self, local_id: str) -> Optional[Obj]: ...

    @abc.abstractmethod
    def list(self, prefix: str) -> list[Obj]: ...

    @abc.abstractmethod
    def create(self, local_id: str, size: int, meta: dict[str, str], source: Optional[str] = None) -> Obj:
        """A new volume of `size`, empty or a copy of the object `source` (volume or snapshot id)."""

    @abc.abstractmethod
    def snapshot(self, source: str, local_id: str, meta: dict[str, str]) -> Obj: ...

    @abc.abstractmethod
    def delete(self, local_id: str) -> None: ...

    @abc.abstractmethod
    def update_meta(self, local_id: str, changes: dict[str, Optional[str]]) -> None:
        """Set (value) or drop (None) metadata fields of an existing object, in the storage itself."""

    @abc.abstractmethod
    def resize(self, local_id: str, size: int) -> int: ...

    @abc.abstractmethod
    def export_path(self, local_id: str) -> str:
        """The file or block device the target exports (activating it if needed)."""

    @abc.abstractmethod
    def capacity(self) -> tuple[int, int]:
        """(available bytes, largest possible volume)."""

    def allocation_unit(self) -> int:
        return 1 << 20

    def probe(self) -> None: ...


class FileStore(Store):
    def __init__(self, directory: str) -> None:
        self.dir = directory
        os.makedirs(directory, exist_ok=True)

    def _paths(self, local_id: str) -> tuple[str, str]:
        return os.path.join(self.dir, local_id + ".img"), os.path.join(self.dir, local_id + ".json")

    def find(self, local_id: str) -> Optional[Obj]:
        img, meta = self._paths(local_id)
        try:
            m = read_json(meta)
            size = os.stat(img).st_size
        except FileNotFoundError:
            return None
        return Obj(local_id, img, size, m)

    def list(self, prefix: str) -> list[Obj]:
        out = []
        for entry in sorted(os.listdir(self.dir)):
            if entry.startswith(prefix) and entry.endswith(".json"):
                o = self.find(entry[:-5])
                if o is not None:
                    out.append(o)
        return out

    def _check_fits(self, size: int) -> None:
        st = os.statvfs(self.dir)
        if size > st.f_blocks * st.f_frsize:
            raise OutOfRange(f"{size} bytes is more than the whole filesystem of {self.dir}")

    def create(self, local_id: str, size: int, meta: dict[str, str], source: Optional[str] = None) -> Obj:
        self._check_fits(size)
        img, side = self._paths(local_id)
        tmp = img + ".tmp"
        if source is None:
            with open(tmp, "wb") as f:
                f.truncate(size)
                os.fsync(f.fileno())
        else:
            src = self.find(source)
            if src is None:
                raise NotFound(f"source {source} does not exist")
            run(["cp", "--reflink=auto", "--sparse=always", "--", src.path, tmp], timeout=3600)
            with open(tmp, "r+b") as f:
                if size > src.size:
                    f.truncate(size)
                os.fsync(f.fileno())
        os.replace(tmp, img)
        write_json_atomic(side, meta)
        o = self.find(local_id)
        assert o is not None
        return o

    def snapshot(self, source: str, local_id: str, meta: dict[str, str]) -> Obj:
        src = self.find(source)
        if src is None:
            raise NotFound(f"volume {source} does not exist")
        return self.create(local_id, src.size, meta, source=source)

    def update_meta(self, local_id: str, changes: dict[str, Optional[str]]) -> None:
        img, side = self._paths(local_id)
        try:
            m = read_json(side)
        except FileNotFoundError:
            raise NotFound(f"volume {local_id} does not exist") from None
        for k, v in changes.items():
            if v is None:
                m.pop(k, None)
            else:
                m[k] = v
        write_json_atomic(side, m)

    def delete(self, local_id: str) -> None:
        img, side = self._paths(local_id)
        for p in (side, img, img + ".tmp"):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass

    def resize(self, local_id: str, size: int) -> int:
        o = self.find(local_id)
        if o is None:
            raise NotFound(f"volume {local_id} does not exist")
        if o.size < size:
            self._check_fits(size)
            with open(o.path, "r+b") as f:
                f.truncate(size)
                os.fsync(f.fileno())
        return max(o.size, size)

    def export_path(self, local_id: str) -> str:
        return self._paths(local_id)[0]

    def capacity(self) -> tuple[int, int]:
        st = os.statvfs(self.dir)
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


class LvmStore(Store):
    NS = "tiscsi"

    def __init__(self, vg: str, thin_pool: Optional[str], timeout: float = 120.0) -> None:
        from .lvm_volumes import LvmVolumes
        self.lvm = LvmVolumes(vg, thin_pool, timeout=timeout)
        self.thin = bool(thin_pool)
        self.snapshots = self.thin

    def _tags(self, meta: dict[str, str]) -> list[str]:
        from .lvm_volumes import fields_to_tags
        return fields_to_tags(self.NS, meta)

    def _obj(self, lv) -> Obj:  # type: ignore[no-untyped-def]
        f = lv.fields(self.NS)
        return Obj(lv.name, self.lvm.device_path(lv.name), lv.size, f, pending=f.get("state") == "pending")

    def find(self, local_id: str) -> Optional[Obj]:
        from .lvm_volumes import validate_name
        try:
            validate_name(local_id)
        except InvalidArgument:
            return None
        lv = self.lvm.find(local_id)
        if lv is None or "kind" not in lv.fields(self.NS):
            return None
        return self._obj(lv)

    def list(self, prefix: str) -> list[Obj]:
        return [self._obj(lv) for lv in self.lvm.list()
                if lv.name.startswith(prefix) and "kind" in lv.fields(self.NS)]

    def create(self, local_id: str, size: int, meta: dict[str, str], source: Optional[str] = None) -> Obj:
        old = self.lvm.find(local_id)
        if old is not None:  # a pending leftover of a crashed create: start again
            self.lvm.remove(local_id, wipe=not self.thin)
        pending = self._tags({"state": "pending"})
        if source is None:
            self.lvm.create(local_id, size, tags=self._tags(meta))
        elif self.thin:
            self.lvm.snapshot(source, local_id, tags=self._tags(meta) + pending, activation_skip=False)
            self.lvm.resize(local_id, size)
            self.lvm.del_tags(local_id, pending)
        else:
            src = self.find(source)
            if src is None:
                raise NotFound(f"source {source} does not exist")
            tmp = "it-" + uuid.uuid4().hex[:16]
            self.lvm.create(local_id, size, tags=self._tags(meta) + pending)
            # copy from a transient COW snapshot so the clone is point-in-time even while the source is written
            self.lvm.snapshot(source, tmp, cow_size=max(src.size // 4, 64 << 20), activation_skip=False)
            try:
                self.lvm.copy(tmp, local_id, src.size)
            finally:
                self.lvm.remove_cow_snapshot(tmp)  # its COW area holds the source's old blocks: zeroed too
            self.lvm.del_tags(local_id, pending)
        o = self.find(local_id)
        assert o is not None
        return o

    def snapshot(self, source: str, local_id: str, meta: dict[str, str]) -> Obj:
        if not self.thin:
            raise Unsupported("snapshots of the iSCSI backend's LVM store need a thin pool (lvm.thinPool)")
        if self.find(source) is None:
            raise NotFound(f"volume {source} does not exist")
        self.lvm.snapshot(source, local_id, tags=self._tags(meta), activation_skip=True)
        o = self.find(local_id)
        assert o is not None
        return o

    def update_meta(self, local_id: str, changes: dict[str, Optional[str]]) -> None:
        lv = self.lvm.find(local_id)
        if lv is None:
            raise NotFound(f"volume {local_id} does not exist")
        have = lv.fields(self.NS)
        drop = [k for k, v in changes.items() if k in have and have[k] != v]
        self.lvm.del_tags(local_id, self._tags({k: have[k] for k in drop}))
        self.lvm.add_tags(local_id, self._tags({k: v for k, v in changes.items() if v is not None and have.get(k) != v}))

    def delete(self, local_id: str) -> None:
        # thick: zeroed before the extents go back to the VG, so the next volume never reads this one's bytes
        # (thin: the pool hands out zeroed blocks)
        self.lvm.remove(local_id, wipe=not self.thin)

    def resize(self, local_id: str, size: int) -> int:
        return self.lvm.resize(local_id, size).size

    def export_path(self, local_id: str) -> str:
        return self.lvm.activate(local_id)

    def capacity(self) -> tuple[int, int]:
        if self.thin:
            pool = self.lvm.pool_info()
            used = sum(lv.size for lv in self.lvm.list() if lv.pool == pool.name)
            return max(pool.size - used, 0), pool.size
        vg = self.lvm.vg_info()
        return vg.free, vg.size

    def allocation_unit(self) -> int:
        try:
            return self.lvm.vg_info().extent_size or (4 << 20)
        except Exception:
            return 4 << 20

    def probe(self) -> None:
        self.lvm.vg_info()


def now() -> str:
    return f"{time.time():.3f}"


__all__ = ["Obj", "Store", "FileStore", "LvmStore", "VOLUME_PREFIX", "SNAPSHOT_PREFIX", "CapacityExceeded", "now"]
