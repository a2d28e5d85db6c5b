"""Loop devices: the block device for a volume that lives in a file (file backend, rbd-fuse images).

Direct I/O is asked for so the page cache does not hold a second copy of the data (and writes reach the backing
file in order); filesystems that cannot do O_DIRECT (tmpfs) fall back to buffered mode.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Optional

from backends.errors import NotFound
from backends.util import CommandError, run


def _list(columns: str = "NAME,BACK-FILE") -> list[dict]:
    out = run(["losetup", "--json", "--list", "--output", columns]).stdout
    if not out.strip():
        return []
    return json.loads(out).get("loopdevices", [])


def _new(path: str, direct_io: bool, read_only: bool) -> str:
    """A fresh loop device over `path` (a file or a block device)."""
    base = ["losetup", "--find", "--show"] + (["--read-only"] if read_only else [])
    if direct_io:
        try:
            return run(base + ["--direct-io=on", path]).stdout.strip()
        except CommandError:
            pass  # the backing filesystem cannot do O_DIRECT; buffered mode still works
    return run(base + [path]).stdout.strip()


def find(path: str) -> Optional[str]:
    """The loop device backed by `path`, if any (the oldest when several)."""
    real = os.path.realpath(path)
    for dev in _list():
        back = (dev.get("back-file") or "").removesuffix(" (deleted)")
        if back in (path, real):
            return dev["name"]
    return None


@dataclass(frozen=True)
class Backing:
    """What a loop device is attached to, as the kernel reports it."""
    path: str          # the backing file's name when it was attached; "" when the device is free
    inode: int
    dev: int           # st_dev of the filesystem holding the backing file
    read_only: bool
    deleted: bool      # the backing file was unlinked since (the name then means nothing)


def backing(device: str) -> Optional[Backing]:
    """The backing file of loop device `device`, or None when the device is free, gone or not a loop device."""
    try:
        out = run(["losetup", "--json", "--list", "--output", "NAME,BACK-FILE,BACK-INO,BACK-MAJ:MIN,RO", "--",
                   device]).stdout
    except CommandError:
        return None
    try:
        found = json.loads(out).get("loopdevices", []) if out.strip() else []
    except ValueError:
        return None
    for dev in found:
        back = dev.get("back-file")
        if not back:
            return None
        deleted = back.endswith(" (deleted)")
        try:
            major, minor = (int(x) for x in str(dev.get("back-maj:min") or "").strip().split(":"))
            inode = int(dev.get("back-ino") or 0)
        except ValueError:
            return None
        return Backing(back.removesuffix(" (deleted)"), inode, os.makedev(major, minor),
                       dev.get("ro") in (True, 1, "1"), deleted)
    return None


def backs(device: str, path: str) -> bool:
    """Whether loop device `device` is attached to the very file now at `path` (same inode on the same filesystem,
    not a deleted file that once had that name, nor another file at that name)."""
    b = backing(device)
    if b is None or b.deleted:
        return False
    try:
        st = os.stat(path)
    except OSError:
        return False
    return b.inode == st.st_ino and b.dev == st.st_dev


def attach(path: str, direct_io: bool = True, read_only: bool = False) -> str:
    """Attach `path` to a free loop device, or return the device it is already attached to (the very file: a loop
    device left over a deleted file of the same name is not reused)."""
    if not os.path.exists(path):
        raise NotFound(f"backing file {path} does not exist")
    for dev in _list():
        if dev.get("back-file") in (path, os.path.realpath(path)) and backs(dev["name"], path) and \
                getattr(backing(dev["name"]), "read_only", None) == read_only and \
                not _detaching(dev["name"]):  # a reader never gets a writable one; nobody gets a dying one
            return dev["name"]
    return _new(path, direct_io, read_only)


def _detaching(device: str) -> bool:
    """A device detached while something still held it open: the kernel frees it at the last close (autoclear);
    reusing it would hand out a device that vanishes under its next user."""
    try:
        with open(f"/sys/block/{os.path.basename(os.path.realpath(device))}/loop/autoclear") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def detach(device: str, settle: float = 5.0) -> None:
    """Detach; a device that is already free or gone is success.

    A device some process still holds open (udev's probe, a concurrent blkid) is only marked for detaching by the
    kernel, which frees it at the last close: wait up to `settle` seconds for that, so a caller that checks right
    after (DeleteVolume's "still attached", a test) sees the device free."""
    if not device or _detaching(device):
        return  # nothing there, or already being freed by the kernel
    try:
        run(["losetup", "--detach", device])
    except CommandError as e:
        if "No such device" in e.stderr or "No such file" in e.stderr or not os.path.exists(device):
            return
        raise
    marker = f"/sys/block/{os.path.basename(os.path.realpath(device))}/loop/backing_file"
    deadline = time.monotonic() + settle
    while os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.05)


def refresh(device: str) -> None:
    """Make the kernel re-read the backing file's size after it grew."""
    run(["losetup", "--set-capacity", device])


def read_only_views(device: str) -> list[str]:
    """Read-only loop devices stacked on `device` (made by `attach_read_only_view`), oldest first.

    Compared by the resolved path: the kernel records the device node it opened (`/dev/dm-0`), while a backend may
    name the volume's device by a link to it (LVM's `/dev/<vg>/<lv>`, iSCSI's `/dev/disk/by-path/...`)."""
    wanted = os.path.realpath(device)
    return [dev["name"] for dev in _list("NAME,BACK-FILE,RO")
            if dev.get("back-file") and os.path.realpath(dev["back-file"]) == wanted
            and dev.get("ro") in (True, 1, "1")]


def attach_read_only_view(device: str, exclude: frozenset[str] = frozenset()) -> str:
    """A read-only block device showing the same data as `device`.

    A read-only bind mount does not stop writes through a device node (the kernel checks the mount flag only for
    regular files), so a read-only raw block publish hands out this view instead. A view left behind by a crash
    between attach and mount is reused by the retry (any view not in `exclude`, the ones other targets hold)."""
    for view in read_only_views(device):
        if view not in exclude:
            return view
    return _new(device, direct_io=True, read_only=True)
