"""Proof, from the kernel's own state, that a block device a node record names is still a given volume's.

A stage record outlives a reboot and devices outlive the plugin: after either, `/dev/rbd0` (or dm-3, sdb, nbd1)
may be gone or be another volume's. `Backend.node_attachment_valid` asks these functions before the node trusts a
record. Each starts from the device *number* the node sees now (st_rdev, never the name alone) and walks sysfs
(`/sys/dev/block/<major>:<minor>`) to what the kernel says backs it. Every function takes `sysfs_root` (and
`proc_root`) so its logic can be checked against planted trees; none raises for a missing or foreign device.

Answers: True (proven this volume's), False (proven not: gone, another image/LV/target, a snapshot), None (cannot
tell: sysfs unreadable in a way that proves nothing).
"""
from __future__ import annotations

import os
import re
import stat
from typing import Optional


def device_rdev(device: str) -> Optional[int]:
    """The device number of block device `device` (symlinks followed), or None when it is missing or no block
    device."""
    if not device:
        return None
    try:
        st = os.stat(device)
    except OSError:
        return None
    return st.st_rdev if stat.S_ISBLK(st.st_mode) else None


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _block_dir(rdev: int, sysfs_root: str) -> Optional[str]:
    """The sysfs directory of the block device with number `rdev` (the kernel's, whatever /dev calls it)."""
    link = os.path.join(sysfs_root, "dev", "block", f"{os.major(rdev)}:{os.minor(rdev)}")
    if not os.path.exists(link):
        return None
    return os.path.realpath(link)


# ---- krbd ------------------------------------------------------------------------------------------------------
def krbd_is(rdev: int, pool: str, image: str, sysfs_root: str = "/sys") -> bool:
    """The krbd device with number `rdev` maps the head of `pool`/`image`: its block device is rbdN,
    /sys/bus/rbd/devices/N has the same major/minor, names this pool (no namespace) and image, and no snapshot."""
    block = _block_dir(rdev, sysfs_root)
    m = re.fullmatch(r"rbd(\d+)", os.path.basename(block or ""))
    if not m:
        return False
    bus = os.path.join(sysfs_root, "bus", "rbd", "devices", m.group(1))
    major, minor = _read(os.path.join(bus, "major")), _read(os.path.join(bus, "minor"))
    if major != str(os.major(rdev)) or (minor is not None and minor != str(os.minor(rdev))):
        return False
    ns = _read(os.path.join(bus, "pool_ns"))
    return (_read(os.path.join(bus, "pool")) == pool and _read(os.path.join(bus, "name")) == image
            and _read(os.path.join(bus, "current_snap")) == "-" and ns in (None, ""))


# ---- rbd-nbd ---------------------------------------------------------------------------------------------------
def nbd_pid(rdev: int, sysfs_root: str = "/sys") -> Optional[int]:
    """The pid of the process serving nbd device `rdev` (the kernel's /sys/block/nbdN/pid), None when the device
    is no connected nbd device."""
    block = _block_dir(rdev, sysfs_root)
    if not block or not re.fullmatch(r"nbd\d+", os.path.basename(block)):
        return None
    raw = _read(os.path.join(block, "pid"))
    return int(raw) if raw and raw.isdigit() else None


def rbd_nbd_serves(pid: int, pool: str, image: str, proc_root: str = "/proc") -> Optional[bool]:
    """Whether process `pid` is an `rbd-nbd map` of the head of `pool`/`image` (from its command line). None when
    the process cannot be seen (another PID namespace): ask `rbd-nbd list-mapped` instead."""
    try:
        with open(os.path.join(proc_root, str(pid), "cmdline"), "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    if not argv or os.path.basename(argv[0]) != "rbd-nbd" or "map" not in argv[1:]:
        return False
    if any(a == "--snap" or a.startswith("--snap=") or a.startswith("--snap-id") for a in argv):
        return False
    return f"{pool}/{image}" in argv[1:]


def nbd_is(rdev: int, device: str, pool: str, image: str, list_mapped: "Optional[list[dict]]" = None, *,
           sysfs_root: str = "/sys", proc_root: str = "/proc") -> Optional[bool]:
    """The nbd device is connected and its serving process maps this image's head. `list_mapped` (what
    `rbd-nbd list-mapped --format json` printed, or None when it could not run) decides when the process is not
    visible here."""
    pid = nbd_pid(rdev, sysfs_root)
    if pid is None:
        return False
    serves = rbd_nbd_serves(pid, pool, image, proc_root)
    if serves is not None:
        return serves
    if list_mapped is None:
        return None
    real = os.path.realpath(device)
    return any(m.get("device") in (device, real) and m.get("pool") == pool
               and m.get("image", m.get("name")) == image and m.get("snap") in (None, "", "-")
               for m in list_mapped)


# ---- loop over a file (rbd-fuse) -------------------------------------------------------------------------------
def loop_backing_name(rdev: int, sysfs_root: str = "/sys") -> Optional[str]:
    """The backing file name the kernel reports for loop device `rdev` (None: no loop device, or free)."""
    block = _block_dir(rdev, sysfs_root)
    if not block or not re.fullmatch(r"loop\d+", os.path.basename(block)):
        return None
    return _read(os.path.join(block, "loop", "backing_file")) or None


def fuse_mounted(mountpoint: str, mountinfo: str = "/proc/self/mountinfo") -> bool:
    """Whether a FUSE filesystem is mounted at `mountpoint` (the top mount there)."""
    fstype = None
    try:
        with open(mountinfo) as f:
            for line in f:
                parts = line.split()
                if len(parts) > 4 and parts[4] == mountpoint and "-" in parts:
                    fstype = parts[parts.index("-") + 1]
    except OSError:
        return False
    return fstype is not None and (fstype == "fuse" or fstype.startswith("fuse."))


# ---- device-mapper (LVM) ---------------------------------------------------------------------------------------
def lvm_dm_name(vg: str, lv: str) -> str:
    """The device-mapper name LVM gives vg/lv: each '-' in either name doubled, the two joined by one '-'."""
    return f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"


def dm_is_lv(rdev: int, vg: str, lv: str, sysfs_root: str = "/sys") -> bool:
    """The device with number `rdev` is the device-mapper node of LVM's vg/lv (its dm name, and a UUID LVM made)."""
    block = _block_dir(rdev, sysfs_root)
    if not block:
        return False
    name = _read(os.path.join(block, "dm", "name"))
    uuid = _read(os.path.join(block, "dm", "uuid")) or ""
    return name == lvm_dm_name(vg, lv) and uuid.startswith("LVM-")


# ---- SCSI disks over iSCSI -------------------------------------------------------------------------------------
def _scsi_disk_is(block: str, iqn: str, lun: int, sysfs_root: str) -> bool:
    """`block` (a resolved sysfs block directory sdX) sits on an iSCSI session to `iqn`, at LUN `lun`."""
    parts = block.split(os.sep)
    if len(parts) < 3 or parts[-2] != "block":
        return False
    hctl = re.fullmatch(r"\d+:\d+:\d+:(\d+)", parts[-3])
    if not hctl or int(hctl.group(1)) != lun:
        return False
    sessions = [p for p in parts if re.fullmatch(r"session\d+", p)]
    if len(sessions) != 1:
        return False
    target = _read(os.path.join(sysfs_root, "class", "iscsi_session", sessions[0], "targetname"))
    return target == iqn


def scsi_is(rdev: int, iqn: str, lun: int, sysfs_root: str = "/sys") -> bool:
    """The disk with number `rdev` is LUN `lun` of iSCSI target `iqn`: a SCSI disk whose H:C:T:L ends in the LUN
    and whose session's targetname is the IQN; or a multipath device-mapper node all of whose paths (slaves,
    at least one) are."""
    block = _block_dir(rdev, sysfs_root)
    if not block:
        return False
    slaves_dir = os.path.join(block, "slaves")
    if os.path.isdir(os.path.join(block, "dm")):
        try:
            slaves = sorted(os.listdir(slaves_dir))
        except OSError:
            return False
        return bool(slaves) and all(
            _scsi_disk_is(os.path.realpath(os.path.join(slaves_dir, s)), iqn, lun, sysfs_root) for s in slaves)
    return _scsi_disk_is(block, iqn, lun, sysfs_root)
