"""Filesystem work on a node: probe, format (only blank devices), grow, usage."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from backends.errors import FailedPrecondition, InvalidArgument
from backends.util import CommandError, run

from .constants import SUPPORTED_FS_TYPES

XFS_MIN_BYTES = 300 << 20  # mkfs.xfs (xfsprogs >= 5.19) refuses smaller file systems


def probe(device: str) -> tuple[str, str]:
    """(filesystem type, partition table type) found on the device by low-level probing; ("", "") when blank.
    Low-level mode (-p) reads the device itself, not blkid's cache, so a fresh mkfs is seen at once."""
    try:
        out = run(["blkid", "-p", "-o", "export", device], timeout=60).stdout
    except CommandError as e:
        if e.returncode == 2:  # nothing found
            return "", ""
        raise
    values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return values.get("TYPE", ""), values.get("PTTYPE", "")


def make(device: str, fstype: str) -> None:
    if fstype == "ext4":
        run(["mkfs.ext4", "-F", "-q", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1", device], timeout=600)
    elif fstype == "xfs":
        size = device_size(device)
        if size < XFS_MIN_BYTES:  # mkfs.xfs would fail; say why rather than pass its stderr on as INTERNAL
            raise InvalidArgument(f"fsType xfs needs a volume of at least 300 MiB; this one has {size} bytes "
                                  "(use ext4, or a larger volume)")
        run(["mkfs.xfs", "-q", "-K", device], timeout=600)
    else:
        raise InvalidArgument(f"fsType {fstype!r} is not supported (one of {', '.join(SUPPORTED_FS_TYPES)})")


def ensure_formatted(device: str, fstype: str) -> str:
    """Format a blank device; never touch one that holds anything. Returns the filesystem found or made."""
    found, table = probe(device)
    if not found and not table:
        make(device, fstype)
        return fstype
    if table and not found:
        raise FailedPrecondition(f"device {device} holds a {table} partition table; refusing to format it")
    if found != fstype:
        raise FailedPrecondition(f"device {device} already holds a {found} filesystem but {fstype} was requested; "
                                 "it is not reformatted (data would be lost)")
    return found


# Mount options that change what mount(8) does rather than how the filesystem is mounted: a remount or bind of
# something else, a loop device made by mount itself (never detached by the plugin), directories made by mount.
_ACTION_OPTIONS = frozenset({"remount", "bind", "rbind", "move", "loop", "offset", "sizelimit", "encryption",
                             "private", "rprivate", "shared", "rshared", "slave", "rslave", "unbindable",
                             "runbindable"})


def _options_in(flag: str) -> list[str]:
    """The options one flag holds: split at commas outside double quotes (an SELinux `context="a:b:c0,c1"` is one)."""
    out, cur, quoted = [], [], False
    for ch in flag:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def check_mount_flags(flags: Sequence[str]) -> None:
    """Refuse (INVALID_ARGUMENT) a mount flag that would make mount(8) act on something other than the volume's
    filesystem at the path the plugin chose (a remount, a bind, a loop device made by mount itself, which the
    plugin would never detach): such a flag is the commonest way a stage fails half-way or touches the host."""
    if len(flags) > 64:
        raise InvalidArgument("at most 64 mount flags are accepted")
    for flag in flags:
        if not isinstance(flag, str) or not flag or len(flag) > 1024 or "\x00" in flag:
            raise InvalidArgument("each mount flag must be a non-empty option of at most 1024 characters")
        for opt in _options_in(flag):
            name = opt.split("=", 1)[0].strip().lower()
            if not name:
                raise InvalidArgument(f"mount flag {flag[:64]!r} holds an empty option")
            if name in _ACTION_OPTIONS or name.startswith(("x-mount.", "make-", "loop")):
                raise InvalidArgument(f"mount flag {opt[:64]!r} is not allowed: it changes what mount does "
                                      "(remount, bind, loop device, ...) rather than how the volume's filesystem "
                                      "is mounted")


def stage_options(fstype: str, mount_flags: Sequence[str]) -> list[str]:
    """Mount options for the staging mount. A snapshot or clone of an xfs volume carries its source's filesystem
    UUID, and xfs refuses a second mount of a UUID already mounted on the node: `nouuid` lets the restored volume
    mount beside its source (the UUID is not used for anything else by a CSI volume)."""
    opts = list(mount_flags)
    if fstype == "xfs" and "nouuid" not in opts:
        opts.append("nouuid")
    return opts


def grow(device: str, mountpoint: str, fstype: str) -> None:
    """Grow a mounted filesystem to fill its device."""
    if os.statvfs(mountpoint).f_flag & os.ST_RDONLY:  # resize2fs/xfs_growfs would fail with EPERM/EROFS
        raise FailedPrecondition(f"the {fstype} filesystem of this volume is mounted read-only here (a reader-only "
                                 "access mode or the ro mount flag); it cannot grow while staged that way")
    if fstype not in ("ext4", "xfs"):
        raise InvalidArgument(f"cannot grow a {fstype} filesystem")
    try:
        if fstype == "ext4":
            run(["resize2fs", device], timeout=600)
        else:
            run(["xfs_growfs", mountpoint], timeout=600)
    except CommandError as e:
        if "Permission denied" in e.stderr or "Operation not permitted" in e.stderr:
            # the kernel refused the online resize ioctl: no CAP_SYS_RESOURCE here (a container without it), or a
            # file system the kernel will not grow mounted; retrying cannot help, unstaging first (offline) can
            raise FailedPrecondition(f"this node cannot grow the mounted {fstype} filesystem: the kernel refused the "
                                     "online resize (the plugin needs CAP_SYS_RESOURCE)") from None
        raise


def device_size(device: str) -> int:
    fd = os.open(device, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


@dataclass
class Usage:
    bytes_total: int
    bytes_available: int
    bytes_used: int
    inodes_total: int
    inodes_free: int
    inodes_used: int


def usage(path: str) -> Usage:
    st = os.statvfs(path)
    total = st.f_blocks * st.f_frsize
    avail = st.f_bavail * st.f_frsize
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    return Usage(total, avail, used, st.f_files, st.f_ffree, st.f_files - st.f_ffree)
