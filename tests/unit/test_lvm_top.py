"""backends/lvm_top.py's proof that a device is Tessera's layer over one LV, against a planted sysfs tree laid out as
the kernel lays it out (a fake of sysfs; the real kernel's answers are checked in the guest:
tests/e2e/inguest/lvm/test_lvm_group.py and tests/e2e/inguest/safety/test_reattach_after_reboot.py). Each case
plants the right layer beside wrong ones, so a check that answered True for any device fails here."""
from __future__ import annotations

import os

from backends import lvm_top

DM_MAJOR = 253


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text + "\n")


def _dm(root: str, minor: int, name: str, uuid: str, slaves: tuple[int, ...] = ()) -> int:
    """/sys/devices/virtual/block/dm-N with its dm/ attributes and slaves, linked from /sys/block and
    /sys/dev/block as the kernel links them."""
    full = os.path.join(root, "devices", "virtual", "block", f"dm-{minor}")
    _write(os.path.join(full, "dev"), f"{DM_MAJOR}:{minor}")
    _write(os.path.join(full, "dm", "name"), name)
    _write(os.path.join(full, "dm", "uuid"), uuid)
    _write(os.path.join(full, "dm", "suspended"), "0")
    _write(os.path.join(full, "ro"), "0")
    _write(os.path.join(full, "size"), "131072")
    os.makedirs(os.path.join(full, "slaves"), exist_ok=True)
    for s in slaves:
        os.symlink(os.path.join("..", "..", f"dm-{s}"), os.path.join(full, "slaves", f"dm-{s}"))
    for where, link in ((os.path.join(root, "block"), f"dm-{minor}"),
                        (os.path.join(root, "dev", "block"), f"{DM_MAJOR}:{minor}")):
        os.makedirs(where, exist_ok=True)
        os.symlink(os.path.relpath(full, where), os.path.join(where, link))
    return os.makedev(DM_MAJOR, minor)


def test_names_double_hyphens_like_lvm() -> None:
    assert lvm_top.top_name("my-vg", "tv-1") == "tessera-my--vg-tv--1"
    assert lvm_top.top_uuid("my-vg", "tv-1") == "TESSERA-LVM-my--vg-tv--1"
    assert lvm_top.top_path("vg", "a") == "/dev/mapper/tessera-vg-a"


def test_layer_is_this_lvs_only(tmp_path) -> None:
    root = str(tmp_path)
    lv_a = _dm(root, 0, "vg0-tv--a", "LVM-aaa")
    lv_b = _dm(root, 1, "vg0-tv--b", "LVM-bbb")
    good = _dm(root, 2, "tessera-vg0-tv--a", "TESSERA-LVM-vg0-tv--a", (0,))
    over_b = _dm(root, 3, "tessera-vg0-tv--b", "TESSERA-LVM-vg0-tv--b", (1,))
    foreign = _dm(root, 4, "tessera-vg0-tv--c", "CRYPT-LUKS2-x", (0,))
    two = _dm(root, 5, "tessera-vg0-tv--d", "TESSERA-LVM-vg0-tv--d", (0, 1))
    assert lvm_top.is_layer_of(good, "vg0", "tv-a", root) is True
    assert lvm_top.is_layer_of(over_b, "vg0", "tv-a", root) is False, "the layer of another LV"
    assert lvm_top.is_layer_of(lv_a, "vg0", "tv-a", root) is False, "the LV itself is not the layer"
    assert lvm_top.is_layer_of(lv_b, "vg0", "tv-b", root) is False
    assert lvm_top.is_layer_of(os.makedev(DM_MAJOR, 9), "vg0", "tv-a", root) is False, "no such device"
    c = lvm_top.find("tessera-vg0-tv--c", root)
    assert c is not None and c.rdev == foreign and not lvm_top.owned(c, "vg0", "tv-c", root), "foreign UUID"
    d = lvm_top.find("tessera-vg0-tv--d", root)
    assert d is not None and d.rdev == two and not lvm_top.owned(d, "vg0", "tv-d", root), "two devices under it"
    a = lvm_top.find("tessera-vg0-tv--a", root)
    assert a is not None and a.slaves == (lv_a,) and a.sectors == 131072 and not a.suspended
    assert lvm_top.find("tessera-vg0-tv--zz", root) is None
