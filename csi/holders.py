"""Who keeps a mount point busy: for the message of an unmount that the kernel refused with EBUSY.

An operator who reads "target is busy" must go and find the process; the plugin can look first. Best effort: a
process in another mount namespace may show paths relative to its own root, and a process that exits meanwhile is
skipped. Never raises."""
from __future__ import annotations

import os

from backends.errors import clip


def _under(path: str, target: str) -> bool:
    path = path.removesuffix(" (deleted)")
    return path == target or path.startswith(target.rstrip("/") + "/")


def _process_holds(pid: str, target: str) -> bool:
    base = f"/proc/{pid}"
    for name in ("cwd", "root", "exe"):
        try:
            if _under(os.readlink(f"{base}/{name}"), target):
                return True
        except OSError:
            pass
    try:
        fds = os.listdir(f"{base}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if _under(os.readlink(f"{base}/fd/{fd}"), target):
                return True
        except OSError:
            pass
    return False


def holders(target: str, mountpoints: list[str], limit: int = 5) -> list[str]:
    """Up to `limit` descriptions of what holds `target`: mounts below it (from `mountpoints`), then processes
    as `name[pid]` whose working directory, root, executable or an open file lies under it."""
    found = [f"the mount at {clip(m, 200)}" for m in mountpoints if m != target and _under(m, target)][:limit]
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return found
    me = str(os.getpid())
    for pid in pids:
        if len(found) >= limit:
            break
        if pid == me or not _process_holds(pid, target):
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        found.append(f"process {name}[{pid}]")
    return found


def describe(target: str, mountpoints: list[str]) -> str:
    """': held by process sleep[123], …' or '' when nothing is found."""
    found = holders(target, mountpoints)
    return f": held by {', '.join(found)}" if found else ""
