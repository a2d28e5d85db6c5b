"""Node-enforced I/O limits (`io_max_*` mutable parameters, cgroup v2 io.max) on LVM volumes, inside the e2e guest:
a real kernel with block throttling, the guest's own cgroup v2 hierarchy, a real `tessera-csi serve --mode all`.

A pod's cgroup is laid out as kubelet's systemd driver makes it (kubepods.slice/kubepods-besteffort.slice/
kubepods-besteffort-pod<uid>.slice, the io controller enabled down the path). The volume is created with a write
IOPS limit, staged and published as a raw block device with the pod's UID in the volume context (podInfoOnMount),
and written with O_DIRECT by a process in that cgroup: the rate is the limit ±20 %. ControllerModifyVolume raises
the limit; the next NodeGetVolumeStats (kubelet's periodic call) brings the pod's cgroup up to date, and the rate
follows. Unpublish lifts the limit. The limits are read from the kernel's io.max and measured with dd, never asked
of the plugin.
"""
from __future__ import annotations

import os
import re
import uuid
from typing import TYPE_CHECKING, Iterator

import pytest

from csi._pb import csi_pb2 as pb
from tests.e2e.inguest import iolimits
from tests.e2e.inguest.iolimits import POD_UID
from tests.sanity.harness import MIB, block_cap

if TYPE_CHECKING:
    from conftest import LvmEnv

@pytest.fixture
def pod_cgroup() -> Iterator[tuple[str, str]]:
    with iolimits.pod_cgroup() as pod:
        yield pod


def _stats(lvm: "LvmEnv", vid: str, target: str) -> pb.NodeGetVolumeStatsResponse:
    return lvm.client.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=target),
                                              timeout=60)


def _publish_for_pod(lvm: "LvmEnv", vol: pb.Volume, uid: str) -> str:
    staging = os.path.join(lvm.workdir, f"staging-{uuid.uuid4().hex[:8]}")
    pod = os.path.join(lvm.workdir, f"pod-{uuid.uuid4().hex[:8]}")
    os.makedirs(staging)
    os.makedirs(pod)
    lvm.ledger.stage(vol, staging, block_cap())
    with_pod = pb.Volume()
    with_pod.CopyFrom(vol)
    if uid:
        with_pod.volume_context[POD_UID] = uid
    target = os.path.join(pod, "target")
    lvm.ledger.publish(with_pod, staging, target, block_cap())
    return target


def test_write_iops_limit_is_enforced_and_follows_modify(lvm: "LvmEnv", pod_cgroup) -> None:
    uid, cgroup = pod_cgroup
    vol = lvm.ledger.create_volume(pb.CreateVolumeRequest(
        name=f"iolimit-{uuid.uuid4().hex[:8]}", capacity_range=pb.CapacityRange(required_bytes=64 * MIB),
        volume_capabilities=[block_cap()], mutable_parameters={"io_max_wiops": "50"}))
    target = _publish_for_pod(lvm, vol, uid)
    # the pod's device: Tessera's device-mapper layer over the LV (backends/lvm_top.py), the one its writes reach
    vg, lv = vol.volume_context["volumeGroup"], vol.volume_context["logicalVolume"]
    device = f"/dev/mapper/tessera-{vg.replace('-', '--')}-{lv.replace('-', '--')}"
    assert os.stat(device).st_rdev == os.stat(target).st_rdev
    assert re.search(r"\bwiops=50\b", iolimits.device_line(cgroup, device)), iolimits.device_line(cgroup, device)
    rate = iolimits.write_rate(cgroup, target, 150)
    assert 40 <= rate <= 60, f"{rate:.1f} writes/s with a limit of 50"

    lvm.client.controller.ControllerModifyVolume(pb.ControllerModifyVolumeRequest(
        volume_id=vol.volume_id, mutable_parameters={"io_max_wiops": "100"}), timeout=60)
    _stats(lvm, vol.volume_id, target)  # kubelet's periodic call brings the pod's cgroup up to date
    assert re.search(r"\bwiops=100\b", iolimits.device_line(cgroup, device)), iolimits.device_line(cgroup, device)
    rate = iolimits.write_rate(cgroup, target, 300)
    assert 80 <= rate <= 120, f"{rate:.1f} writes/s with a limit of 100"

    lvm.client.controller.ControllerModifyVolume(pb.ControllerModifyVolumeRequest(
        volume_id=vol.volume_id, mutable_parameters={"io_max_wiops": "0"}), timeout=60)
    _stats(lvm, vol.volume_id, target)
    assert "wiops=100" not in iolimits.device_line(cgroup, device), "the limit was not lifted (0 means none)"

    lvm.client.controller.ControllerModifyVolume(pb.ControllerModifyVolumeRequest(
        volume_id=vol.volume_id, mutable_parameters={"io_max_wiops": "70"}), timeout=60)
    _stats(lvm, vol.volume_id, target)
    assert "wiops=70" in iolimits.device_line(cgroup, device)
    lvm.ledger.unpublish(vol.volume_id, target)
    assert iolimits.device_line(cgroup, device) == "", "the limit outlived the unpublish"


def test_a_publish_without_a_pod_says_the_limit_is_not_enforced(lvm: "LvmEnv") -> None:
    vol = lvm.ledger.create_volume(pb.CreateVolumeRequest(
        name=f"iolimit-{uuid.uuid4().hex[:8]}", capacity_range=pb.CapacityRange(required_bytes=64 * MIB),
        volume_capabilities=[block_cap()], mutable_parameters={"io_max_riops": "10"}))
    target = _publish_for_pod(lvm, vol, "")
    cond = _stats(lvm, vol.volume_id, target).volume_condition
    assert not cond.abnormal and "not enforced" in cond.message and "podInfoOnMount" in cond.message, cond
