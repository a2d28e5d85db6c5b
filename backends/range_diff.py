"""Byte-range streams for changed-block tracking (the CSI SnapshotMetadata service), shared by the backends.

A range stream is an iterator of `(offset, length)` tuples in ascending offset order. Every helper here is a
generator that holds at most one pending range (plus one read buffer in `changed_blocks`), so a 1 TiB sparse
volume, or one written end to end, costs the same memory as a small one: nothing ever builds a list of all ranges.

Why VARIABLE_LENGTH extents rather than fixed blocks: a volume written sequentially is one tuple instead of
millions, and the external-snapshot-metadata sidecar accepts both styles. Extents are still aligned outward to a
backend's reporting unit (`Backend.metadata_block_size`), so a backup tool can treat them as whole blocks.
"""
from __future__ import annotations

import heapq
from typing import Callable, Iterable, Iterator, Optional

from .errors import Internal

Range = tuple[int, int]
# The file and RBD backends report and compare in 64 KiB blocks: fine enough that a small write costs a backup
# little, coarse enough that a block comparison makes few, large reads.
BLOCK = 64 << 10
# Bytes read from each snapshot per step of a block comparison.
READ_CHUNK = 1 << 20


def coalesce(ranges: Iterable[Range], unit: int, size: int) -> Iterator[Range]:
    """`ranges` (ascending by offset, possibly overlapping) widened to whole `unit`s, cut at `size`, and with
    overlapping or touching ranges merged. A range starting before one already sent is a bug in the producer."""
    cur: Optional[list[int]] = None
    for off, length in ranges:
        if length <= 0:
            continue
        a = off // unit * unit
        b = min(-(-(off + length) // unit) * unit, size)
        if a >= b:
            continue
        if cur is not None:
            if a < cur[0]:
                raise Internal(f"range stream out of order at offset {off}")
            if a <= cur[1]:
                cur[1] = max(cur[1], b)
                continue
            yield cur[0], cur[1] - cur[0]
        cur = [a, b]
    if cur is not None:
        yield cur[0], cur[1] - cur[0]


def union(*streams: Iterable[Range]) -> Iterator[Range]:
    """The ranges covered by any of the ascending `streams`, merged, ascending."""
    return coalesce(heapq.merge(*streams), 1, 1 << 63)


def from_offset(ranges: Iterable[Range], start: int, unit: int) -> Iterator[Range]:
    """What the spec asks of a resumed stream: no range that ends at or before `start`; a range across `start`
    begins at the `unit` holding `start` (so the first tuple still contains the byte the caller asked for)."""
    floor = start // unit * unit
    for off, length in ranges:
        end = off + length
        if end <= start:
            continue
        if off < floor:
            off = floor
        yield off, end - off


def changed_blocks(candidates: Iterable[Range], read_base: Callable[[int, int], bytes],
                   read_target: Callable[[int, int], bytes], block: int = BLOCK) -> Iterator[Range]:
    """The `block`-sized blocks inside `candidates` whose bytes differ between base and target, merged into
    extents. `read_*(offset, length)` may return fewer bytes past the end of a snapshot (a volume grown between
    the two): the missing part reads as zeros, as it does on the device."""
    def padded(read: Callable[[int, int], bytes], off: int, n: int) -> bytes:
        data = read(off, n)
        return data if len(data) >= n else data + bytes(n - len(data))

    def blocks() -> Iterator[Range]:
        for off, length in coalesce(candidates, block, 1 << 63):
            pos, end = off, off + length
            while pos < end:
                n = min(READ_CHUNK, end - pos)
                a, b = padded(read_base, pos, n), padded(read_target, pos, n)
                if a != b:
                    for i in range(0, n, block):
                        if a[i:i + block] != b[i:i + block]:
                            yield pos + i, block
                pos += n
    return coalesce(blocks(), 1, 1 << 63)
