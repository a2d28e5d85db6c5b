#!/usr/bin/env python3
"""Cost of the CSI layer over the file backend: each operation through `tessera-csi serve` (gRPC on a unix socket)
next to the same work done directly, in the same run, printed as gRPC/direct ratios of median and p95.

    .venv/bin/python bench/bench_core.py [--iterations 40] [--cold-iterations 10] [--size-mib 64]

  create+delete     CreateVolume+DeleteVolume  vs  FileBackend.create_volume+delete_volume called in-process
                    (same options, same directory filesystem)
  node cycle (warm) NodeStage+NodePublish+NodeUnpublish+NodeUnstage of an already formatted volume  vs  bare
                    `losetup --find --show --direct-io=on`, `blkid`, `mount`, `mount --bind`, `umount` x2, `losetup -d`
  node cycle (cold) the same on a blank volume, so the plugin formats it (mkfs.ext4)  vs  the bare commands plus
                    `mkfs.ext4`
gRPC and direct runs alternate per iteration so drift of the machine hits both alike. Needs root (loop devices,
mounts). Figures only: nothing here asserts on time.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from backends.base import CapabilitySpec, CreateVolumeSpec, Runtime  # noqa: E402
from backends.file import FileBackend, FileOptions  # noqa: E402
from backends.util import run  # noqa: E402
from csi import constants  # noqa: E402
from csi._pb import csi_pb2 as pb  # noqa: E402
from tests.sanity.harness import MIB, Client, ServerProcess, mount_cap  # noqa: E402


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * p
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def report(label: str, grpc_t: list[float], direct_t: list[float]) -> dict:
    g50, g95 = statistics.median(grpc_t), pct(grpc_t, 0.95)
    d50, d95 = statistics.median(direct_t), pct(direct_t, 0.95)
    row = {"label": label, "n": len(grpc_t), "grpc_p50_ms": g50 * 1e3, "grpc_p95_ms": g95 * 1e3,
           "direct_p50_ms": d50 * 1e3, "direct_p95_ms": d95 * 1e3, "ratio_p50": g50 / d50, "ratio_p95": g95 / d95}
    print(f"{label:<22} n={row['n']:<4} gRPC p50 {row['grpc_p50_ms']:8.2f} ms  p95 {row['grpc_p95_ms']:8.2f} ms | "
          f"direct p50 {row['direct_p50_ms']:8.2f} ms  p95 {row['direct_p95_ms']:8.2f} ms | "
          f"ratio p50 {row['ratio_p50']:5.2f}  p95 {row['ratio_p95']:5.2f}", flush=True)
    return row


# ---- create + delete ---------------------------------------------------------------------------------------------
def bench_create_delete(client: Client, work: str, n: int, size: int) -> dict:
    runtime = Runtime(constants.DRIVER_NAME, "bench-node", os.path.join(work, "direct-state"),
                      constants.TOPOLOGY_NODE_KEY)
    backend = FileBackend("direct", FileOptions(directory=os.path.join(work, "direct-file")), runtime)
    cap = CapabilitySpec("mount", "SINGLE_NODE_WRITER", "ext4")
    grpc_t, direct_t = [], []
    for i in range(n):
        name = f"bench-{uuid.uuid4().hex[:10]}"

        def via_grpc():
            vol = client.controller.CreateVolume(pb.CreateVolumeRequest(
                name=name, volume_capabilities=[mount_cap("ext4")], capacity_range=pb.CapacityRange(
                    required_bytes=size)), timeout=60).volume
            client.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id), timeout=60)

        def direct():
            vol = backend.create_volume(CreateVolumeSpec(name=name, size_bytes=size, limit_bytes=0, parameters={},
                                                         secrets={}, capabilities=[cap]))
            backend.delete_volume(vol.local_id, {})

        if i % 2:
            direct_t.append(timed(direct))
            grpc_t.append(timed(via_grpc))
        else:
            grpc_t.append(timed(via_grpc))
            direct_t.append(timed(direct))
    return report("create+delete", grpc_t, direct_t)


# ---- node cycle ----------------------------------------------------------------------------------------------------
def grpc_node_cycle(client: Client, vol: pb.Volume, staging: str, target: str) -> None:
    cap = mount_cap("ext4")
    client.node.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id=vol.volume_id, staging_target_path=staging,
                                                          volume_capability=cap, volume_context=vol.volume_context),
                                timeout=120)
    client.node.NodePublishVolume(pb.NodePublishVolumeRequest(volume_id=vol.volume_id, staging_target_path=staging,
                                                              target_path=target, volume_capability=cap,
                                                              volume_context=vol.volume_context), timeout=120)
    client.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=target),
                                    timeout=120)
    client.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vol.volume_id, staging_target_path=staging),
                                  timeout=120)


def bare_node_cycle(image: str, staging: str, target: str, format_it: bool) -> None:
    """What the plugin does, as bare commands: attach, look for a filesystem (format if blank), mount, bind, undo."""
    dev = run(["losetup", "--find", "--show", "--direct-io=on", image]).stdout.strip()
    try:
        probe = run(["blkid", "-p", "-o", "value", "-s", "TYPE", dev], check=False)
        if format_it or not probe.stdout.strip():
            run(["mkfs.ext4", "-q", "-F", dev], timeout=300)
        run(["mount", "-t", "ext4", dev, staging])
        os.makedirs(target, exist_ok=True)
        run(["mount", "--bind", staging, target])
        run(["umount", target])
        os.rmdir(target)
        run(["umount", staging])
    finally:
        run(["losetup", "-d", dev])


def bench_node(client: Client, work: str, n: int, size: int, cold: bool) -> dict:
    label = "node cycle (cold/mkfs)" if cold else "node cycle (warm)"
    grpc_t, direct_t = [], []
    base = os.path.join(work, "mnt")
    os.makedirs(base, exist_ok=True)
    warm_vol = None
    warm_img = os.path.join(work, "bare-warm.img")
    if not cold:
        warm_vol = client.controller.CreateVolume(pb.CreateVolumeRequest(
            name=f"bench-warm-{uuid.uuid4().hex[:8]}", volume_capabilities=[mount_cap("ext4")],
            capacity_range=pb.CapacityRange(required_bytes=size)), timeout=60).volume
        with open(warm_img, "wb") as f:
            f.truncate(size)
        s = tempfile.mkdtemp(dir=base)
        grpc_node_cycle(client, warm_vol, s, os.path.join(tempfile.mkdtemp(dir=base), "t"))  # formats once
        bare_node_cycle(warm_img, s, os.path.join(tempfile.mkdtemp(dir=base), "t"), True)
    for i in range(n):
        staging = tempfile.mkdtemp(dir=base)
        target = os.path.join(tempfile.mkdtemp(dir=base), "target")
        if cold:
            vol = client.controller.CreateVolume(pb.CreateVolumeRequest(
                name=f"bench-cold-{uuid.uuid4().hex[:8]}", volume_capabilities=[mount_cap("ext4")],
                capacity_range=pb.CapacityRange(required_bytes=size)), timeout=60).volume
            img = os.path.join(work, f"bare-cold-{i}.img")
            with open(img, "wb") as f:
                f.truncate(size)
        else:
            vol, img = warm_vol, warm_img

        def g():
            grpc_node_cycle(client, vol, staging, target)

        def d():
            bare_node_cycle(img, staging, target, cold)

        if i % 2:
            direct_t.append(timed(d))
            grpc_t.append(timed(g))
        else:
            grpc_t.append(timed(g))
            direct_t.append(timed(d))
        if cold:
            client.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id), timeout=60)
            os.unlink(img)
    if warm_vol is not None:
        client.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=warm_vol.volume_id), timeout=60)
        os.unlink(warm_img)
    return report(label, grpc_t, direct_t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--cold-iterations", type=int, default=10)
    ap.add_argument("--size-mib", type=int, default=64)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_core: needs root (loop devices and mounts)", file=sys.stderr)
        return 2
    size = args.size_mib * MIB
    with tempfile.TemporaryDirectory(prefix="tessera-bench-") as work:
        server = ServerProcess(os.path.join(work, "srv"), node_id="bench-node").start()
        try:
            client = Client(server.endpoint, timeout=300)
            print(f"bench_core: file backend under {server.state_dir}, volumes {args.size_mib} MiB, "
                  f"gRPC over {server.endpoint}", flush=True)
            bench_create_delete(client, work, args.iterations, size)
            bench_node(client, work, args.iterations, size, cold=False)
            bench_node(client, work, args.cold_iterations, size, cold=True)
            client.close()
        finally:
            rc = server.stop()
            if rc != 0:
                print(f"server exited with {rc}:\n{server.log_tail()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
