#!/usr/bin/env python3
"""RBD backend cost: CreateVolume/DeleteVolume through `tessera-csi serve` (gRPC) against raw librbd
(`rbd.RBD().create/remove`) on the same throw-away cluster in the same run, printed as ratios.

    .venv/bin/python bench/bench_rbd.py [--iterations 100] [--concurrent 500] [--callers 32] [--cluster-dir DIR]

Part 1 (latency): one caller, gRPC and raw calls interleaved per iteration so that cluster drift hits both alike;
p50/p95 of each and the gRPC/raw ratios (goal: p50 ratio <= 1.25).
Part 2 (throughput): 500 CreateVolume from 32 concurrent gRPC callers versus 500 creates from 32 threads of raw
librbd; creates/s and the gRPC/raw ratio (goal >= 0.8). Deletes are timed the same way.
Raw calls use the same user, pool, image features and size as the driver. Figures only; nothing asserts on time.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import rbd  # noqa: E402
import yaml  # noqa: E402

from backends.rbd import FEATURE_NAMES, _feature_bits  # noqa: E402
from csi._pb import csi_pb2 as pb  # noqa: E402
from tests.ceph.cluster import Cluster, bootstrap, start  # noqa: E402
from tests.sanity.harness import Client, ServerProcess, mount_cap  # noqa: E402
from tests.ceph.fixtures import CephInfo  # noqa: E402
from tests.ceph.rbdutil import make_backend  # noqa: E402
from backends.base import CapabilitySpec, CreateVolumeSpec  # noqa: E402

SIZE = 1 << 30


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def create_req(name: str) -> pb.CreateVolumeRequest:
    return pb.CreateVolumeRequest(name=name, capacity_range=pb.CapacityRange(required_bytes=SIZE),
                                  volume_capabilities=[mount_cap("ext4")], parameters={"backend": "ceph"})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--concurrent", type=int, default=500)
    ap.add_argument("--callers", type=int, default=32)
    ap.add_argument("--cluster-dir", help="use (or start) the cluster in this directory instead of a fresh one")
    a = ap.parse_args()

    work = tempfile.mkdtemp(prefix="tessera-bench-rbd-", dir="/tmp")
    t0 = time.monotonic()
    c: Cluster = start(a.cluster_dir) if a.cluster_dir else bootstrap(os.path.join(work, "ceph"))
    print(f"ceph cluster ready in {time.monotonic() - t0:.1f}s ({c.dir})")
    cfg = os.path.join(work, "config.yaml")
    with open(cfg, "w") as f:
        yaml.safe_dump({"backends": {"ceph": {"type": "rbd", "monitors": [c.monitors], "user": c.csi_user,
                                               "keyringPath": c.csi_keyring, "pool": c.pool}}}, f)
    server = ServerProcess(os.path.join(work, "server"), config=cfg, node_id="bench-node").start()
    client = Client(server.endpoint)
    r = c.rados(user=c.csi_user)
    io = r.open_ioctx(c.pool)
    features = _feature_bits(FEATURE_NAMES)
    try:
        ctl = client.controller
        for i in range(5):  # warm up connections on both paths
            v = ctl.CreateVolume(create_req(f"warm-{i}"), timeout=60).volume
            ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v.volume_id), timeout=60)
            rbd.RBD().create(io, f"raw-warm-{i}", SIZE, features=features)
            rbd.RBD().remove(io, f"raw-warm-{i}")

        floor = []
        for _ in range(100):
            s = time.perf_counter()
            client.identity.Probe(pb.ProbeRequest(), timeout=60)
            floor.append(time.perf_counter() - s)
        g_create, g_delete, r_create, r_delete = [], [], [], []
        b_create, b_delete = [], []
        backend = make_backend(CephInfo.of(c), os.path.join(work, "inproc"), opTimeout=30, connectTimeout=10)
        caps = [CapabilitySpec("mount", "SINGLE_NODE_WRITER", "ext4")]
        for i in range(a.iterations):
            s = time.perf_counter()
            bv = backend.create_volume(CreateVolumeSpec(f"inproc-{i}", SIZE, 0, {}, {}, caps))
            b_create.append(time.perf_counter() - s)
            s = time.perf_counter()
            backend.delete_volume(bv.local_id, {})
            b_delete.append(time.perf_counter() - s)
            name = f"lat-{uuid.uuid4().hex[:12]}"
            s = time.perf_counter()
            v = ctl.CreateVolume(create_req(name), timeout=60).volume
            g_create.append(time.perf_counter() - s)
            s = time.perf_counter()
            ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v.volume_id), timeout=60)
            g_delete.append(time.perf_counter() - s)
            s = time.perf_counter()
            rbd.RBD().create(io, "raw-" + name, SIZE, features=features)
            r_create.append(time.perf_counter() - s)
            s = time.perf_counter()
            rbd.RBD().remove(io, "raw-" + name)
            r_delete.append(time.perf_counter() - s)

        print(f"\nlatency, {a.iterations} sequential create+delete of {SIZE >> 20} MiB images (ms):")
        print(f"{'':18}{'p50':>8}{'p95':>8}")
        for label, xs in (("gRPC CreateVolume", g_create), ("raw rbd create", r_create),
                          ("gRPC DeleteVolume", g_delete), ("raw rbd remove", r_delete),
                          ("backend create", b_create), ("backend delete", b_delete)):
            print(f"{label:18}{pct(xs, 50) * 1e3:8.2f}{pct(xs, 95) * 1e3:8.2f}")
        print("(backend = RbdBackend called in this process, no gRPC: the driver's own librbd work)")
        backend.close()
        print(f"{'gRPC Probe (floor)':18}{pct(floor, 50) * 1e3:8.2f}{pct(floor, 95) * 1e3:8.2f}")
        print(f"ratio create p50 {pct(g_create, 50) / pct(r_create, 50):.2f}  p95 "
              f"{pct(g_create, 95) / pct(r_create, 95):.2f}   (goal p50 <= 1.25)")
        print(f"ratio delete p50 {pct(g_delete, 50) / pct(r_delete, 50):.2f}  p95 "
              f"{pct(g_delete, 95) / pct(r_delete, 95):.2f}")

        n, k = a.concurrent, a.callers
        names = [f"tp-{uuid.uuid4().hex[:12]}" for _ in range(n)]
        with ThreadPoolExecutor(k) as ex:
            s = time.perf_counter()
            vols = list(ex.map(lambda nm: ctl.CreateVolume(create_req(nm), timeout=120).volume, names))
            g_ct = time.perf_counter() - s
            s = time.perf_counter()
            list(ex.map(lambda v: ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v.volume_id), timeout=120), vols))
            g_dt = time.perf_counter() - s
            s = time.perf_counter()
            list(ex.map(lambda nm: rbd.RBD().create(io, "raw-" + nm, SIZE, features=features), names))
            r_ct = time.perf_counter() - s
            s = time.perf_counter()
            list(ex.map(lambda nm: rbd.RBD().remove(io, "raw-" + nm), names))
            r_dt = time.perf_counter() - s
        print(f"\nthroughput, {n} volumes, {k} concurrent callers (volumes/s):")
        print(f"gRPC CreateVolume {n / g_ct:8.1f}   raw rbd create {n / r_ct:8.1f}   ratio {r_ct / g_ct:.2f} (goal >= 0.8)")
        print(f"gRPC DeleteVolume {n / g_dt:8.1f}   raw rbd remove {n / r_dt:8.1f}   ratio {r_dt / g_dt:.2f}")
        left = [x for x in rbd.RBD().list(io) if x.startswith(("tessera-vol-", "raw-"))]
        print(f"images left behind: {len(left)}")
    finally:
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
