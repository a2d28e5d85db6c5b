"""LVM thin changed-block tracking (backends/lvm_diff.py) on the host: the real thin-provisioning-tools on pool
metadata written into a plain file by `thin_restore` (no device-mapper needed: the tools read a file as they read a
pool's metadata LV), parsed by the backend's streaming readers. The kernel side (metadata snapshots of a live pool,
thin ids from LVM) is tested in the guest: tests/e2e/inguest/lvm/test_lvm_snapshot_metadata.py."""
from __future__ import annotations

import shutil
import subprocess
import tempfile
import tracemalloc

import pytest

from backends.errors import Internal
from backends.lvm_diff import changed_block_ranges, dm_name, held_metadata_root, mapped_ranges
from backends.range_diff import coalesce
from tests.conftest import require

KIB = 1 << 10
CHUNK = 64 * KIB  # data_block_size="128" sectors

POOL = """<superblock uuid="" time="1" transaction="2" data_block_size="128" nr_data_blocks="{blocks}">
  <device dev_id="1" mapped_blocks="5" transaction="0" creation_time="0" snap_time="1">
    <range_mapping origin_begin="16" data_begin="0" length="4" time="0"/>
    <single_mapping origin_block="100" data_block="10" time="0"/>
  </device>
  <device dev_id="2" mapped_blocks="52" transaction="1" creation_time="1" snap_time="1">
    <single_mapping origin_block="16" data_block="0" time="0"/>
    <single_mapping origin_block="17" data_block="20" time="1"/>
    <range_mapping origin_begin="18" data_begin="2" length="2" time="0"/>
    <range_mapping origin_begin="320" data_begin="30" length="48" time="1"/>
  </device>
{extra}</superblock>
"""


def _tools() -> None:
    require(all(shutil.which(t) for t in ("thin_restore", "thin_dump", "thin_delta")),
            "thin-provisioning-tools (thin_restore, thin_dump, thin_delta; .ci/install-deps all installs them)")


def _metadata(tmp_path, extra: str = "", blocks: int = 1000) -> str:
    """Pool metadata in a file: device 1 (16-19 and 100 mapped), device 2 its snapshot after 17 was rewritten,
    100 discarded and 320-367 written."""
    xml = tmp_path / "pool.xml"
    xml.write_text(POOL.format(extra=extra, blocks=blocks))
    meta = tmp_path / "meta.bin"
    with open(meta, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["thin_restore", "-i", str(xml), "-o", str(meta)], check=True, capture_output=True, timeout=300)
    return str(meta)


def _tool(argv: list[str]):
    out = tempfile.TemporaryFile()
    subprocess.run(argv, check=True, stdout=out, timeout=300)
    out.seek(0)
    return out


def test_allocated_from_thin_dump(tmp_path) -> None:
    _tools()
    meta = _metadata(tmp_path)
    with _tool(["thin_dump", "--format", "xml", "--dev-id", "2", meta]) as f:
        ranges = list(mapped_ranges(f, 2))
    assert ranges == [(16 * CHUNK, CHUNK), (17 * CHUNK, CHUNK), (18 * CHUNK, 2 * CHUNK), (320 * CHUNK, 48 * CHUNK)]
    assert list(coalesce(ranges, CHUNK, 1 << 40)) == [(16 * CHUNK, 4 * CHUNK), (320 * CHUNK, 48 * CHUNK)]
    with _tool(["thin_dump", "--format", "xml", "--dev-id", "1", meta]) as f:
        assert list(mapped_ranges(f, 1)) == [(16 * CHUNK, 4 * CHUNK), (100 * CHUNK, CHUNK)]
    with _tool(["thin_dump", "--format", "xml", meta]) as f:  # a dump of every device: only the one asked for
        assert list(mapped_ranges(f, 1)) == [(16 * CHUNK, 4 * CHUNK), (100 * CHUNK, CHUNK)]


def test_unknown_device_is_an_error_not_an_empty_volume(tmp_path) -> None:
    """thin_dump answers an empty dump (exit 0) for a device the pool does not have: that must not read as "nothing
    written", which would make a backup skip every block."""
    _tools()
    meta = _metadata(tmp_path)
    with _tool(["thin_dump", "--format", "xml", "--dev-id", "7", meta]) as f:
        with pytest.raises(Internal, match="thin device 7"):
            list(mapped_ranges(f, 7))


@pytest.mark.parametrize("verbose", [False, True])
def test_delta_from_thin_delta(tmp_path, verbose: bool) -> None:
    """Rewritten (different), discarded (left_only) and new (right_only) chunks are changed; shared ones are not."""
    _tools()
    meta = _metadata(tmp_path)
    argv = ["thin_delta", "--snap1", "1", "--snap2", "2"] + (["--verbose"] if verbose else []) + [meta]
    with _tool(argv) as f:
        assert list(changed_block_ranges(f)) == [(17 * CHUNK, CHUNK), (100 * CHUNK, CHUNK), (320 * CHUNK, 48 * CHUNK)]
    with _tool(["thin_delta", "--snap1", "2", "--snap2", "2", meta]) as f:
        assert list(changed_block_ranges(f)) == []


def test_memory_stays_flat_for_many_mappings(tmp_path) -> None:
    """60,000 separate mappings (every other chunk of a ~7.5 GiB device, none mergeable by the tool): the readers
    hold one element at a time, not the document."""
    _tools()
    n = 60_000
    extra = (f'  <device dev_id="3" mapped_blocks="{n}" transaction="1" creation_time="1" snap_time="1">\n'
             + "".join(f'    <single_mapping origin_block="{2 * i}" data_block="{100 + i}" time="1"/>\n'
                       for i in range(n))
             + "  </device>\n")
    meta = _metadata(tmp_path, extra, blocks=100 + n)
    with _tool(["thin_dump", "--format", "xml", "--dev-id", "3", meta]) as f:
        tracemalloc.start()
        count = 0
        try:
            for off, length in mapped_ranges(f, 3):
                assert (off, length) == (2 * count * CHUNK, CHUNK)
                count += 1
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert count == n
    assert peak < 2 << 20, f"peak {peak} bytes while reading {n} mappings"
    with _tool(["thin_delta", "--snap1", "2", "--snap2", "3", meta]) as f:
        tracemalloc.start()
        try:
            changed = sum(1 for _ in changed_block_ranges(f))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert changed > n // 2
    assert peak < 2 << 20, f"peak {peak} bytes while reading a delta of {changed} runs"


def test_pool_status_and_names() -> None:
    """`dmsetup status` lines of a thin-pool target as the guest's kernel (6.1) prints them, and LVM's dm names."""
    free = "0 4194304 thin-pool 3 115/1024 53/32768 - rw discard_passdown queue_if_no_space - 256 "
    held = "0 4194304 thin-pool 3 116/1024 53/32768 53 rw discard_passdown queue_if_no_space - 256 "
    assert held_metadata_root(free) is None
    assert held_metadata_root(held) == "53"
    with pytest.raises(Internal):
        held_metadata_root("0 131072 thin 0 -")
    assert dm_name("cbt-vg", "pool") == "cbt--vg-pool"
    assert dm_name("vg", "my-pool_tmeta") == "vg-my--pool_tmeta"
