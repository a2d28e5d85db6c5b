"""The device-mapper layer Tessera owns above each staged LVM volume: `tessera-<vg>-<lv>`, one linear target over the
whole LV.

Why a layer of our own: a write-order consistent group snapshot needs every member paused from the first snapshot
to the last. LVM cannot do that itself: it cuts a thin snapshot by suspending the origin LV, and it skips the thin
pool's `create_snap` message for an origin someone else holds suspended (the pool is left behind LVM's metadata),
while a filesystem frozen with FIFREEZE makes LVM's own suspend fail with EBUSY. With the filesystem mounted on this
layer instead of on the LV, suspending the layer (which freezes and flushes the filesystem on it, `lockfs`) pauses
the volume's writers, and LVM still finds its origin LV running: each snapshot is LVM's ordinary one, taken while
every member is held at the same instant. Tried in the e2e guest (Debian's 6.1, lvm2 2.03.16): two members written
in turn, both layers suspended, two `lvcreate --snapshot`, resumed: the snapshots show the same write, the pool's
transaction id follows LVM's, both filesystems check clean.

LVM reads every block device when it scans, and a read of a suspended device waits until it is resumed; every LVM
command Tessera runs therefore passes `devices/ignore_suspended_devices=1` (backends/lvm_volumes.py).

What the node may touch: only a device-mapper device whose name *and* UUID are the ones derived here from the VG and
LV, and whose one underlying device is that LV (sysfs `slaves`). Anything else of the same name is refused, never
removed or reloaded.
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

from .errors import Aborted, FailedPrecondition, InUse
from .node_proof import dm_is_lv, lvm_dm_name
from .util import CommandError, read_json, run, write_json_atomic

UUID_PREFIX = "TESSERA-LVM-"
DM_ENV = {"LC_ALL": "C"}
# One pause at a time in this process: two snapshots sharing a member must not suspend (and the first resume)
# a layer the other still needs paused. A pause lasts as long as a few `lvcreate --snapshot`.
_PAUSE_LOCK = threading.Lock()


def top_name(vg: str, lv: str) -> str:
    return "tessera-" + lvm_dm_name(vg, lv)


def top_uuid(vg: str, lv: str) -> str:
    return UUID_PREFIX + lvm_dm_name(vg, lv)


def top_path(vg: str, lv: str) -> str:
    return "/dev/mapper/" + top_name(vg, lv)


@dataclass(frozen=True)
class DmDevice:
    block_dir: str  # /sys/devices/virtual/block/dm-N
    rdev: int
    uuid: str
    suspended: bool
    read_only: bool
    sectors: int
    slaves: tuple[int, ...]  # device numbers underneath


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _devno(block_dir: str) -> Optional[int]:
    raw = _read(os.path.join(block_dir, "dev"))
    major, _, minor = raw.partition(":")
    return os.makedev(int(major), int(minor)) if major.isdigit() and minor.isdigit() else None


def _device_at(block: str) -> Optional[DmDevice]:
    rdev = _devno(block)
    if rdev is None or not os.path.isdir(os.path.join(block, "dm")):
        return None
    slaves = []
    with contextlib.suppress(OSError):
        for s in sorted(os.listdir(os.path.join(block, "slaves"))):
            n = _devno(os.path.realpath(os.path.join(block, "slaves", s)))
            if n is not None:
                slaves.append(n)
    size = _read(os.path.join(block, "size"))
    return DmDevice(block, rdev, _read(os.path.join(block, "dm", "uuid")),
                    _read(os.path.join(block, "dm", "suspended")) == "1", _read(os.path.join(block, "ro")) == "1",
                    int(size) if size.isdigit() else 0, tuple(slaves))


def find(name: str, sysfs_root: str = "/sys") -> Optional[DmDevice]:
    """The device-mapper device called `name`, from sysfs (no command, nothing opened), or None."""
    base = os.path.join(sysfs_root, "block")
    try:
        entries = sorted(e for e in os.listdir(base) if e.startswith("dm-"))
    except OSError:
        return None
    for entry in entries:
        block = os.path.realpath(os.path.join(base, entry))
        if _read(os.path.join(block, "dm", "name")) == name:
            return _device_at(block)
    return None


def is_layer_of(rdev: int, vg: str, lv: str, sysfs_root: str = "/sys") -> bool:
    """The device with number `rdev` (a stage record's, as the kernel numbers it now) is vg/lv's layer: its dm name
    and UUID are the ones derived from vg/lv and its one underlying device is LVM's vg/lv."""
    link = os.path.join(sysfs_root, "dev", "block", f"{os.major(rdev)}:{os.minor(rdev)}")
    if not os.path.exists(link):
        return False
    block = os.path.realpath(link)
    dev = _device_at(block)
    return (dev is not None and _read(os.path.join(block, "dm", "name")) == top_name(vg, lv)
            and owned(dev, vg, lv, sysfs_root))


def _lv_devno(vg: str, lv: str) -> tuple[int, int]:
    """(device number, size in 512-byte sectors) of the active LV vg/lv, from its dm node in sysfs."""
    dev = find(lvm_dm_name(vg, lv))
    if dev is None or not dev.uuid.startswith("LVM-"):
        raise FailedPrecondition(f"LV {vg}/{lv} is not active on this node")
    return dev.rdev, dev.sectors


def owned(dev: DmDevice, vg: str, lv: str, sysfs_root: str = "/sys") -> bool:
    """`dev` is this LV's layer: our UUID, and exactly one device underneath, which is LVM's vg/lv."""
    return (dev.uuid == top_uuid(vg, lv) and len(dev.slaves) == 1
            and dm_is_lv(dev.slaves[0], vg, lv, sysfs_root))


def _mine(vg: str, lv: str) -> Optional[DmDevice]:
    dev = find(top_name(vg, lv))
    if dev is not None and not owned(dev, vg, lv):
        raise FailedPrecondition(f"a device-mapper device named {top_name(vg, lv)} exists on this node but is not "
                                 f"Tessera's layer over LV {vg}/{lv} (UUID {dev.uuid!r}); it is left alone: remove "
                                 "or rename it by hand")
    return dev


def _table(rdev: int, sectors: int) -> str:
    return f"0 {sectors} linear {os.major(rdev)}:{os.minor(rdev)} 0"


def _dmsetup(args: Sequence[str], what: str) -> None:
    try:
        run(["dmsetup", *args], timeout=60, env=DM_ENV)
    except CommandError as e:
        if "busy" in (e.stderr or "").lower():
            raise InUse(f"{what}: device busy ({e.stderr.strip()})") from None
        raise


def ensure(vg: str, lv: str, read_only: bool) -> str:
    """The layer over the active LV vg/lv, made when missing; its path. Idempotent: an existing layer of ours with
    the LV's size and the asked read-only flag is kept; one of another size is reloaded; one with the other flag is
    made again when nothing has it open (else FAILED_PRECONDITION: the volume is in use the other way)."""
    name = top_name(vg, lv)
    lv_rdev, sectors = _lv_devno(vg, lv)
    dev = _mine(vg, lv)
    if dev is not None and dev.read_only != read_only:
        try:
            _dmsetup(["remove", name], f"layer {name}")
        except InUse:
            raise FailedPrecondition(f"LV {vg}/{lv} is attached {'read-only' if dev.read_only else 'read-write'} "
                                     f"through {name}, which is in use; unstage it before attaching it the other "
                                     "way") from None
        dev = None
    if dev is None:
        args = ["create", name, "--uuid", top_uuid(vg, lv), "--table", _table(lv_rdev, sectors)]
        if read_only:
            args.insert(2, "--readonly")
        _dmsetup(args, f"layer {name}")
    elif dev.sectors != sectors:
        refresh(vg, lv)
    path = top_path(vg, lv)
    if not os.path.exists(path):
        _dmsetup(["mknodes", name], f"layer {name}")  # no udev on this host or in this container
    return path


def refresh(vg: str, lv: str) -> None:
    """After the LV grew: load a table of its new size into the layer (a suspend of an instant) so the filesystem
    on it can grow. No layer (a volume staged straight on its LV by an older version): nothing to do."""
    dev = _mine(vg, lv)
    if dev is None:
        return
    lv_rdev, sectors = _lv_devno(vg, lv)
    if dev.sectors == sectors:
        return
    name = top_name(vg, lv)
    _dmsetup(["reload", name, "--table", _table(lv_rdev, sectors)], f"layer {name}")
    _dmsetup(["resume", name], f"layer {name}")


def remove(vg: str, lv: str) -> None:
    """Remove the layer (nothing to do when there is none); InUse while something has it open."""
    dev = _mine(vg, lv)
    if dev is None:
        return
    name = top_name(vg, lv)
    if dev.suspended:
        _dmsetup(["resume", name], f"layer {name}")  # a suspended device cannot be removed; never leave it paused
    _dmsetup(["remove", name], f"layer {name}")


def present(vg: str, lv: str) -> bool:
    return _mine(vg, lv) is not None


# ---- pausing (group snapshots) ---------------------------------------------------------------------------------
def resume_leftovers(marker: str) -> None:
    """Resume the layers a snapshot killed while they were suspended left paused (its marker names them), so that
    no application stays blocked and the retry starts from running volumes. Only our own layers are touched."""
    try:
        m = read_json(marker)
    except FileNotFoundError:
        return
    for vg, lv in m.get("suspended", []):
        with contextlib.suppress(FailedPrecondition):
            dev = _mine(vg, lv)
            if dev is not None and dev.suspended:
                _dmsetup(["resume", top_name(vg, lv)], f"layer {top_name(vg, lv)}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(marker)


@contextlib.contextmanager
def paused(members: Sequence[tuple[str, str]], marker: str) -> Iterator[None]:
    """Every member's layer suspended (its filesystem frozen and flushed, new I/O held) for the block, resumed
    after it whatever happens. The layers are named in `marker` before the first is suspended, so a crash while
    they are paused is repaired by the next call (`resume_leftovers`). A member without a layer is not paused."""
    with _PAUSE_LOCK:
        with _paused(members, marker):
            yield


@contextlib.contextmanager
def _paused(members: Sequence[tuple[str, str]], marker: str) -> Iterator[None]:
    resume_leftovers(marker)
    layers = [(vg, lv) for vg, lv in members if _mine(vg, lv) is not None]
    if layers:
        write_json_atomic(marker, {"suspended": layers})
    done: list[tuple[str, str]] = []
    try:
        for vg, lv in layers:
            dev = _mine(vg, lv)
            if dev is not None and dev.suspended:
                raise Aborted(f"LV {vg}/{lv}'s layer {top_name(vg, lv)} is suspended by someone else (another "
                              "process, or by hand); retry when it is resumed")
            _dmsetup(["suspend", top_name(vg, lv)], f"layer {top_name(vg, lv)}")
            done.append((vg, lv))
        yield
    finally:
        problem: Optional[Exception] = None
        for vg, lv in reversed(done):
            try:
                _dmsetup(["resume", top_name(vg, lv)], f"layer {top_name(vg, lv)}")
            except Exception as e:  # noqa: BLE001 - resume the others first, then report
                problem = problem or e
        if problem is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(marker)
    if problem is not None:
        raise problem
