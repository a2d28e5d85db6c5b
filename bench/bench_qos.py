#!/usr/bin/env python3
"""RBD QoS through ControllerModifyVolume: the write rate a librbd client gets before and after a limit is set, on
one image that stays open across the change (as rbd-nbd and rbd-fuse keep theirs), against the throw-away cluster.

    .venv/bin/python bench/bench_qos.py [--limit 50] [--seconds 5] [--cluster-dir DIR]

Prints IOPS of 4 KiB synchronous writes: unlimited, then with `rbd_qos_iops_limit` set by ControllerModifyVolume
(the open image picks it up from the header notification), then with the limit set back to 0. Figures only; the
throttle's accuracy is librbd's (a token bucket), and nothing here asserts on time.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import rbd  # noqa: E402
import yaml  # noqa: E402

from csi._pb import csi_pb2 as pb  # noqa: E402
from tests.ceph.cluster import Cluster, bootstrap, start  # noqa: E402
from tests.sanity.harness import Client, ServerProcess, mount_cap  # noqa: E402

BLOCK = 4096


def write_rate(img, seconds: float) -> float:
    """4 KiB writes at rotating offsets for `seconds`; operations per second."""
    data = os.urandom(BLOCK)
    span = img.size() // BLOCK
    n, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < seconds:
        img.write(data, (n * 7919 % span) * BLOCK)
        n += 1
    return n / (time.monotonic() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=50, help="rbd_qos_iops_limit to set")
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each measurement")
    ap.add_argument("--cluster-dir", help="use (or start) the cluster in this directory instead of a fresh one")
    a = ap.parse_args()

    work = tempfile.mkdtemp(prefix="tessera-bench-qos-", dir="/tmp")
    c: Cluster = start(a.cluster_dir) if a.cluster_dir else bootstrap(os.path.join(work, "ceph"))
    cfg = os.path.join(work, "config.yaml")
    with open(cfg, "w") as f:
        yaml.safe_dump({"backends": {"ceph": {"type": "rbd", "monitors": [c.monitors], "user": c.csi_user,
                                               "keyringPath": c.csi_keyring, "pool": c.pool}}}, f)
    server = ServerProcess(os.path.join(work, "server"), config=cfg, node_id="bench-node").start()
    client = Client(server.endpoint)
    r = c.rados(user=c.csi_user)
    io = r.open_ioctx(c.pool)
    vid = ""
    try:
        ctl = client.controller
        vol = ctl.CreateVolume(pb.CreateVolumeRequest(
            name="bench-qos", capacity_range=pb.CapacityRange(required_bytes=256 << 20),
            volume_capabilities=[mount_cap("ext4")], parameters={"backend": "ceph"}), timeout=60).volume
        vid = vol.volume_id

        def modify(value: int) -> None:
            ctl.ControllerModifyVolume(pb.ControllerModifyVolumeRequest(
                volume_id=vid, mutable_parameters={"rbd_qos_iops_limit": str(value)}), timeout=60)

        with rbd.Image(io, vol.volume_context["image"]) as img:
            before = write_rate(img, a.seconds)
            modify(a.limit)
            time.sleep(1)  # the header notification reaches the open image
            limited = write_rate(img, a.seconds)
            modify(0)
            time.sleep(1)
            after = write_rate(img, a.seconds)
        print(f"4 KiB sync writes, {a.seconds:.0f}s each, one open librbd image:")
        print(f"  no limit                  {before:9.1f} IOPS")
        print(f"  rbd_qos_iops_limit={a.limit:<6} {limited:9.1f} IOPS  ({limited / a.limit:.2f} x the limit)")
        print(f"  limit back to 0           {after:9.1f} IOPS")
    finally:
        if vid:
            client.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid), timeout=60)
        io.close()
        r.shutdown()
        client.close()
        server.stop()
        if not a.cluster_dir:
            c.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
