"""Changed-block tracking for image files (the file backend's snapshots): which extents hold data, and which
differ between two snapshots.

Allocated extents come from the file system itself (`lseek` SEEK_DATA / SEEK_HOLE): a snapshot image is a sparse
copy of the volume's image (`backends.filecopy` copies only data ranges, or reflinks them), so its holes are
exactly the blocks the volume never wrote. A file system without hole tracking answers "all data", which
over-reports (a full backup), never under-reports.

The delta compares the two images block by block over the union of their allocated extents: a block that is a
hole in both is zeros in both, so only data extents can differ. This reads the data of both snapshots; FIEMAP's
shared-extent flags would skip reflinked extents unread, but the host file systems here (ext4) make no reflinks,
so the comparison is the one path, and it is exact on every file system.

Files are opened inside the generators, so a stream that is never read holds no descriptor; a snapshot deleted
while its stream runs keeps being read through the open descriptor.
"""
from __future__ import annotations

import errno
import os
from typing import Iterator

from .errors import NotFound
from .range_diff import Range, changed_blocks, coalesce, from_offset, union


def data_extents(fd: int, start: int, size: int) -> Iterator[Range]:
    """The data extents of an open file between `start` and `size`, ascending."""
    pos = start
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data at or after pos
                return
            raise
        if data >= size:
            return
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        yield data, min(hole, size) - data
        pos = hole


def _open(path: str, what: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"{what} does not exist (it was deleted)") from None


def allocated(path: str, what: str, size: int, start: int, unit: int) -> Iterator[Range]:
    """The allocated extents of the image at `path`, widened to `unit`, from the unit holding `start`."""
    fd = _open(path, what)
    try:
        first = start // unit * unit
        yield from from_offset(coalesce(data_extents(fd, first, size), unit, size), start, unit)
    finally:
        os.close(fd)


def changed(base_path: str, base_what: str, target_path: str, target_what: str, size: int, start: int,
            unit: int) -> Iterator[Range]:
    """The `unit` blocks that differ between two images, within the target's `size`, from the unit holding
    `start` on."""
    base = _open(base_path, base_what)
    try:
        target = _open(target_path, target_what)
        try:
            first = start // unit * unit
            base_size = os.fstat(base).st_size
            candidates = union(data_extents(base, first, min(base_size, size)), data_extents(target, first, size))
            diff = changed_blocks(candidates, lambda o, n: os.pread(base, n, o), lambda o, n: os.pread(target, n, o),
                                  unit)
            yield from from_offset(coalesce(diff, unit, size), start, unit)
        finally:
            os.close(target)
    finally:
        os.close(base)
