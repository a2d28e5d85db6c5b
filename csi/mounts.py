"""Mount table queries (from /proc/self/mountinfo) and mount/unmount through util-linux."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

from backends.util import CommandError, run


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    major_minor: str
    root: str
    mountpoint: str
    options: frozenset[str]
    fstype: str
    source: str

    @property
    def readonly(self) -> bool:
        return "ro" in self.options


def _unescape(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) + 0 and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def table() -> list[MountEntry]:
    entries = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            a = left.split(" ")
            b = right.split(" ")
            if len(a) < 6 or len(b) < 2:
                continue
            entries.append(MountEntry(int(a[0]), a[2], _unescape(a[3]), _unescape(a[4]), frozenset(a[5].split(",")),
                                      b[0], _unescape(b[1])))
    return entries


def mounts_at(path: str) -> list[MountEntry]:
    """Every mount stacked on `path`, bottom first."""
    return [m for m in table() if m.mountpoint == path]


def top_mount(path: str) -> Optional[MountEntry]:
    found = mounts_at(path)
    return found[-1] if found else None


def is_mountpoint(path: str) -> bool:
    return bool(mounts_at(path))


def mount(source: str, target: str, fstype: Optional[str] = None, options: Sequence[str] = (),
          bind: bool = False) -> None:
    """Mount through mount(8); a bind goes through csi.bindmount, so that its flags (ro above all) are set before
    the mount propagates to kubelet's and the pods' view (mount(8) would bind, then remount: the copy stays rw)."""
    if bind:
        from . import bindmount
        bindmount.bind(source, target, options)
        return
    argv = ["mount"]
    if fstype:
        argv += ["-t", fstype]
    opts = list(options)
    if opts:
        argv += ["-o", ",".join(opts)]
    argv += ["--", source, target]
    run(argv, timeout=120)


def unmount(target: str) -> None:
    """Unmount the top mount at `target` (one; the caller has checked that it is the one to go)."""
    run(["umount", "--", target], timeout=120)


def unmount_all(target: str) -> None:
    """Unmount every mount stacked on `target`; nothing mounted is success."""
    for _ in range(16):
        if not is_mountpoint(target):
            return
        try:
            run(["umount", "--", target], timeout=120)
        except CommandError as e:
            if "not mounted" in e.stderr:
                return
            if "busy" in e.stderr:  # EBUSY: a process or a mount below holds it; the spec's answer is FAILED_PRECONDITION
                from backends.errors import InUse
                from .holders import describe
                raise InUse(f"{target} is busy{describe(target, [m.mountpoint for m in table()])}; stop what uses "
                            "it, then retry") from None
            raise
    raise RuntimeError(f"{target} still mounted after 16 unmounts")


def path_exists(path: str) -> bool:
    return os.path.lexists(path)
