"""Changed-block tracking for LVM thin snapshots, read from the thin pool's own metadata.

A thin pool maps every thin device's virtual blocks (chunks, the pool's `chunk_size`) to data blocks in a b-tree the
kernel keeps on the pool's metadata LV (`<pool>_tmeta`). A thin snapshot starts as a copy of its origin's mapping
and shares every data block with it; a write to the origin afterwards maps the written chunk to a new data block.
So, with nothing read from the volumes themselves:

- *Allocated*: the chunks the snapshot's thin device maps (`thin_dump --dev-id N`): exactly the chunks written
  before the snapshot (a chunk never written, or discarded, is unmapped and reads as zeros).
- *Delta*: `thin_delta --snap1 A --snap2 B` walks both mappings together and says, per run of chunks, `same` (both
  map the same data block: the bytes cannot differ), `different` (both mapped, to different data blocks: rewritten
  in between), `left_only` (mapped in the base only: discarded since, now zeros) and `right_only` (written since).
  Everything but `same` is a changed chunk. A chunk rewritten with its old bytes counts as changed: over-reporting
  costs a backup one chunk, never a wrong restore.

Reading a live pool: the kernel changes the metadata as volumes are written, so the tools read a *metadata
snapshot* the kernel holds still for them (`dmsetup message <pool>-tpool 0 reserve_metadata_snap`, the tools'
`--metadata-snap`, then `release_metadata_snap`). Only one can exist per pool, so its use is serialised: a
threading lock per pool in this process and an flock under the backend's state directory across processes. The
reservation is held only while a tool writes its XML into an unlinked temporary file in that directory; the
stream is parsed from the file afterwards, so a slow reader (a backup paging through a big volume) never holds the
pool's metadata snapshot. A reservation left by a process that died (the kernel refuses a second one, EBUSY) is
released and taken again, once.

Memory stays flat whatever the volume's size: the tool's output goes to a file, not into memory, and it is read
back with `xml.etree.ElementTree.iterparse`, each mapping element dropped as soon as it is turned into a range.

Units: the tools speak in pool blocks; the XML's `data_block_size` (512-byte sectors) turns them into bytes, and
extents are aligned to the pool's chunk size (LVM allows only multiples of 64 KiB).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from typing import IO, Iterator, Optional

from .errors import Aborted, BackendUnavailable, Internal, NotFound
from .lvm_volumes import LVM_ENV, lvm_argv, validate_name
from .range_diff import Range, coalesce, from_offset
from .util import CommandError, run

SECTOR = 512
MIN_CHUNK = 64 << 10  # LVM's smallest thin-pool chunk; every chunk size is a multiple of it
CHANGED = frozenset({"different", "left_only", "right_only"})
_POOL_LOCKS: dict[str, threading.Lock] = {}
_POOL_LOCKS_GUARD = threading.Lock()


def dm_name(vg: str, lv: str) -> str:
    """The device-mapper name LVM gives `vg/lv` (each '-' inside a name doubled, the two joined by '-')."""
    return f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"


def held_metadata_root(status_line: str) -> Optional[str]:
    """The held metadata root of a thin-pool target from its `dmsetup status` line, or None when none is held.
    The line: `<start> <len> thin-pool <transaction> <used>/<total meta> <used>/<total data> <held root|-> ...`."""
    parts = status_line.split()
    if len(parts) < 7 or parts[2] != "thin-pool":
        raise Internal(f"not a thin-pool status line: {status_line.strip()!r}")
    return None if parts[6] == "-" else parts[6]


def _elements(f: IO[bytes]) -> Iterator[tuple[str, dict[str, str], tuple[str, ...]]]:
    """(tag, attributes, tags of its ancestors) of every element of the XML in `f`, as the parser reaches its start,
    with memory kept flat: finished elements are removed from their parents at once."""
    stack: list[ET.Element] = []
    for event, elem in ET.iterparse(f, events=("start", "end")):
        if event == "start":
            yield elem.tag, dict(elem.attrib), tuple(e.tag for e in stack)
            stack.append(elem)
        else:
            stack.pop()
            if stack:
                del stack[-1][:]  # the finished child (and any before it) leaves its parent's list


def _block_bytes(attrib: dict[str, str]) -> int:
    try:
        n = int(attrib.get("data_block_size", "0")) * SECTOR
    except ValueError:
        n = 0
    if n <= 0:
        raise Internal(f"thin pool metadata dump has no usable data_block_size: {attrib!r}")
    return n


def mapped_ranges(f: IO[bytes], dev_id: int) -> Iterator[Range]:
    """Byte ranges of the virtual blocks thin device `dev_id` maps, from `thin_dump --dev-id` XML in `f`, in the
    dump's (ascending) order. Internal when the dump holds no such device: LVM knows the LV, the pool does not."""
    block = 0
    seen = inside = False
    for tag, a, parents in _elements(f):
        if tag == "superblock":
            block = _block_bytes(a)
        elif tag == "device":
            inside = a.get("dev_id") == str(dev_id)  # only this device's mappings, whatever else a dump holds
            seen = seen or inside
        elif inside and parents[-1:] == ("device",) and tag == "range_mapping":
            yield int(a["origin_begin"]) * block, int(a["length"]) * block
        elif inside and parents[-1:] == ("device",) and tag == "single_mapping":
            yield int(a["origin_block"]) * block, block
    if not seen:
        raise Internal(f"thin device {dev_id} is not in the pool's metadata (LVM and the kernel disagree)")


def changed_block_ranges(f: IO[bytes]) -> Iterator[Range]:
    """Byte ranges that are not `same` in `thin_delta` XML in `f`: `different`, `left_only` and `right_only` runs
    (their attributes, or their `<range>` children as `--verbose` writes them), in the tool's (ascending) order."""
    block = 0
    for tag, a, parents in _elements(f):
        if tag == "superblock":
            block = _block_bytes(a)
        elif tag in CHANGED and "begin" in a:
            yield int(a["begin"]) * block, int(a["length"]) * block
        elif tag == "range" and parents[-1:] and parents[-1] in CHANGED:
            yield int(a["begin"]) * block, int(a["length"]) * block


class ThinPoolMetadata:
    """One thin pool's metadata, read through metadata snapshots: chunk size, thin device IDs, dumps and deltas."""

    def __init__(self, vg: str, pool: str, work_dir: str, *, timeout: float = 120.0,
                 tool_timeout: Optional[float] = None) -> None:
        self.vg = validate_name(vg, "VG")
        self.pool = validate_name(pool, "thin pool")
        self.work_dir = work_dir
        self.timeout = timeout
        # a dump walks the whole mapping of a device: give it longer than one LVM command
        self.tool_timeout = tool_timeout or max(timeout, 600.0)
        self._chunk: Optional[int] = None

    # -- facts from LVM
    def _lvs(self, target: str, fields: str) -> list[dict[str, str]]:
        out = run(lvm_argv(["lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", fields, target]),
                  timeout=self.timeout, env=LVM_ENV, check=False)
        if out.returncode != 0:
            detail = (out.stderr or out.stdout).strip().splitlines()
            last = detail[-1] if detail else "lvs failed"
            if "failed to find logical volume" in (out.stderr or "").lower():
                raise NotFound(f"logical volume {target} does not exist: {last}")
            raise BackendUnavailable(f"cannot read logical volume {target}: {last}")
        try:
            return [row for part in json.loads(out.stdout).get("report", []) for row in part.get("lv", [])]
        except json.JSONDecodeError as e:
            raise Internal(f"cannot parse the lvs report of {target}: {e}") from None

    def chunk_size(self) -> int:
        """The pool's chunk size in bytes (`lvs -o chunk_size`), cached: it never changes for a pool."""
        if self._chunk is None:
            rows = self._lvs(f"{self.vg}/{self.pool}", "lv_name,chunk_size")
            size = int(float(rows[0].get("chunk_size") or 0)) if rows else 0
            if size <= 0 or size % MIN_CHUNK:
                raise BackendUnavailable(f"thin pool {self.vg}/{self.pool} reports no usable chunk size ({size})")
            self._chunk = size
        return self._chunk

    def thin_id(self, lv: str) -> int:
        """The thin device ID of `lv` in the pool (`lvs -o thin_id`), which the tools know it by."""
        rows = self._lvs(f"{self.vg}/{validate_name(lv)}", "lv_name,pool_lv,thin_id")
        if not rows or rows[0].get("pool_lv") != self.pool or not str(rows[0].get("thin_id", "")).isdigit():
            raise NotFound(f"logical volume {self.vg}/{lv} is not a thin volume of pool {self.vg}/{self.pool}")
        return int(rows[0]["thin_id"])

    # -- the pool's devices
    @property
    def metadata_device(self) -> str:
        return f"/dev/mapper/{dm_name(self.vg, self.pool + '_tmeta')}"

    def _pool_target(self) -> str:
        """The device-mapper name of the pool's thin-pool target, activating the pool when it is not active.

        Explicit activation keeps the pool up on its own: a pool activated only along with its thin volumes goes
        down with the last of them, which a node unstage may do while a tool is reading the pool's metadata."""
        status = self._status(dm_name(self.vg, self.pool) + "-tpool")
        if status is None:
            run(lvm_argv(["lvchange", "--activate", "y", f"{self.vg}/{self.pool}"]), timeout=self.timeout, env=LVM_ENV)
            status = self._status(dm_name(self.vg, self.pool) + "-tpool")
        if status is None:
            raise BackendUnavailable(f"thin pool {self.vg}/{self.pool} has no active thin-pool target after "
                                     "activation")
        return dm_name(self.vg, self.pool) + "-tpool"

    def _status(self, name: str) -> Optional[str]:
        proc = run(["dmsetup", "status", name], timeout=self.timeout, check=False)
        if proc.returncode != 0:
            return None
        line = proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else ""
        return line if " thin-pool " in f" {line} " else None

    def held_root(self) -> Optional[str]:
        """The metadata snapshot the pool holds now (its root block), or None; None too when the pool is inactive."""
        status = self._status(dm_name(self.vg, self.pool) + "-tpool")
        return held_metadata_root(status) if status else None

    def _message(self, target: str, message: str) -> None:
        run(["dmsetup", "message", target, "0", message], timeout=self.timeout)

    # -- the metadata snapshot
    @contextlib.contextmanager
    def _serialised(self) -> Iterator[None]:
        key = f"{self.vg}/{self.pool}"
        with _POOL_LOCKS_GUARD:
            lock = _POOL_LOCKS.setdefault(key, threading.Lock())
        if not lock.acquire(timeout=self.tool_timeout):
            raise Aborted(f"another reader of thin pool {key}'s metadata held it for {self.tool_timeout:.0f}s; retry")
        try:
            os.makedirs(self.work_dir, mode=0o700, exist_ok=True)
            fd = os.open(os.path.join(self.work_dir, f"{self.vg}-{self.pool}.metasnap.lock"),
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                deadline = time.monotonic() + self.tool_timeout
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except OSError as e:
                        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN) or time.monotonic() > deadline:
                            raise Aborted(f"another process reading thin pool {key}'s metadata held it for "
                                          f"{self.tool_timeout:.0f}s; retry") from None
                        time.sleep(0.1)
                yield
            finally:
                os.close(fd)  # drops the flock
        finally:
            lock.release()

    @contextlib.contextmanager
    def metadata_snapshot(self) -> Iterator[str]:
        """Hold a metadata snapshot of the pool for the tools (`--metadata-snap`); yields the metadata device.
        Released on every path out. One left held by a process that died is released and taken anew, once."""
        with self._serialised():
            target = self._pool_target()
            try:
                self._message(target, "reserve_metadata_snap")
            except CommandError:
                if self.held_root() is None:
                    raise
                # only Tessera readers take it, one at a time (the locks above): this one outlived its process
                self._message(target, "release_metadata_snap")
                self._message(target, "reserve_metadata_snap")
            try:
                yield self.metadata_device
            finally:
                self._message(target, "release_metadata_snap")

    def _tool_output(self, tool: str, options: list[str]) -> IO[bytes]:
        """Run a thin-provisioning tool on a metadata snapshot, its XML into an unlinked file (returned, rewound).
        `--metadata-snap` comes first: its block number is optional, so the word after it must be an option."""
        os.makedirs(self.work_dir, mode=0o700, exist_ok=True)
        out = tempfile.TemporaryFile(dir=self.work_dir, prefix="thin-")
        try:
            with self.metadata_snapshot() as device:
                run([tool, "--metadata-snap"] + options + [device], timeout=self.tool_timeout, stdout=out)
            out.seek(0)
            return out
        except BaseException:
            out.close()
            raise

    # -- the streams
    def allocated(self, lv: str, size: int, start: int) -> Iterator[Range]:
        """The chunks thin LV `lv` maps, as byte extents aligned to the chunk size and cut at `size`, from the chunk
        holding `start` on. A generator: nothing runs until the first range is asked for."""
        unit = self.chunk_size()
        dev_id = self.thin_id(lv)
        with contextlib.closing(self._tool_output("thin_dump", ["--format", "xml", "--dev-id", str(dev_id)])) as f:
            yield from from_offset(coalesce(mapped_ranges(f, dev_id), unit, size), start, unit)

    def changed(self, base_lv: str, target_lv: str, size: int, start: int) -> Iterator[Range]:
        """The chunks whose mapping differs between thin LVs `base_lv` and `target_lv`, as byte extents aligned to
        the chunk size and cut at `size` (the target's), from the chunk holding `start` on."""
        unit = self.chunk_size()
        base, target = self.thin_id(base_lv), self.thin_id(target_lv)
        with contextlib.closing(self._tool_output("thin_delta", ["--snap1", str(base), "--snap2", str(target)])) as f:
            yield from from_offset(coalesce(changed_block_ranges(f), unit, size), start, unit)
