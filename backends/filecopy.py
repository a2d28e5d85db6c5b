"""Crash-safe and race-safe file writes for backends that keep volumes as files (file, iSCSI's file store).

Why not `cp SRC TMP`: a source deleted between the existence check and `cp` made `cp: cannot stat` an INTERNAL
error, and a fixed temporary name let two writers (or a writer and a delete) meet in one file. Here:
- the source is opened once (`open_source`): a source that is gone answers NotFound, and once open, a delete of
  it can no longer disturb the copy (the open file keeps its data);
- the copy is written into a temporary file beside the target that its writer holds an exclusive `flock` on
  (`staging`): another process finding it busy answers Aborted instead of clobbering it; a leftover of a crash is
  not locked, so the next writer reuses it and a delete removes it;
- the data is fsynced and renamed over the target (the rename is the data's commit point; the caller's sidecar
  write is the object's), and on any failure the temporary file is removed: no half-made copy is left behind.
Copies clone extents (FICLONE, a reflink) where the file system can, else copy only the data ranges
(SEEK_DATA/SEEK_HOLE with copy_file_range), so sparse images stay sparse.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from typing import Iterator

from .errors import Aborted, NotFound

FICLONE = 0x40049409  # _IOW(0x94, 9, int)
_NO_CLONE = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EBADF}
_CHUNK = 64 << 20


def temp_path(final: str) -> str:
    return final + ".tmp"


def open_source(path: str, what: str) -> int:
    """A read-only descriptor of `path`; NotFound naming `what` when it is gone."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"{what} does not exist (it was deleted)") from None


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _locked_temp(tmp: str, final: str) -> int:
    """Open and flock `tmp`; Aborted when another writer holds it."""
    for _ in range(3):
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Aborted(f"another process is writing {final}; retry later") from None
        try:
            same = os.stat(tmp).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # removed (or replaced) between open and flock: take the file that is there now
    raise Aborted(f"the temporary file of {final} keeps changing under us; retry later")


@contextlib.contextmanager
def staging(final: str) -> Iterator[int]:
    """Yield a descriptor of an empty, exclusively held temporary file beside `final`. On a normal exit the data is
    fsynced and renamed to `final` (and the directory fsynced); on an exception the temporary file is removed."""
    tmp = temp_path(final)
    fd = _locked_temp(tmp, final)
    try:
        os.ftruncate(fd, 0)
        yield fd
        os.fsync(fd)
        os.rename(tmp, final)
        fsync_dir(os.path.dirname(final) or ".")
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                os.unlink(tmp)
        raise
    finally:
        os.close(fd)  # releases the flock


def remove_temp(final: str) -> None:
    """Remove a crash's leftover temporary file of `final`; Aborted when a live writer holds it."""
    tmp = temp_path(final)
    try:
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Aborted(f"{final} is being written by another operation; retry later") from None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    finally:
        os.close(fd)


def copy_fd(src: int, dst: int) -> int:
    """Copy all of `src` into the empty `dst` (reflink if possible, else the data ranges only); return the size."""
    size = os.fstat(src).st_size
    try:
        fcntl.ioctl(dst, FICLONE, src)
        return size
    except OSError as e:
        if e.errno not in _NO_CLONE:
            raise
    os.ftruncate(dst, size)
    pos = 0
    while pos < size:
        try:
            start = os.lseek(src, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole remains
                break
            raise
        end = os.lseek(src, start, os.SEEK_HOLE)
        _copy_range(src, dst, start, min(end, size))
        pos = end
    return size


def _copy_range(src: int, dst: int, start: int, end: int) -> None:
    pos = start
    while pos < end:
        n = min(_CHUNK, end - pos)
        try:
            done = os.copy_file_range(src, dst, n, pos, pos)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            data = os.pread(src, n, pos)
            done = os.pwrite(dst, data, pos) if data else 0
        if done == 0:  # the source shrank under us: the rest reads as zeros, which the truncate already made
            return
        pos += done
