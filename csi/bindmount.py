"""Bind mounts whose per-mount flags (read-only, nosuid, noexec, ...) hold in every peer the mount propagates to.

Why not `mount -o bind,ro`: util-linux makes that in two steps, a bind and then a read-only remount. Under shared
propagation — the kubelet directory is mounted into the node plugin with `mountPropagation: Bidirectional`, so
kubelet and the pods see the host's copy — the copy is made at the bind, read-write, and a remount does not
propagate: the plugin saw a read-only mount while the host, kubelet and the pod got a writable one (found by running
the conformance suite against the plugin inside its image, with the targets propagated back to the host).

Here the tree is cloned detached (`open_tree(OPEN_TREE_CLONE)`), its flags are set while nobody can see it
(`mount_setattr`), and it is attached in one step (`move_mount`): every propagated copy is cloned from a mount that
already has its flags. Linux 5.12 or later (Debian 12 ships 6.1); an older kernel gets a clear error rather than a
silently writable "read-only" mount.
"""
from __future__ import annotations

import ctypes
import errno
import os
from typing import Iterable

from backends.errors import BackendUnavailable, InvalidArgument

# The new mount API's syscalls share one number on every architecture (asm-generic table, Linux 5.2 / 5.12).
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442

OPEN_TREE_CLONE = 1
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
MOVE_MOUNT_F_EMPTY_PATH = 0x4

MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR__ATIME = 0x70
MOUNT_ATTR_RELATIME = 0x0
MOUNT_ATTR_NOATIME = 0x10
MOUNT_ATTR_STRICTATIME = 0x20
MOUNT_ATTR_NODIRATIME = 0x80

# Per-mount (VFS) options a bind can carry, and what they set. Filesystem options (discard, data=, ...) belong to
# the staging mount, where the filesystem is mounted; on a bind they mean nothing and are left out, as mount(8)'s
# bind remount leaves them out.
_FLAGS = {"ro": MOUNT_ATTR_RDONLY, "nosuid": MOUNT_ATTR_NOSUID, "nodev": MOUNT_ATTR_NODEV,
          "noexec": MOUNT_ATTR_NOEXEC, "nodiratime": MOUNT_ATTR_NODIRATIME}
_ATIME = {"noatime": MOUNT_ATTR_NOATIME, "relatime": MOUNT_ATTR_RELATIME, "strictatime": MOUNT_ATTR_STRICTATIME}
_NEUTRAL = {"rw", "suid", "dev", "exec", "atime", "diratime", "defaults", "bind"}


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def attributes(options: Iterable[str]) -> tuple[int, int]:
    """(attr_set, attr_clr) for mount options; filesystem-only options are ignored (see _FLAGS)."""
    attr_set = attr_clr = 0
    for opt in options:
        if opt in _FLAGS:
            attr_set |= _FLAGS[opt]
        elif opt in _ATIME:
            attr_set = (attr_set & ~MOUNT_ATTR__ATIME) | _ATIME[opt]
            attr_clr |= MOUNT_ATTR__ATIME
        elif opt == "rw":
            attr_set &= ~MOUNT_ATTR_RDONLY
    return attr_set, attr_clr


def _fail(what: str, target: str) -> None:
    err = ctypes.get_errno()
    if err == errno.ENOSYS:
        raise BackendUnavailable(f"this kernel lacks the mount API (open_tree/mount_setattr/move_mount, Linux 5.12+) "
                                 f"that a read-only or restricted bind at {target!r} needs")
    if err == errno.ENOENT:
        raise InvalidArgument(f"{what}: {target!r} does not exist")
    raise OSError(err, f"{what} for {target!r}: {os.strerror(err)}")


def bind(source: str, target: str, options: Iterable[str] = ()) -> None:
    """Bind `source` (a directory or a device node) onto `target` with `options`' per-mount flags set before the
    mount becomes visible anywhere. Not recursive, like `mount --bind`."""
    attr_set, attr_clr = attributes(options)
    # The source (a staging mount or a device the plugin attached) is followed like mount(8) follows it: LVM's
    # /dev/<vg>/<lv> is a symlink to its dm node. The target is not: move_mount without MOVE_MOUNT_T_SYMLINKS does
    # not follow a symlink there (csi/paths.py refuses one anyway).
    fd = _libc.syscall(SYS_OPEN_TREE, AT_FDCWD, os.fsencode(source), OPEN_TREE_CLONE | os.O_CLOEXEC)
    if fd < 0:
        _fail("cloning the mount", source)
    try:
        if attr_set or attr_clr:
            attr = _MountAttr(attr_set, attr_clr, 0, 0)
            if _libc.syscall(SYS_MOUNT_SETATTR, fd, b"", AT_EMPTY_PATH, ctypes.byref(attr),
                             ctypes.sizeof(attr)) < 0:
                _fail("setting the mount's flags", source)
        if _libc.syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, os.fsencode(target), MOVE_MOUNT_F_EMPTY_PATH) < 0:
            _fail("attaching the mount", target)
    finally:
        os.close(fd)
