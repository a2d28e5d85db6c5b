"""Read-only views are found over a device named by a link to it (LVM's /dev/<vg>/<lv> is a link to /dev/dm-N,
iSCSI's /dev/disk/by-path/... to /dev/sdX): the kernel records the node it opened, the node record holds the link.
Real loop devices: a volume's device (a loop over a file), a link to it, and a read-only view over it."""
from __future__ import annotations

import os
import shutil

import pytest

from csi import loopdev


@pytest.fixture
def device(tmp_path):
    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.fail("MISSING: root and losetup are required for the loop device tests")
    img = tmp_path / "vol.img"
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    dev = loopdev.attach(str(img), direct_io=False)
    yield dev
    for view in loopdev.read_only_views(dev):
        loopdev.detach(view)
    loopdev.detach(dev)


def test_views_found_through_a_link_to_the_device(device, tmp_path):
    link = tmp_path / "by-name"
    os.symlink(device, link)
    view = loopdev.attach_read_only_view(str(link))
    try:
        assert loopdev.read_only_views(str(link)) == [view]
        assert loopdev.read_only_views(device) == [view]
    finally:
        loopdev.detach(view)
    assert loopdev.read_only_views(str(link)) == []
