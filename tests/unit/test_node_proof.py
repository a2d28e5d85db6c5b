"""backends/node_proof.py against planted sysfs/proc trees laid out as the kernel lays them out (a fake of sysfs:
the real kernel's answers are checked in the guest, tests/e2e/inguest/safety/test_reattach_after_reboot.py).
Each case plants the device a record names *and* a foreign one, so a check that answered True for any device
fails here."""
from __future__ import annotations

import os

import pytest

from backends import node_proof as np_

RBD_MAJOR = 251
NBD_MAJOR = 43
DM_MAJOR = 253
SD_MAJOR = 8


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text + "\n")


def _block(root: str, devpath: str, major: int, minor: int) -> str:
    """/sys/<devpath> as a block device directory and /sys/dev/block/M:m -> it (relative, as the kernel has it)."""
    full = os.path.join(root, devpath)
    os.makedirs(full, exist_ok=True)
    _write(os.path.join(full, "dev"), f"{major}:{minor}")
    link_dir = os.path.join(root, "dev", "block")
    os.makedirs(link_dir, exist_ok=True)
    os.symlink(os.path.relpath(full, link_dir), os.path.join(link_dir, f"{major}:{minor}"))
    return full


def _krbd(root: str, n: int, pool: str, image: str, snap: str = "-", minor: int = -1) -> int:
    minor = n << 4 if minor < 0 else minor
    _block(root, f"devices/virtual/block/rbd{n}", RBD_MAJOR, n << 4)
    bus = os.path.join(root, "bus", "rbd", "devices", str(n))
    for k, v in {"pool": pool, "name": image, "current_snap": snap, "major": str(RBD_MAJOR), "minor": str(minor),
                 "pool_ns": ""}.items():
        _write(os.path.join(bus, k), v)
    return os.makedev(RBD_MAJOR, n << 4)


def test_device_rdev_only_for_block_devices(tmp_path) -> None:
    regular = tmp_path / "f"
    regular.write_text("x")
    assert np_.device_rdev(str(regular)) is None
    assert np_.device_rdev("/dev/null") is None  # a character device
    assert np_.device_rdev(str(tmp_path / "missing")) is None
    assert np_.device_rdev("") is None


def test_krbd_names_this_image_only(tmp_path) -> None:
    root = str(tmp_path)
    a = _krbd(root, 0, "rbd", "csi-vol-a")
    b = _krbd(root, 1, "rbd", "csi-vol-b")
    snap = _krbd(root, 2, "rbd", "csi-vol-a", snap="s1")
    other_pool = _krbd(root, 3, "other", "csi-vol-a")
    assert np_.krbd_is(a, "rbd", "csi-vol-a", root) is True
    assert np_.krbd_is(b, "rbd", "csi-vol-a", root) is False
    assert np_.krbd_is(snap, "rbd", "csi-vol-a", root) is False, "a snapshot mapping is not the volume"
    assert np_.krbd_is(other_pool, "rbd", "csi-vol-a", root) is False
    assert np_.krbd_is(os.makedev(RBD_MAJOR, 9 << 4), "rbd", "csi-vol-a", root) is False, "an unmapped id"


def test_krbd_bus_entry_of_another_device_number_is_refused(tmp_path) -> None:
    """rbdN's bus entry must carry the device number itself: a stale or mismatched entry proves nothing."""
    root = str(tmp_path)
    rdev = _krbd(root, 0, "rbd", "csi-vol-a", minor=16)
    assert np_.krbd_is(rdev, "rbd", "csi-vol-a", root) is False


def test_krbd_partition_and_namespace_are_not_the_volume(tmp_path) -> None:
    root = str(tmp_path)
    _krbd(root, 0, "rbd", "csi-vol-a")
    _block(root, "devices/virtual/block/rbd0/rbd0p1", RBD_MAJOR, 1)
    assert np_.krbd_is(os.makedev(RBD_MAJOR, 1), "rbd", "csi-vol-a", root) is False
    ns = _krbd(root, 1, "rbd", "csi-vol-a")
    _write(os.path.join(root, "bus", "rbd", "devices", "1", "pool_ns"), "tenant")
    assert np_.krbd_is(ns, "rbd", "csi-vol-a", root) is False


def _nbd(root: str, proc: str, n: int, pid: int, argv: list[str]) -> int:
    full = _block(root, f"devices/virtual/block/nbd{n}", NBD_MAJOR, n << 5)
    if pid:
        _write(os.path.join(full, "pid"), str(pid))
    if argv:
        os.makedirs(os.path.join(proc, str(pid)), exist_ok=True)
        with open(os.path.join(proc, str(pid), "cmdline"), "wb") as f:
            f.write(b"\0".join(a.encode() for a in argv) + b"\0")
    return os.makedev(NBD_MAJOR, n << 5)


def test_nbd_served_by_an_rbd_nbd_map_of_this_image(tmp_path) -> None:
    root, proc = str(tmp_path / "sys"), str(tmp_path / "proc")
    mine = _nbd(root, proc, 0, 100, ["/usr/bin/rbd-nbd", "map", "rbd/csi-vol-a", "--log-file", "/x", "--id", "u"])
    other = _nbd(root, proc, 1, 101, ["rbd-nbd", "map", "rbd/csi-vol-b"])
    snap = _nbd(root, proc, 2, 102, ["rbd-nbd", "map", "rbd/csi-vol-a", "--snap", "s1"])
    qemu = _nbd(root, proc, 3, 103, ["qemu-nbd", "--connect", "rbd/csi-vol-a"])
    free = _nbd(root, proc, 4, 0, [])
    kw = {"sysfs_root": root, "proc_root": proc}
    assert np_.nbd_is(mine, "/dev/nbd0", "rbd", "csi-vol-a", **kw) is True
    assert np_.nbd_is(other, "/dev/nbd1", "rbd", "csi-vol-a", **kw) is False
    assert np_.nbd_is(snap, "/dev/nbd2", "rbd", "csi-vol-a", **kw) is False
    assert np_.nbd_is(qemu, "/dev/nbd3", "rbd", "csi-vol-a", **kw) is False
    assert np_.nbd_is(free, "/dev/nbd4", "rbd", "csi-vol-a", **kw) is False, "a disconnected nbd device"


def test_nbd_process_out_of_sight_falls_back_to_list_mapped(tmp_path) -> None:
    root, proc = str(tmp_path / "sys"), str(tmp_path / "proc")
    rdev = _nbd(root, proc, 0, 4242, [])  # connected, but its pid is not visible in this /proc
    kw = {"sysfs_root": root, "proc_root": proc}
    assert np_.nbd_is(rdev, "/dev/nbd0", "rbd", "csi-vol-a", None, **kw) is None
    listed = [{"pid": 4242, "pool": "rbd", "namespace": "", "image": "csi-vol-a", "snap": "-", "device": "/dev/nbd0"}]
    assert np_.nbd_is(rdev, "/dev/nbd0", "rbd", "csi-vol-a", listed, **kw) is True
    assert np_.nbd_is(rdev, "/dev/nbd0", "rbd", "csi-vol-b", listed, **kw) is False
    assert np_.nbd_is(rdev, "/dev/nbd0", "rbd", "csi-vol-a", [], **kw) is False


def test_loop_backing_name(tmp_path) -> None:
    root = str(tmp_path)
    full = _block(root, "devices/virtual/block/loop3", 7, 3)
    _write(os.path.join(full, "loop", "backing_file"), "/var/lib/x/fuse/rbd.img/img")
    _block(root, "devices/virtual/block/loop4", 7, 4)  # free: no loop/backing_file
    assert np_.loop_backing_name(os.makedev(7, 3), root) == "/var/lib/x/fuse/rbd.img/img"
    assert np_.loop_backing_name(os.makedev(7, 4), root) is None
    assert np_.loop_backing_name(os.makedev(7, 5), root) is None


def test_fuse_mounted_reads_the_top_mount(tmp_path) -> None:
    mi = tmp_path / "mountinfo"
    mi.write_text("36 1 0:32 / /m/a rw,relatime shared:1 - fuse.rbd-fuse rbd-fuse rw\n"
                  "37 1 0:33 / /m/b rw,relatime shared:2 - fuse rbd-fuse rw\n"
                  "38 37 0:34 / /m/b rw,relatime shared:3 - tmpfs tmpfs rw\n")
    assert np_.fuse_mounted("/m/a", str(mi)) is True
    assert np_.fuse_mounted("/m/b", str(mi)) is False, "a tmpfs on top hides the FUSE mount"
    assert np_.fuse_mounted("/m/c", str(mi)) is False


@pytest.mark.parametrize("vg,lv,dm", [("vg0", "pvc-1", "vg0-pvc--1"), ("my-vg", "a", "my--vg-a"),
                                      ("v", "a--b", "v-a----b")])
def test_lvm_dm_name_doubles_hyphens(vg: str, lv: str, dm: str) -> None:
    assert np_.lvm_dm_name(vg, lv) == dm


def test_dm_is_this_lv_only(tmp_path) -> None:
    root = str(tmp_path)
    for minor, name, uuid in ((0, "vg0-pvc--a", "LVM-abc"), (1, "vg0-pvc--b", "LVM-def"),
                              (2, "vg0-pvc--a", "CRYPT-LUKS2-x"), (3, "vg0--x-pvc--a", "LVM-ghi")):
        full = _block(root, f"devices/virtual/block/dm-{minor}", DM_MAJOR, minor)
        _write(os.path.join(full, "dm", "name"), name)
        _write(os.path.join(full, "dm", "uuid"), uuid)
    assert np_.dm_is_lv(os.makedev(DM_MAJOR, 0), "vg0", "pvc-a", root) is True
    assert np_.dm_is_lv(os.makedev(DM_MAJOR, 1), "vg0", "pvc-a", root) is False
    assert np_.dm_is_lv(os.makedev(DM_MAJOR, 2), "vg0", "pvc-a", root) is False, "not a device LVM made"
    assert np_.dm_is_lv(os.makedev(DM_MAJOR, 3), "vg0", "pvc-a", root) is False, "VG vg0-x, not vg0"
    assert np_.dm_is_lv(os.makedev(DM_MAJOR, 7), "vg0", "pvc-a", root) is False


IQN_A = "iqn.2024-01.io.tessera:vol-a"
IQN_B = "iqn.2024-01.io.tessera:vol-b"


def _sd(root: str, letter: str, minor: int, host: int, session: int, lun: int, iqn: str) -> int:
    _block(root, f"devices/platform/host{host}/session{session}/target{host}:0:0/{host}:0:0:{lun}/block/sd{letter}",
           SD_MAJOR, minor)
    _write(os.path.join(root, "class", "iscsi_session", f"session{session}", "targetname"), iqn)
    return os.makedev(SD_MAJOR, minor)


def test_scsi_disk_is_this_target_and_lun(tmp_path) -> None:
    root = str(tmp_path)
    a = _sd(root, "a", 0, 2, 1, 0, IQN_A)
    b = _sd(root, "b", 16, 3, 2, 0, IQN_B)
    a_lun1 = _sd(root, "c", 32, 2, 1, 1, IQN_A)
    local = os.makedev(SD_MAJOR, 48)
    _block(root, "devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sdd", SD_MAJOR, 48)
    assert np_.scsi_is(a, IQN_A, 0, root) is True
    assert np_.scsi_is(b, IQN_A, 0, root) is False
    assert np_.scsi_is(a_lun1, IQN_A, 0, root) is False
    assert np_.scsi_is(a_lun1, IQN_A, 1, root) is True
    assert np_.scsi_is(local, IQN_A, 0, root) is False, "a local disk is no session's"
    assert np_.scsi_is(os.makedev(SD_MAJOR, 64), IQN_A, 0, root) is False


def test_scsi_multipath_every_path_must_be_the_volume(tmp_path) -> None:
    root = str(tmp_path)
    _sd(root, "a", 0, 2, 1, 0, IQN_A)
    _sd(root, "b", 16, 3, 2, 0, IQN_A)
    _sd(root, "c", 32, 4, 3, 0, IQN_B)

    def mpath(minor: int, slaves: list[str]) -> int:
        full = _block(root, f"devices/virtual/block/dm-{minor}", DM_MAJOR, minor)
        _write(os.path.join(full, "dm", "name"), f"mpath{minor}")
        os.makedirs(os.path.join(full, "slaves"))
        for s in slaves:
            target = os.path.realpath(os.path.join(root, "dev", "block", s))
            os.symlink(os.path.relpath(target, os.path.join(full, "slaves")), os.path.join(full, "slaves",
                                                                                          os.path.basename(target)))
        return os.makedev(DM_MAJOR, minor)

    good = mpath(0, ["8:0", "8:16"])
    mixed = mpath(1, ["8:0", "8:32"])
    empty = mpath(2, [])
    assert np_.scsi_is(good, IQN_A, 0, root) is True
    assert np_.scsi_is(mixed, IQN_A, 0, root) is False
    assert np_.scsi_is(empty, IQN_A, 0, root) is False
