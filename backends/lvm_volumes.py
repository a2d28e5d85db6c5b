"""LVM logical-volume management shared by the backends that keep data in LVs (lvm, and iscsi as backing store).

Why a separate module: the `lvm` backend exposes LVs to the local node, the `iscsi` backend exports LVs over LIO;
both need the same careful primitives — JSON reports parsed into typed records, names validated before they reach a
command line, request metadata stored as LV tags (the storage is the database), thin/thick creation, snapshots,
copies and growth. Nothing here knows about CSI; errors are `backends.errors` types.

LV tags may only use `A-Za-z0-9_+.-/=!:&#` and at most 1024 bytes each, so arbitrary strings (request names,
StorageClass parameters) are stored escaped: bytes outside `[A-Za-z0-9_.-]` become `+HH`. A field is one tag
`<namespace>.<key>=<escaped value>`; `tags_to_fields` reverses it.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

from .errors import (BackendUnavailable, CapacityExceeded, FailedPrecondition, InUse, Internal, InvalidArgument,
                     NotFound, TesseraError)
from .util import CommandError, run

# LVM's own name rules (lvm(8) "VALID NAMES"), plus a length cap that keeps /dev/mapper names short.
_NAME_RE = re.compile(r"^[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,119}$")
_RESERVED_NAMES = {".", "..", "snapshot", "pvmove"}
_RESERVED_SUBSTRINGS = ("_cdata", "_cmeta", "_corig", "_iorig", "_mimage", "_mlog", "_pmspare", "_rimage",
                        "_rmeta", "_tdata", "_tmeta", "_vdata", "_vorigin", "_wcorig")
_TAG_SAFE = re.compile(rb"[A-Za-z0-9_.-]")
_TAG_RE = re.compile(r"^[A-Za-z0-9_+.\-/=!:&#]{1,1024}$")
_KEY_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_TAG_BYTES = 1024

LVM_ENV = {"LVM_SUPPRESS_FD_WARNINGS": "1", "LC_ALL": "C"}
# LVM reads every block device when it scans, and a read of a suspended device waits until it is resumed: while a
# snapshot holds Tessera's device layers paused (backends/lvm_top.py), every LVM command Tessera runs skips them.
LVM_CONFIG = "devices { ignore_suspended_devices = 1 }"


def lvm_argv(argv: Sequence[str]) -> list[str]:
    """An LVM tool's command line with Tessera's configuration override (LVM_CONFIG) after the tool's name."""
    return [argv[0], "--config", LVM_CONFIG, *argv[1:]]


def validate_name(name: str, what: str = "LV") -> str:
    """Return `name` if LVM accepts it as a VG/LV name, else raise InvalidArgument (never let a bad name reach a
    command line, where a leading '-' would be read as an option)."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in _RESERVED_NAMES:
        raise InvalidArgument(f"{what} name {name!r} is not valid: 1-120 characters of A-Z a-z 0-9 + _ . -, "
                              "not starting with '-'")
    if name.startswith(("snapshot", "pvmove")) or any(s in name for s in _RESERVED_SUBSTRINGS):
        raise InvalidArgument(f"{what} name {name!r} uses a name LVM reserves for itself")
    return name


def escape_tag_value(value: str) -> str:
    """Escape any string into LVM's tag character set (reversible, see `unescape_tag_value`)."""
    out = []
    for b in value.encode("utf-8"):
        ch = bytes([b])
        out.append(ch.decode() if _TAG_SAFE.match(ch) else f"+{b:02X}")
    return "".join(out)


def unescape_tag_value(text: str) -> str:
    raw = bytearray()
    i = 0
    while i < len(text):
        c = text[i]
        if c == "+":
            h = text[i + 1:i + 3]
            if len(h) != 2 or not re.match(r"^[0-9A-Fa-f]{2}$", h):
                raise ValueError(f"bad escape in tag value {text!r}")
            raw.append(int(h, 16))
            i += 3
        else:
            raw.extend(c.encode())
            i += 1
    return raw.decode("utf-8")


def fields_to_tags(namespace: str, fields: Mapping[str, str]) -> list[str]:
    """`{key: value}` → `["<ns>.<key>=<escaped>", ...]`; raises InvalidArgument when a tag would exceed LVM's limit."""
    if not _KEY_RE.match(namespace):
        raise ValueError(f"bad tag namespace {namespace!r}")
    tags = []
    for key, value in sorted(fields.items()):
        tag = f"{namespace}.{escape_tag_value(key)}={escape_tag_value(value)}"
        if len(tag) > MAX_TAG_BYTES:
            raise InvalidArgument(f"value of {key!r} is too long to store as an LVM tag ({len(tag)} > {MAX_TAG_BYTES})")
        assert _TAG_RE.match(tag), tag
        tags.append(tag)
    return tags


def tags_to_fields(namespace: str, tags: Iterable[str]) -> dict[str, str]:
    """Inverse of `fields_to_tags`; tags of other namespaces and malformed ones are ignored."""
    prefix = namespace + "."
    out: dict[str, str] = {}
    for tag in tags:
        if not tag.startswith(prefix) or "=" not in tag:
            continue
        k, _, v = tag[len(prefix):].partition("=")
        try:
            out[unescape_tag_value(k)] = unescape_tag_value(v)
        except ValueError:
            continue
    return out


# ---- reports -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LvInfo:
    """One row of `lvs` (sizes in bytes)."""
    name: str
    vg: str
    size: int
    attr: str
    tags: tuple[str, ...] = ()
    pool: str = ""
    origin: str = ""
    segtype: str = ""
    data_percent: float = 0.0
    path: str = ""
    metadata_percent: float = 0.0  # thin pools only: how full the pool's metadata LV is

    @property
    def active(self) -> bool:
        return len(self.attr) > 4 and self.attr[4] == "a"

    @property
    def writable(self) -> bool:
        """The LV's permission allows writes (lv_attr's second letter 'w'; 'r'/'R' read-only)."""
        return len(self.attr) > 1 and self.attr[1] == "w"

    @property
    def open(self) -> bool:
        return len(self.attr) > 5 and self.attr[5] == "o"

    @property
    def is_thin_pool(self) -> bool:
        return self.attr[:1] == "t"

    @property
    def is_thin(self) -> bool:
        return self.attr[:1] == "V" or self.segtype == "thin"

    @property
    def activation_skip(self) -> bool:
        return len(self.attr) > 9 and self.attr[9] == "k"

    def fields(self, namespace: str) -> dict[str, str]:
        return tags_to_fields(namespace, self.tags)


@dataclass(frozen=True)
class VgInfo:
    name: str
    size: int
    free: int
    extent_size: int
    extent_count: int
    free_count: int


LVS_FIELDS = ("lv_name,vg_name,lv_size,lv_attr,lv_tags,pool_lv,origin,segtype,data_percent,lv_path,"
              "metadata_percent")
VGS_FIELDS = "vg_name,vg_size,vg_free,vg_extent_size,vg_extent_count,vg_free_count"


def _int(v: object) -> int:
    s = str(v or "0").strip().rstrip("B")
    return int(float(s)) if s else 0


def _float(v: object) -> float:
    s = str(v or "").strip()
    try:
        return float(s) if s else 0.0
    except ValueError:
        return 0.0


def _report_rows(text: str, section: str) -> list[dict[str, str]]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise Internal(f"cannot parse LVM JSON report: {e}") from None
    rows: list[dict[str, str]] = []
    for part in doc.get("report", []):
        rows.extend(part.get(section, []))
    return rows


def parse_lvs(text: str) -> list[LvInfo]:
    """Parse `lvs --reportformat json --units b --nosuffix -o LVS_FIELDS`."""
    out = []
    for r in _report_rows(text, "lv"):
        tags = tuple(t for t in (r.get("lv_tags") or "").split(",") if t)
        out.append(LvInfo(name=r["lv_name"], vg=r.get("vg_name", ""), size=_int(r.get("lv_size")),
                          attr=r.get("lv_attr", ""), tags=tags, pool=r.get("pool_lv", "") or "",
                          origin=r.get("origin", "") or "", segtype=r.get("segtype", "") or "",
                          data_percent=_float(r.get("data_percent")), path=r.get("lv_path", "") or "",
                          metadata_percent=_float(r.get("metadata_percent"))))
    return out


def parse_vgs(text: str) -> list[VgInfo]:
    """Parse `vgs --reportformat json --units b --nosuffix -o VGS_FIELDS`."""
    return [VgInfo(name=r["vg_name"], size=_int(r.get("vg_size")), free=_int(r.get("vg_free")),
                   extent_size=_int(r.get("vg_extent_size")), extent_count=_int(r.get("vg_extent_count")),
                   free_count=_int(r.get("vg_free_count")))
            for r in _report_rows(text, "vg")]


# ---- command errors → typed errors ------------------------------------------------------------------------------

def _classify(e: CommandError, what: str) -> Exception:
    msg = (e.stderr or e.stdout).strip()
    last = msg.splitlines()[-1] if msg else str(e)
    low = msg.lower()
    if "insufficient free space" in low or "insufficient suitable" in low or "not enough free" in low \
            or "free space in thin pool" in low:
        return CapacityExceeded(f"{what}: not enough space in the volume group: {last}")
    if "in use" in low or "is open" in low or "contains a filesystem in use" in low:
        return InUse(f"{what}: the logical volume is in use: {last}")
    if "volume group" in low and "not found" in low:
        return BackendUnavailable(f"{what}: {last}")
    if "failed to find logical volume" in low:
        return NotFound(f"{what}: {last}")
    if "already exists" in low:
        return FailedPrecondition(f"{what}: {last}")
    return Internal(f"{what}: {last}")


class LvmVolumes:
    """LV operations in one volume group, optionally against one thin pool.

    Every method takes and returns LV *names* inside the VG; names are validated here. `timeout` bounds each LVM
    command (a hung LVM command becomes DeadlineExceeded, not a stuck RPC).
    """

    def __init__(self, vg: str, thin_pool: Optional[str] = None, *, timeout: float = 120.0) -> None:
        self.vg = validate_name(vg, "VG")
        self.thin_pool = validate_name(thin_pool, "thin pool") if thin_pool else None
        self.timeout = timeout

    # -- plumbing
    def _run(self, argv: Sequence[str], what: str, timeout: Optional[float] = None) -> str:
        try:
            return run(lvm_argv(argv), timeout=timeout or self.timeout, env=LVM_ENV).stdout
        except CommandError as e:
            raise _classify(e, what) from None

    def lv_ref(self, name: str) -> str:
        return f"{self.vg}/{validate_name(name)}"

    def device_path(self, name: str) -> str:
        """The stable device node udev (and LVM without udev) creates for an active LV."""
        return f"/dev/{self.vg}/{validate_name(name)}"

    # -- reports
    def vg_info(self) -> VgInfo:
        out = self._run(["vgs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", VGS_FIELDS, self.vg],
                        f"volume group {self.vg}")
        vgs = parse_vgs(out)
        if not vgs:
            raise BackendUnavailable(f"volume group {self.vg!r} not found")
        return vgs[0]

    def list(self) -> list[LvInfo]:
        """Every LV in the VG (one `lvs` call; callers filter)."""
        out = self._run(["lvs", "-a", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", LVS_FIELDS,
                         self.vg], f"volume group {self.vg}")
        return [lv for lv in parse_lvs(out) if lv.vg == self.vg]

    def find(self, name: str) -> Optional[LvInfo]:
        validate_name(name)
        for lv in self.list():
            if lv.name == name:
                return lv
        return None

    def pool_info(self) -> LvInfo:
        if not self.thin_pool:
            raise FailedPrecondition("no thin pool configured")
        lv = self.find(self.thin_pool)
        if lv is None or not lv.is_thin_pool:
            raise BackendUnavailable(f"thin pool {self.vg}/{self.thin_pool} not found")
        return lv

    # -- changes
    def create(self, name: str, size: int, tags: Sequence[str] = (), *, thin: Optional[bool] = None) -> LvInfo:
        """Create an LV of `size` bytes (thin in the pool when `thin`, default: whether a pool is configured), with
        tags set atomically by the same lvcreate. Fresh LVs have their first blocks zeroed and signatures wiped, so
        a node never mistakes old data for a filesystem."""
        thin = bool(self.thin_pool) if thin is None else thin
        validate_name(name)
        argv = ["lvcreate", "--yes", "--name", name]
        if thin:
            if not self.thin_pool:
                raise FailedPrecondition("thin LV requested but no thin pool is configured")
            argv += ["--virtualsize", f"{size}b", "--thinpool", self.thin_pool]
        else:
            argv += ["--size", f"{size}b", "--wipesignatures", "y", "--zero", "y"]
        for t in tags:
            argv += ["--addtag", t]
        argv.append(self.vg)
        self._run(argv, f"create LV {self.vg}/{name}")
        return self._must(name)

    def snapshot(self, source: str, name: str, tags: Sequence[str] = (), *, activation_skip: bool = True,
                 cow_size: Optional[int] = None) -> LvInfo:
        """Snapshot `source` as `name`. Of a thin LV: a thin snapshot (shares blocks, independent lifetime; with
        activation_skip=False it activates like a normal LV, which clones want). Of a thick LV, `cow_size` bytes
        make a classic COW snapshot (tied to its origin; used only transiently for consistent copies)."""
        argv = ["lvcreate", "--yes", "--snapshot", "--name", validate_name(name),
                "--setactivationskip", "y" if activation_skip else "n"]
        if cow_size is not None:
            argv += ["--size", f"{cow_size}b"]
        for t in tags:
            argv += ["--addtag", t]
        argv.append(self.lv_ref(source))
        self._run(argv, f"snapshot {self.vg}/{source} as {name}")
        return self._must(name)

    def activate(self, name: str) -> str:
        """Activate (ignoring the activation-skip flag thin snapshots carry) and return the device path. An active LV
        is left alone (lvchange refuses some, e.g. COW snapshots, which follow their origin)."""
        lv = self.find(name)
        if lv is None:
            raise NotFound(f"logical volume {self.vg}/{name} does not exist")
        if lv.active:
            return self.device_path(name)
        self._run(["lvchange", "--activate", "y", "--ignoreactivationskip", self.lv_ref(name)],
                  f"activate {self.vg}/{name}")
        return self.device_path(name)

    def deactivate(self, name: str) -> None:
        self._run(["lvchange", "--activate", "n", self.lv_ref(name)], f"deactivate {self.vg}/{name}")

    def set_permission(self, name: str, writable: bool) -> None:
        """Make the LV read-only or read-write in its metadata (`lvchange --permission`); an active LV's table is
        reloaded, so a read-only LV refuses writes at the device whoever opens it, and keeps refusing after a
        resize (a `blockdev --setro` flag would be dropped by the next table reload)."""
        lv = self._must(name)
        if lv.writable != writable:
            self._run(["lvchange", "--permission", "rw" if writable else "r", self.lv_ref(name)],
                      f"make {self.vg}/{name} {'read-write' if writable else 'read-only'}")

    def wipe(self, name: str) -> None:
        """Zero the whole LV before its extents go back to the VG, so the next LV on them reads zeros.

        `blkdiscard --zeroout` asks the device to zero (WRITE ZEROES: a discard-capable SSD, a thin or loop device
        does a 10 GiB LV in well under a second, without writing data); where the device cannot, the kernel writes
        zero pages itself, which is correct but runs at disk speed. dd is the last resort for a util-linux without
        --zeroout. The timeout grows with the size (50 MiB/s at worst)."""
        lv = self._must(name)
        if not lv.writable:
            self.set_permission(name, True)
        path = self.activate(name)
        timeout = max(self.timeout, lv.size / (50 << 20))
        try:
            run(["blkdiscard", "--zeroout", path], timeout=timeout)
            return
        except CommandError:
            pass
        proc = run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", "oflag=direct", "conv=fsync,notrunc", "status=none"],
                   timeout=timeout, check=False)
        if proc.returncode != 0 and "No space left" not in proc.stderr:  # the end of the LV stops dd: expected
            raise Internal(f"zeroing {self.vg}/{name} before removal failed: {proc.stderr.strip()[-200:]}")

    def remove(self, name: str, *, wipe: bool = False) -> bool:
        """Remove; False when it did not exist. InUse when it is open. `wipe`: zero it first (thick LVs: their
        extents hold the bytes until another LV gets them; a crash in between leaves the LV, and the retried
        delete zeroes it again)."""
        lv = self.find(name)
        if lv is None:
            return False
        in_use = f"logical volume {self.vg}/{name} is open (mounted or attached); unmount it first"
        if lv.open and not self._closed_once_udev_is_done(name):
            raise InUse(in_use)
        if wipe:
            self.wipe(name)
            if not self._closed_once_udev_is_done(name):
                raise InUse(in_use)
        for attempt in range(3):
            try:
                self._run(["lvremove", "--yes", self.lv_ref(name)], f"remove {self.vg}/{name}")
                return True
            except InUse:  # udev's probe may open it between our look and lvremove's
                if attempt == 2 or not self._closed_once_udev_is_done(name):
                    raise
        return True

    @staticmethod
    def _settle_udev() -> None:
        try:
            run(["udevadm", "settle", "--timeout=10"], timeout=15, check=False)
        except TesseraError:  # no udevadm (no udev): nothing to wait for but the moment itself
            pass

    def _closed_once_udev_is_done(self, name: str, attempts: int = 5) -> bool:
        """Whether the LV is closed once udev is done with it. Closing a device after writing it (our wipe or
        copy, a node's unmount) makes udev's watch probe it (blkid opens it for a moment), so an open count right
        then is usually udev's own: let udev settle and look again, a bounded number of times, before calling the
        volume in use. A volume that is really mounted costs about a second here before its FAILED_PRECONDITION."""
        for attempt in range(attempts):
            self._settle_udev()
            if not self._must(name).open:
                return True
            time.sleep(0.1 * (attempt + 1))
        return False

    def remove_cow_snapshot(self, name: str) -> None:
        """Remove a transient classic (COW) snapshot without leaving its origin's old blocks in free extents: the
        COW area holds copies of the origin's chunks, so it is split off into a plain LV, zeroed, then removed.
        A snapshot that cannot be split (LVM too old) is removed as it is."""
        lv = self.find(name)
        if lv is None:
            return
        if lv.origin:
            try:
                self._run(["lvconvert", "--yes", "--splitsnapshot", self.lv_ref(name)], f"split {self.vg}/{name}")
            except TesseraError:
                self.remove(name)
                return
        self.remove(name, wipe=True)

    def resize(self, name: str, size: int) -> LvInfo:
        """Grow to at least `size` bytes (never shrinks); returns the LV after the change."""
        lv = self._must(name)
        if lv.size >= size:
            return lv
        self._run(["lvextend", "--size", f"{size}b", self.lv_ref(name)], f"extend {self.vg}/{name}")
        return self._must(name)

    def add_tags(self, name: str, tags: Sequence[str]) -> None:
        if tags:
            argv = ["lvchange"]
            for t in tags:
                argv += ["--addtag", t]
            self._run(argv + [self.lv_ref(name)], f"tag {self.vg}/{name}")

    def del_tags(self, name: str, tags: Sequence[str]) -> None:
        if tags:
            argv = ["lvchange"]
            for t in tags:
                argv += ["--deltag", t]
            self._run(argv + [self.lv_ref(name)], f"untag {self.vg}/{name}")

    def copy(self, source: str, dest: str, size: int, *, sparse: bool = False, timeout: float = 3600.0) -> None:
        """Copy the first `size` bytes of `source` onto `dest` (both activated here) with direct I/O. `sparse`
        skips writing zero blocks: only correct when `dest` reads as zeros already (a fresh thin LV)."""
        src = self.activate(source)
        dst = self.activate(dest)
        mib = 1 << 20
        argv = ["dd", f"if={src}", f"of={dst}", "bs=1M", f"count={(size + mib - 1) // mib}", "iflag=direct",
                "oflag=direct", "conv=fsync,notrunc" + (",sparse" if sparse else ""), "status=none"]
        try:
            run(argv, timeout=timeout)
        except CommandError as e:
            raise Internal(f"copying {self.vg}/{source} to {self.vg}/{dest} failed: {e}") from None

    def round_up(self, size: int, extent: Optional[int] = None) -> int:
        ext = extent or self.vg_info().extent_size or (4 << 20)
        return max(ext, (size + ext - 1) // ext * ext)

    def _must(self, name: str) -> LvInfo:
        lv = self.find(name)
        if lv is None:
            raise Internal(f"logical volume {self.vg}/{name} vanished right after it was changed")
        return lv

    def wait_for_device(self, name: str, timeout: float = 10.0) -> str:
        """udev creates /dev/<vg>/<lv> asynchronously; wait for it (FailedPrecondition when it never shows)."""
        import os
        path = self.device_path(name)
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise FailedPrecondition(f"{path} did not appear within {timeout:.0f}s after activation "
                                         "(is udev running?)")
            time.sleep(0.05)
        return path
