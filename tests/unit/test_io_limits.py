"""backends/io_limits.py: the io.max line the node writes, and how it finds a pod's cgroup in kubelet's two layouts.
The kernel side (the limit holding, measured) is tests/e2e/inguest/lvm/test_lvm_io_limits.py; here the directory
tree stands for /sys/fs/cgroup only to check the search and what is written where."""
from __future__ import annotations

import os

import pytest

from backends import io_limits
from backends.io_limits import NotApplied

UID = "0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b"


def test_line_names_every_key_and_lifts_with_max():
    rdev = os.makedev(253, 7)
    assert io_limits.io_max_line(rdev, {"wiops": 50}) == "253:7 riops=max wiops=50 rbps=max wbps=max"
    assert io_limits.io_max_line(rdev, {}) == "253:7 riops=max wiops=max rbps=max wbps=max"


def test_limits_of_drops_zero_and_foreign_keys():
    assert io_limits.limits_of({"io_max_wiops": "50", "io_max_rbps": "0", "rbd_qos_iops_limit": "9"}) == {"wiops": 50}


@pytest.mark.parametrize("layout", [
    ["kubepods.slice", "kubepods-burstable.slice", f"kubepods-burstable-pod{UID.replace('-', '_')}.slice"],
    ["kubepods.slice", f"kubepods-pod{UID.replace('-', '_')}.slice"],
    ["kubepods", "besteffort", f"pod{UID}"],
], ids=["systemd-burstable", "systemd-guaranteed", "cgroupfs"])
def test_pod_cgroup_in_kubelets_layouts(tmp_path, layout):
    (tmp_path / "cgroup.controllers").write_text("io\n")
    (tmp_path / "kubepods.slice" / "other-pod-dir").mkdir(parents=True)
    d = tmp_path.joinpath(*layout)
    d.mkdir(parents=True, exist_ok=True)
    assert io_limits.pod_cgroup(UID, str(tmp_path)) == str(d)


def test_pod_cgroup_refuses_what_is_not_a_pod(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("io\n")
    (tmp_path / "system.slice" / f"pod{UID}").mkdir(parents=True)  # not under kubepods: never taken
    with pytest.raises(NotApplied, match="no cgroup for pod"):
        io_limits.pod_cgroup(UID, str(tmp_path))
    for bad in ("../../etc", "*", UID + "/..", ""):
        with pytest.raises(NotApplied, match="not a UID"):
            io_limits.pod_cgroup(bad, str(tmp_path))
    with pytest.raises(NotApplied, match="no cgroup v2"):
        io_limits.pod_cgroup(UID, str(tmp_path / "nothing"))


def test_write_needs_the_io_controller(tmp_path):
    with pytest.raises(NotApplied, match="io controller"):
        io_limits.write(str(tmp_path), os.makedev(7, 3), {"riops": 5})
    (tmp_path / "io.max").write_text("")
    io_limits.write(str(tmp_path), os.makedev(7, 3), {"riops": 5})
    assert (tmp_path / "io.max").read_text() == "7:3 riops=5 wiops=max rbps=max wbps=max"


def test_rbd_qos_for_krbd_per_direction():
    assert io_limits.from_rbd_qos({"rbd_qos_iops_limit": "100", "rbd_qos_write_iops_limit": "40",
                                   "rbd_qos_bps_limit": "0", "rbd_qos_read_bps_limit": "1048576",
                                   "rbd_qos_iops_burst": "500"}) == \
        {"io_max_riops": "100", "io_max_wiops": "40", "io_max_rbps": "1048576"}
    assert io_limits.from_rbd_qos({"rbd_qos_iops_limit": "0"}) == {}
