"""krbd reads none of librbd's QoS, so the node enforces an image's `rbd_qos_*` limits itself with the pod's cgroup
v2 io.max (backends/io_limits.py), inside the e2e guest: Ceph started in the guest, the image mapped with the
kernel client, a pod cgroup laid out as kubelet makes it. 4 KiB O_DIRECT writes from a process in that cgroup run at
the write limit ±20 %; a ControllerModifyVolume reaches the pod at the next NodeGetVolumeStats; unpublish lifts it.
Measured with dd and read back from the kernel's io.max, never asked of the plugin."""
from __future__ import annotations

import re

from csi._pb import csi_pb2 as pb
from tests.e2e.inguest import iolimits
from tests.e2e.inguest.safety.env import MIB, Pair
from tests.sanity.harness import block_cap


def test_krbd_write_limit_is_enforced_in_the_pods_cgroup(rbd: Pair) -> None:
    cap = block_cap()
    vol = rbd.create("krbd-io-limit", 64 * MIB, cap)
    rbd.a.ctl.ControllerModifyVolume(pb.ControllerModifyVolumeRequest(
        volume_id=vol.volume_id, mutable_parameters={"rbd_qos_write_iops_limit": "50"}), timeout=60)
    staging = rbd.stage(rbd.a, vol, cap, "iolimit")
    with iolimits.pod_cgroup() as (uid, cgroup):
        with_pod = pb.Volume()
        with_pod.CopyFrom(vol)
        with_pod.volume_context[iolimits.POD_UID] = uid
        target = rbd.publish(rbd.a, with_pod, cap, staging, "iolimit")
        line = iolimits.device_line(cgroup, target)
        assert re.search(r"\bwiops=50\b", line) and "riops=max" in line, line
        rate = iolimits.write_rate(cgroup, target, 150)
        assert 40 <= rate <= 60, f"{rate:.1f} writes/s with a limit of 50"

        rbd.a.ctl.ControllerModifyVolume(pb.ControllerModifyVolumeRequest(
            volume_id=vol.volume_id, mutable_parameters={"rbd_qos_write_iops_limit": "100"}), timeout=60)
        rbd.a.rpc.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id=vol.volume_id, volume_path=target),
                                     timeout=60)
        assert re.search(r"\bwiops=100\b", iolimits.device_line(cgroup, target))
        rate = iolimits.write_rate(cgroup, target, 300)
        assert 80 <= rate <= 120, f"{rate:.1f} writes/s with a limit of 100"

        rbd.unpublish(rbd.a, vol, target)
        with open(f"{cgroup}/io.max") as f:
            assert f.read().strip() == "", "the limit outlived the unpublish"
