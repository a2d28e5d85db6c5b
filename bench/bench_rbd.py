#!/usr/bin/env python3
"""RBD backend cost: CreateVolume/DeleteVolume through `tessera-csi serve` (gRPC) against raw librbd
(`rbd.RBD().create/remove`) on the same throw-away cluster in the same run, printed as ratios.

    .venv/bin/python bench/bench_rbd.py [--iterations 100] [--concurrent 500] [--callers 32] [--cluster-dir DIR]

Part 1 (latency): one caller, gRPC and raw calls interleaved per iteration so that cluster drift hits both alike;
p50/p95 of each and the gRPC/raw ratios (goal: p50 ratio <= 1.25).
Part 1 runs gRPC, raw, in-process backend and floor-server calls in blocks of 10, the order rotated per block (see
below). The floor server (bench/floor_server.py) is a bare grpcio server whose CreateVolume is one RBD().create:
what any Python gRPC controller pays, so "Tessera / floor" is what Tessera itself adds. That difference is then
split: the lease lock (timed alone through the driver's lock code), the commit (backend - raw), and the rest.
Part 2 (throughput): 500 CreateVolume from 32 concurrent gRPC callers versus 500 creates from 32 threads of raw
librbd and 500 through the floor server, in rotating rounds (default 5), median round of each; creates/s and the
gRPC/raw ratio (goal >= 0.8), and the CPU each path's process spends per create (on this 2-core machine the
cluster shares the CPUs, so CPU per create bounds the rate) with its threads' voluntary context switches. Deletes
are timed the same way. The controller's RSS is read right after each of its batches (the highest printed) and
while idle afterwards.
Part 3 (cluster work): OSD operations per create and per delete on each path (the OSDs' `osd.op` perf counter
before and after 20 sequential calls, nothing else running), the round trips the driver adds to librbd's own.
Raw calls use the same user, pool, image features and size as the driver. Figures only; nothing asserts on time.
"""
from __future__ import annotations

import argparse
import subprocess
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import rbd  # noqa: E402
import yaml  # noqa: E402

from backends.rbd import FEATURE_NAMES, _feature_bits  # noqa: E402
from bench.measure import context_switches, cpu_seconds, load, rss_mib  # noqa: E402
from csi._pb import csi_pb2 as pb  # noqa: E402
from csi._pb import csi_pb2_grpc as rpc  # noqa: E402
from tests.ceph.cluster import Cluster, bootstrap, start  # noqa: E402
from tests.sanity.harness import Client, ServerProcess, mount_cap  # noqa: E402
from tests.ceph.fixtures import CephInfo  # noqa: E402
from tests.ceph.rbdutil import make_backend  # noqa: E402
from backends.base import CapabilitySpec, CreateVolumeSpec  # noqa: E402
from backends.locking import Operation  # noqa: E402
from backends.rbd_locks import OBJECT_PREFIX, LeaseLocks, LockKey  # noqa: E402

SIZE = 1 << 30
BLOCK = 10
COUNTED = 20  # calls per path in the OSD-operations part


def osd_ops(r) -> int:
    """Operations the cluster's OSDs have served so far (sum of `osd.op` over every OSD)."""
    total = 0
    for osd in json.loads(r.mon_command(json.dumps({"prefix": "osd ls", "format": "json"}), b"")[1]):
        ret, out, err = r.osd_command(osd, json.dumps({"prefix": "perf dump"}), b"")
        if ret != 0:
            raise RuntimeError(f"perf dump of osd.{osd}: {err}")
        total += json.loads(out)["osd"]["op"]
    return total


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def create_req(name: str) -> pb.CreateVolumeRequest:
    return pb.CreateVolumeRequest(name=name, capacity_range=pb.CapacityRange(required_bytes=SIZE),
                                  volume_capabilities=[mount_cap("ext4")], parameters={"backend": "ceph"})


def start_floor(work: str, c: Cluster, features: int) -> tuple[subprocess.Popen, "rpc.ControllerStub"]:
    sock = os.path.join(work, "floor.sock")
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "bench", "floor_server.py"), sock, c.conf, c.csi_user,
                             c.csi_keyring, c.pool, str(features)])
    channel = grpc.insecure_channel("unix://" + sock)
    grpc.channel_ready_future(channel).result(timeout=60)
    return proc, rpc.ControllerStub(channel)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--concurrent", type=int, default=500)
    ap.add_argument("--callers", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5, help="alternating throughput rounds per path")
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
    assert server.proc is not None
    at_start = rss_mib(server.proc.pid)  # before any RBD call: no librbd loaded yet
    r = c.rados(user=c.csi_user)
    io = r.open_ioctx(c.pool)
    features = _feature_bits(FEATURE_NAMES)
    floor_proc, floor_ctl = start_floor(work, c, features)
    try:
        ctl = client.controller
        for i in range(5):  # warm up connections on both paths
            v = ctl.CreateVolume(create_req(f"warm-{i}"), timeout=60).volume
            ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=v.volume_id), timeout=60)
            rbd.RBD().create(io, f"raw-warm-{i}", SIZE, features=features)
            rbd.RBD().remove(io, f"raw-warm-{i}")
            floor_ctl.DeleteVolume(pb.DeleteVolumeRequest(
                volume_id=floor_ctl.CreateVolume(create_req(f"warm-{i}"), timeout=60).volume.volume_id), timeout=60)

        rss = {"at start": at_start, "idle, after warm-up": rss_mib(server.proc.pid)}
        floor = []
        for _ in range(100):
            s = time.perf_counter()
            client.identity.Probe(pb.ProbeRequest(), timeout=60)
            floor.append(time.perf_counter() - s)
        backend = make_backend(CephInfo.of(c), os.path.join(work, "inproc"), opTimeout=30, connectTimeout=10)
        caps = [CapabilitySpec("mount", "SINGLE_NODE_WRITER", "ext4")]

        # One create+delete pair per path, as callables: the three paths do the same librbd work at the same size.
        def grpc_create(nm: str):
            return ctl.CreateVolume(create_req(nm), timeout=120).volume.volume_id

        def grpc_delete(vid: str) -> None:
            ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid), timeout=120)

        def raw_create(nm: str) -> str:
            rbd.RBD().create(io, "raw-" + nm, SIZE, features=features)
            return "raw-" + nm

        def raw_delete(image: str) -> None:
            rbd.RBD().remove(io, image)

        def backend_create(nm: str) -> str:
            return backend.create_volume(CreateVolumeSpec("inproc-" + nm, SIZE, 0, {}, {}, caps)).local_id

        def backend_delete(local_id: str) -> None:
            backend.delete_volume(local_id, {})

        def floor_create(nm: str) -> str:
            return floor_ctl.CreateVolume(create_req(nm), timeout=120).volume.volume_id

        def floor_delete(vid: str) -> None:
            floor_ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid), timeout=120)

        paths = {"gRPC": (grpc_create, grpc_delete), "raw": (raw_create, raw_delete),
                 "backend": (backend_create, backend_delete), "floor": (floor_create, floor_delete)}
        order = list(paths)
        lat: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in paths}
        # Blocks of BLOCK pairs per path, the order of the paths rotated from block to block. Why blocks: a process
        # whose librados threads sat idle while another path ran pays a wake-up on its next call (measured here:
        # gRPC create p50 5.5 ms back to back, 8.5 ms when each call follows the other paths' work, 11 ms after
        # 30 ms of idleness), and per-call interleaving would charge that only to the server process. Within a
        # block every path runs warm; rotating the blocks spreads the cluster's drift over all of them.
        done = 0
        while done < a.iterations:
            turn = (done // BLOCK) % len(order)
            blk = order[turn:] + order[:turn]
            count = min(BLOCK, a.iterations - done)
            for label in blk:
                make, drop = paths[label]
                for _ in range(count):
                    nm = f"lat-{uuid.uuid4().hex[:12]}"
                    s = time.perf_counter()
                    obj = make(nm)
                    lat[label][0].append(time.perf_counter() - s)
                    s = time.perf_counter()
                    drop(obj)
                    lat[label][1].append(time.perf_counter() - s)
            done += count

        rss["after the latency part"] = rss_mib(server.proc.pid)
        print(f"\n{load()}")
        print(f"latency, {a.iterations} sequential create+delete of {SIZE >> 20} MiB images per path, "
              f"in blocks of {BLOCK}, paths rotated per block (ms):")
        print(f"{'':18}{'p50':>8}{'p95':>8}")
        for label, xs in (("gRPC CreateVolume", lat["gRPC"][0]), ("raw rbd create", lat["raw"][0]),
                          ("backend create", lat["backend"][0]), ("floor create", lat["floor"][0]),
                          ("gRPC DeleteVolume", lat["gRPC"][1]), ("raw rbd remove", lat["raw"][1]),
                          ("backend delete", lat["backend"][1]), ("floor delete", lat["floor"][1])):
            print(f"{label:18}{pct(xs, 50) * 1e3:8.2f}{pct(xs, 95) * 1e3:8.2f}")
        print("(backend = RbdBackend called in this process, no gRPC: the driver's own librbd work; floor = a bare "
              "grpcio server calling RBD().create/remove, bench/floor_server.py)")
        print(f"{'gRPC Probe (floor)':18}{pct(floor, 50) * 1e3:8.2f}{pct(floor, 95) * 1e3:8.2f}")
        g_create, g_delete = lat["gRPC"]
        r_create, r_delete = lat["raw"]
        print(f"ratio create p50 {pct(g_create, 50) / pct(r_create, 50):.2f}  p95 "
              f"{pct(g_create, 95) / pct(r_create, 95):.2f}   (goal p50 <= 1.25)")
        print(f"ratio delete p50 {pct(g_delete, 50) / pct(r_delete, 50):.2f}  p95 "
              f"{pct(g_delete, 95) / pct(r_delete, 95):.2f}")
        f_create = lat["floor"][0]
        print(f"create p50: floor / raw {pct(f_create, 50) / pct(r_create, 50):.2f} (any Python gRPC server), "
              f"Tessera / floor {pct(g_create, 50) / pct(f_create, 50):.2f} (what Tessera adds)")
        # Where Tessera's time over the floor goes: the cross-replica lease lock (one OSD operation before the
        # create, timed here alone through the driver's own lock code; its release is sent without waiting), the
        # commit (backend - raw: the records write after the create), and the rest (Python in the request path).
        leases = LeaseLocks("bench", 60)
        lock_times = []
        lock_objs = []
        for _ in range(a.iterations):
            key = f"bench-{uuid.uuid4().hex[:12]}"
            lock_objs.append(OBJECT_PREFIX + key)
            s = time.perf_counter()
            with leases.hold(io, [LockKey(key, "bench lock")], Operation("CreateVolume", key)):
                pass
            lock_times.append(time.perf_counter() - s)
        time.sleep(1)  # the last releases land
        for obj in lock_objs:
            io.remove_object(obj)
        gap = pct(g_create, 50) - pct(f_create, 50)
        lock_ms = pct(lock_times, 50)
        commit = pct(lat["backend"][0], 50) - pct(r_create, 50)
        print(f"Tessera - floor, create p50 {gap * 1e3:.2f} ms = lease lock {lock_ms * 1e3:.2f} + commit (backend - "
              f"raw) {commit * 1e3:.2f} + the rest {(gap - lock_ms - commit) * 1e3:.2f}")

        # Cluster work: the OSDs' op counter around COUNTED sequential calls per path. The admin connection that
        # reads the counter talks to the OSDs only through `perf dump` (no op), and no other client is busy.
        admin = c.rados()
        try:
            counted: dict[str, tuple[float, float]] = {}
            for label, (make, drop) in paths.items():
                before = osd_ops(admin)
                objs = [make(f"ops-{uuid.uuid4().hex[:12]}") for _ in range(COUNTED)]
                mid = osd_ops(admin)
                for obj in objs:
                    drop(obj)
                counted[label] = ((mid - before) / COUNTED, (osd_ops(admin) - mid) / COUNTED)
        finally:
            admin.shutdown()
        print(f"\nOSD operations per call ({COUNTED} sequential calls per path, osd.op perf counter):")
        print(f"{'':10}{'create':>8}{'delete':>8}")
        for label, (per_create, per_delete) in counted.items():
            print(f"{label:10}{per_create:8.1f}{per_delete:8.1f}")

        # Throughput: the memstore OSD's speed drifts by ±30 % between batches of 500 (seen here), so one batch
        # per path says little. Rounds alternate the paths and the median round of each is compared.
        n, k = a.concurrent, a.callers
        contenders = ["gRPC", "raw", "floor"]
        rates: dict[str, tuple[list[float], list[float]]] = {k2: ([], []) for k2 in contenders}
        # CPU per create of the process doing each path's work (raw: this process, its 32 threads included)
        pids = {"gRPC": server.proc.pid, "raw": os.getpid(), "floor": floor_proc.pid}
        cpu: dict[str, list[float]] = {k2: [] for k2 in contenders}
        switches: dict[str, list[float]] = {k2: [] for k2 in contenders}
        after_load = {"creates": 0.0, "deletes": 0.0}  # the server's highest RSS right after its batches
        with ThreadPoolExecutor(k) as ex:
            for rnd in range(a.rounds):
                for label in contenders[rnd % 3:] + contenders[:rnd % 3]:
                    make, drop = paths[label]
                    names = [f"tp-{uuid.uuid4().hex[:12]}" for _ in range(n)]
                    used, switched = cpu_seconds(pids[label]), context_switches(pids[label])
                    s = time.perf_counter()
                    objs = list(ex.map(make, names))
                    rates[label][0].append(n / (time.perf_counter() - s))
                    cpu[label].append((cpu_seconds(pids[label]) - used) / n)
                    switches[label].append((context_switches(pids[label]) - switched) / n)
                    if label == "gRPC":
                        after_load["creates"] = max(after_load["creates"], rss_mib(server.proc.pid))
                    s = time.perf_counter()
                    list(ex.map(drop, objs))
                    rates[label][1].append(n / (time.perf_counter() - s))
                    if label == "gRPC":
                        after_load["deletes"] = max(after_load["deletes"], rss_mib(server.proc.pid))
        backend.close()
        rss[f"highest right after a batch of {a.concurrent} creates"] = after_load["creates"]
        rss[f"highest right after a batch of {a.concurrent} deletes"] = after_load["deletes"]
        rss["after the whole load"] = rss_mib(server.proc.pid)
        time.sleep(5)
        rss["idle 5 s later"] = rss_mib(server.proc.pid)
        time.sleep(7)  # past csi/memtrim.py's quiet period: freed heap given back
        rss["idle 12 s later"] = rss_mib(server.proc.pid)
        print(f"\n{load()}")
        med = {k2: (statistics.median(v[0]), statistics.median(v[1])) for k2, v in rates.items()}
        print(f"\nthroughput, {n} volumes, {k} concurrent callers, median of {a.rounds} rotating rounds "
              "(volumes/s):")
        for i, (what, raw_what) in enumerate((("CreateVolume", "create"), ("DeleteVolume", "remove"))):
            spread = ", ".join(f"{x:.0f}" for x in rates["gRPC"][i])
            rspread = ", ".join(f"{x:.0f}" for x in rates["raw"][i])
            print(f"gRPC {what} {med['gRPC'][i]:8.1f} [{spread}]   raw rbd {raw_what} {med['raw'][i]:8.1f} "
                  f"[{rspread}]   ratio {med['gRPC'][i] / med['raw'][i]:.2f}" + ("  (goal >= 0.8)" if i == 0 else ""))
            fspread = ", ".join(f"{x:.0f}" for x in rates["floor"][i])
            print(f"     floor {med['floor'][i]:8.1f} [{fspread}]   floor / raw {med['floor'][i] / med['raw'][i]:.2f}, "
                  f"Tessera / floor {med['gRPC'][i] / med['floor'][i]:.2f}")
        print(f"CPU per create (ms, median round; every thread of the process doing the work, the cluster's own "
              f"not counted): Tessera's server {statistics.median(cpu['gRPC']) * 1e3:.2f}, floor server "
              f"{statistics.median(cpu['floor']) * 1e3:.2f}, raw (this process) {statistics.median(cpu['raw']) * 1e3:.2f}"
              f"   ({os.cpu_count()} CPUs, shared with the cluster)")
        print(f"voluntary context switches per create (all threads): Tessera's server "
              f"{statistics.median(switches['gRPC']):.1f}, floor server {statistics.median(switches['floor']):.1f}, "
              f"raw (this process) {statistics.median(switches['raw']):.1f}")
        print(f"\ncontroller RSS (MiB, MALLOC_ARENA_MAX={os.environ.get('MALLOC_ARENA_MAX', 'unset')} in the "
              f"bench's environment): " + ", ".join(f"{k} {v:.1f}" for k, v in rss.items()) + f"   {load()}")
        left = [x for x in rbd.RBD().list(io) if x.startswith(("tessera-vol-", "raw-", "floor-", "inproc-"))]
        print(f"images left behind: {len(left)}")
    finally:
        floor_proc.terminate()
        floor_proc.wait(30)
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
