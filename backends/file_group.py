"""Group snapshots of the file backend: every member's filesystem frozen at once, each image copied, all thawed.

Why a freeze: the members are separate files written through separate loop devices, and they are copied one after
the other. Without a pause, a write to member 2 that an application made *after* a write to member 1 could land in
the snapshot of member 2 while the write to member 1 misses member 1's copy — the group would show a state that
never existed. `FIFREEZE` on each member's mounted filesystem (the kernel flushes it and blocks new writes) for the
whole copy makes every member's copy show the same instant. A member attached nowhere on this node is not being
written here and needs no freeze (the file backend is node-local: its volumes are attached on this node or not at
all). A member attached read-write *without* a mounted filesystem (raw block) cannot be paused, so the group is
refused with FAILED_PRECONDITION rather than cut inconsistent, as the spec asks.

Records (under the backend's directory):
    groups/<uuid>.json          the group: name, parameters, members (snapshot and source volume), creation time
    snapshots/<uuid>.json       each member's ordinary snapshot record, with "group": <group local id>

The group record is the commit point and is written last. A member record whose group record does not exist is an
unfinished group create: lookups and listings do not see it, and the retry of that create removes it and cuts the
whole group again (never half a group). A delete removes the members first and the group record last.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from typing import TYPE_CHECKING, Iterator, Mapping, Optional

from .base import GroupSnapshot, Snapshot, object_uuid
from .errors import Aborted, FailedPrecondition, InvalidArgument, NotFound
from .errors import listing
from .filecopy import copy_fd, open_source, staging
from .util import read_json, write_json_atomic

if TYPE_CHECKING:
    from .file import FileBackend

GROUP_PREFIX = "group-"
FIFREEZE = 0xC0045877  # _IOWR('X', 119, int)
FITHAW = 0xC0045878    # _IOWR('X', 120, int)


def group_local_id(driver_name: str, name: str) -> str:
    return GROUP_PREFIX + object_uuid(driver_name, "group/" + name)


def member_local_id(driver_name: str, group_name: str, source_local_id: str, snapshot_prefix: str) -> str:
    """A member's snapshot ID, from the group's name and its source volume (never equal to a CreateSnapshot's)."""
    return snapshot_prefix + object_uuid(driver_name, f"group-member/{group_name}/{source_local_id}")


def record_path(backend: "FileBackend", local_id: str) -> str:
    if not local_id.startswith(GROUP_PREFIX):
        raise NotFound(f"group snapshot {backend.name}:{local_id} does not exist")
    return os.path.join(backend.group_dir, local_id[len(GROUP_PREFIX):] + ".json")


def committed(backend: "FileBackend", local_id: str) -> bool:
    try:
        return os.path.exists(record_path(backend, local_id))
    except NotFound:
        return False


def load(backend: "FileBackend", local_id: str) -> Optional[GroupSnapshot]:
    try:
        m = read_json(record_path(backend, local_id))
    except FileNotFoundError:
        return None
    members: list[Snapshot] = []
    for entry in m["members"]:
        snap = backend._load_snapshot(entry["snapshot"])
        if snap is not None:  # a delete that stopped half-way leaves fewer members; its retry removes the rest
            members.append(snap)
    return GroupSnapshot(local_id=local_id, name=m["name"], members=members, creation_time=m["created"],
                         parameters=m.get("parameters", {}))


def get(backend: "FileBackend", local_id: str) -> GroupSnapshot:
    group = load(backend, local_id) if local_id.startswith(GROUP_PREFIX) else None
    if group is None:
        raise NotFound(f"group snapshot {backend.name}:{local_id} does not exist")
    return group


def create(backend: "FileBackend", name: str, sources: list[str], parameters: Mapping[str, str]) -> GroupSnapshot:
    if parameters:
        raise InvalidArgument(f"the file backend takes no group snapshot parameters; got {listing(parameters)}")
    driver = backend.runtime.driver_name
    gid = group_local_id(driver, name)
    existing = load(backend, gid)
    if existing is not None:
        return existing
    members = [(src, member_local_id(driver, name, src, backend.snapshot_prefix)) for src in sources]
    for _, mid in members:  # what an earlier attempt of this create left before its commit point
        backend._remove_snapshot_files(mid)
    fds: list[int] = []
    try:
        images = []
        for src, _ in members:
            img, meta = backend._vol_paths(src)
            what = f"source volume {backend.name}:{src}"
            if not os.path.exists(meta):
                raise NotFound(f"{what} does not exist")
            fds.append(open_source(img, what))
            images.append((what, img))
        sizes: list[int] = []
        with frozen(images, os.path.join(backend.group_dir, f".{gid}.frozen.json")):
            created = time.time()
            for (_, mid), fd in zip(members, fds):
                img, _ = backend._snap_paths(mid)
                with staging(img) as dst:
                    sizes.append(copy_fd(fd, dst))
    finally:
        for fd in fds:
            os.close(fd)
    for (src, mid), size in zip(members, sizes):
        _, meta = backend._snap_paths(mid)
        write_json_atomic(meta, {"name": f"{name}/{src}", "source_volume": src, "size": size, "created": created,
                                 "group": gid})
    write_json_atomic(record_path(backend, gid), {  # the commit point
        "name": name, "parameters": dict(parameters), "created": created,
        "members": [{"snapshot": mid, "source_volume": src} for src, mid in members]})
    group = load(backend, gid)
    assert group is not None
    return group


def delete(backend: "FileBackend", local_id: str) -> None:
    try:
        path = record_path(backend, local_id)
        m = read_json(path)
    except (NotFound, FileNotFoundError):
        return
    for entry in m["members"]:
        backend._remove_snapshot_files(entry["snapshot"])
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# ---- freezing ---------------------------------------------------------------------------------------------
def _freeze_target(what: str, img: str) -> Optional[str]:
    """The mount point whose filesystem must be frozen while `img` is copied, or None when nothing on this node
    can be writing to it. FailedPrecondition for a read-write attachment that cannot be paused (raw block)."""
    from csi import loopdev, mounts  # node-side helpers, as in backends/file.py
    dev = loopdev.find(img)
    if not dev:
        return None
    try:
        rdev = os.stat(dev).st_rdev
    except FileNotFoundError:
        return None
    mm = f"{os.major(rdev)}:{os.minor(rdev)}"
    found = [m for m in mounts.table() if m.major_minor == mm]
    writable = [m for m in found if not m.readonly]
    if writable:
        return writable[0].mountpoint
    if found:
        return None  # mounted read-only everywhere: nothing writes
    b = loopdev.backing(dev)
    if b is not None and b.read_only:
        return None
    raise FailedPrecondition(f"{what} is attached on this node as {dev} without a mounted filesystem (a raw block "
                             "volume): its writes cannot be paused, so a group snapshot of it would not be "
                             "write-order consistent; stop the writer or snapshot it on its own")


def _freeze(what: str, mountpoint: str, img: str) -> int:
    """Freeze the filesystem mounted at `mountpoint`, after proving it is the one on `img`'s loop device (the
    descriptor's filesystem is that device); return the descriptor to thaw through."""
    from csi import loopdev
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        dev = loopdev.find(img)
        st = os.fstat(fd)
        if not dev or not stat.S_ISDIR(st.st_mode) or os.stat(dev).st_rdev != st.st_dev:
            raise Aborted(f"{what}: the mount at {mountpoint} changed while the group snapshot was prepared; retry")
        try:
            fcntl.ioctl(fd, FIFREEZE, 0)
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise Aborted(f"{what}: its filesystem at {mountpoint} is already frozen by someone else; retry "
                              "when it is thawed") from None
            if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                raise FailedPrecondition(f"{what}: its filesystem at {mountpoint} cannot be frozen "
                                         f"({os.strerror(e.errno)}), so the group would not be consistent") from None
            raise
        return fd
    except BaseException:
        os.close(fd)
        raise


def _thaw(fd: int) -> Optional[OSError]:
    try:
        fcntl.ioctl(fd, FITHAW, 0)
        return None
    except OSError as e:
        return None if e.errno == errno.EINVAL else e  # EINVAL: not frozen (any more)
    finally:
        os.close(fd)


def thaw_leftovers(marker: str) -> None:
    """Thaw what a create killed while its members were frozen left frozen (its marker names them), so that the
    retry neither meets EBUSY forever nor leaves an application blocked. Only a filesystem that is still the one
    recorded (same device) is thawed."""
    try:
        m = read_json(marker)
    except FileNotFoundError:
        return
    for entry in m.get("frozen", []):
        try:
            fd = os.open(entry["mountpoint"], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        if os.fstat(fd).st_dev != entry["dev"]:
            os.close(fd)
            continue
        _thaw(fd)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(marker)


@contextlib.contextmanager
def frozen(images: list[tuple[str, str]], marker: str) -> Iterator[None]:
    """Every member filesystem mounted on this node frozen for the block, thawed after it whatever happens. The
    filesystems are named in `marker` before they are frozen (a crash while frozen is repaired by the retry)."""
    thaw_leftovers(marker)
    targets = [(what, img, _freeze_target(what, img)) for what, img in images]
    from csi import loopdev
    planned = []
    for what, img, mp in targets:
        dev = loopdev.find(img) if mp is not None else None
        if mp is not None and dev:
            planned.append({"mountpoint": mp, "dev": os.stat(dev).st_rdev})
    if planned:
        write_json_atomic(marker, {"frozen": planned})
    held: list[int] = []
    try:
        for what, img, mp in targets:
            if mp is not None:
                held.append(_freeze(what, mp, img))
        yield
    finally:
        problems = [e for e in (_thaw(fd) for fd in reversed(held)) if e is not None]
        if not problems:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(marker)
    if problems:
        raise problems[0]
