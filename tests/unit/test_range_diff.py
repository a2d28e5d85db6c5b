"""Range streams for changed-block tracking (backends/range_diff.py, backends/file_diff.py, the batching in
csi/snapshot_metadata.py): exact results on small inputs, and laziness on inputs too large to hold — an endless
stream and 1 TiB sparse files — which is what keeps the service's memory flat."""
from __future__ import annotations

import itertools
import os

import pytest

from backends import file_diff
from backends.errors import Internal
from backends.range_diff import BLOCK, changed_blocks, coalesce, from_offset, union
from csi.snapshot_metadata import DEFAULT_MAX_RESULTS, MAX_RESULTS, batches

K = 1 << 10
M = 1 << 20
T = 1 << 40


def test_coalesce_widens_merges_and_clips():
    got = list(coalesce([(10, 5), (100, 1), (BLOCK + 1, 1), (3 * BLOCK, BLOCK), (4 * BLOCK, 1), (10 * BLOCK - 1, 50)],
                        BLOCK, 10 * BLOCK))
    assert got == [(0, 2 * BLOCK), (3 * BLOCK, 2 * BLOCK), (9 * BLOCK, BLOCK)]


def test_coalesce_refuses_a_stream_that_goes_backwards():
    with pytest.raises(Internal):
        list(coalesce([(5 * BLOCK, 1), (BLOCK, 1)], BLOCK, 10 * BLOCK))


def test_union_and_from_offset():
    a = [(0, 10), (100, 10)]
    b = [(5, 10), (50, 1), (110, 5)]
    assert list(union(a, b)) == [(0, 15), (50, 1), (100, 15)]
    ranges = [(0, BLOCK), (2 * BLOCK, 3 * BLOCK)]
    assert list(from_offset(ranges, BLOCK, BLOCK)) == [(2 * BLOCK, 3 * BLOCK)]
    assert list(from_offset(ranges, 3 * BLOCK + 7, BLOCK)) == [(3 * BLOCK, 2 * BLOCK)]
    assert list(from_offset(ranges, 5 * BLOCK, BLOCK)) == []


def test_changed_blocks_compares_block_by_block():
    base = bytearray(8 * BLOCK)
    target = bytearray(base)
    target[BLOCK + 3] = 1  # block 1
    target[2 * BLOCK] = 1  # block 2, merged with 1
    target[6 * BLOCK - 1] = 1  # block 5
    got = list(changed_blocks([(0, 8 * BLOCK)], lambda o, n: bytes(base[o:o + n]),
                              lambda o, n: bytes(target[o:o + n])))
    assert got == [(BLOCK, 2 * BLOCK), (5 * BLOCK, BLOCK)]


def test_changed_blocks_reads_a_shorter_base_as_zeros():
    base = bytes(2 * BLOCK)
    target = bytes(2 * BLOCK) + b"\1" + bytes(2 * BLOCK - 1)
    got = list(changed_blocks([(0, 4 * BLOCK)], lambda o, n: base[o:o + n], lambda o, n: target[o:o + n]))
    assert got == [(2 * BLOCK, BLOCK)]


def test_streams_are_lazy_on_an_endless_input():
    endless = ((i * 2 * BLOCK, BLOCK) for i in itertools.count())
    first = list(itertools.islice(batches(coalesce(endless, BLOCK, 1 << 62), 0), 3))
    assert [len(b) for b in first] == [DEFAULT_MAX_RESULTS] * 3
    assert first[1][0] == (DEFAULT_MAX_RESULTS * 2 * BLOCK, BLOCK)
    big = next(batches(((i, 1) for i in itertools.count()), 10 ** 9))
    assert len(big) == MAX_RESULTS


@pytest.fixture
def sparse_pair(tmp_path):
    """Two sparse 1 TiB files: base with data at 1 MiB and 700 GiB, target a copy changed at 512 GiB and 1 TiB - 1."""
    base, target = str(tmp_path / "base.img"), str(tmp_path / "target.img")
    for path, writes in ((base, [(M, b"a" * 100), (700 << 30, b"b" * 5000)]),
                         (target, [(M, b"a" * 100), (700 << 30, b"b" * 5000), (512 << 30, b"c"), (T - 1, b"d")])):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, T)
            for off, data in writes:
                os.pwrite(fd, data, off)
        finally:
            os.close(fd)
    return base, target


def test_file_allocated_on_a_sparse_terabyte(sparse_pair):
    base, _ = sparse_pair
    got = list(file_diff.allocated(base, "base", T, 0, BLOCK))
    assert got == [(M, BLOCK), (700 << 30, BLOCK)]
    assert list(file_diff.allocated(base, "base", T, M + 10, BLOCK)) == [(M, BLOCK), (700 << 30, BLOCK)]
    assert list(file_diff.allocated(base, "base", T, M + BLOCK, BLOCK)) == [(700 << 30, BLOCK)]


def test_file_delta_on_a_sparse_terabyte(sparse_pair):
    base, target = sparse_pair
    got = list(file_diff.changed(base, "base", target, "target", T, 0, BLOCK))
    assert got == [(512 << 30, BLOCK), (T - BLOCK, BLOCK)]
