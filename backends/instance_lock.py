"""One process per piece of storage: an exclusive flock on a lock file, held for the life of the process.

Why: some storage can be driven by one controller only. The iSCSI target's configuration (LIO in the host's kernel,
or one tgtd) has no locking of its own, and two controllers on one target would race target numbers, ACLs and
backing stores. A second controller therefore refuses to start, naming the first, instead of racing. A flock dies
with its process (a crash or kill -9 frees it at once), so a restarted controller never meets a stale lock.
"""
from __future__ import annotations

import fcntl
import os
import socket

from .errors import FailedPrecondition

_held: dict[str, int] = {}  # path -> descriptor, kept open (and so locked) until the process exits


def claim(path: str, what: str, why: str) -> None:
    """Hold `path` exclusively for this process, or raise FailedPrecondition naming the holder. Idempotent within
    one process (a second claim of a held path is a no-op)."""
    if path in _held:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        finally:
            os.close(fd)
        raise FailedPrecondition(f"{what} is already served by {holder} (lock {path}); {why}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"tessera-csi controller pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    _held[path] = fd
