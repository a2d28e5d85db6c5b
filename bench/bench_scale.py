#!/usr/bin/env python3
"""How the controller's costs grow with the number of volumes: the same figures at --small volumes (default 100)
and at --volumes (default 10,000), on the file backend and on RBD (a throw-away memstore cluster: 1 GiB images are
thin, so it holds them), each printed with its growth factor.

    .venv/bin/python bench/bench_scale.py [--volumes 10000] [--rbd-volumes N] [--small 100] [--backends file,rbd]
                                          [--records 1000] [--workers 8] [--rounds 4] [--cluster-dir DIR]

Per backend, two servers side by side (own directory or pool): one with --small volumes, one with --volumes. Each
figure is taken from both in alternation (which goes first alternates per round), so the load of this shared
machine hits both alike:
  CreateVolume p50       creates (each deleted again) with that many volumes present
  ListVolumes first page one page of 100 from the start (max_entries=100)
  ListVolumes page p50   every page of 100 over two full paged listings
  full listing           every page of 100, start to end (this one should grow linearly)
  GetCapacity p50, ControllerGetVolume p50
  controller start-up    `serve --mode controller` on that state, until the socket answers (median of 3); its RSS
                         then (idle) and after one full listing
and once: node start-up (`serve --mode node`) with --records stale stage records against 10 records.
The goal is a growth factor <= 1.2 for all but the full listing. The machine's load average is printed beside every
figure: compare ratios within one run. Figures only; nothing here asserts on time.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import yaml  # noqa: E402

from bench.measure import load, rss_mib  # noqa: E402
from csi._pb import csi_pb2 as pb  # noqa: E402
from tests.sanity.harness import Client, ServerProcess, mount_cap  # noqa: E402

SIZE = 1 << 30
PAGE = 100


def create_req(name: str, backend: str) -> pb.CreateVolumeRequest:
    return pb.CreateVolumeRequest(name=name, capacity_range=pb.CapacityRange(required_bytes=SIZE),
                                  volume_capabilities=[mount_cap("ext4")], parameters={"backend": backend})


def wait_for_capacity(ctl, backend: str, timeout: float = 120.0) -> None:
    """A fresh Ceph cluster answers GetCapacity only once its ceph-mgr has reported pool statistics."""
    import grpc
    deadline = time.monotonic() + timeout
    while True:
        try:
            ctl.GetCapacity(pb.GetCapacityRequest(parameters={"backend": backend}), timeout=60)
            return
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


class Subject:
    """One backend under test at one volume count: its config, the serving process and the volumes made so far.
    The small and the big subject of a backend run side by side (own directory or pool, own server) and are measured
    in alternation, so the load of this shared machine hits both alike."""

    def __init__(self, label: str, backend: str, cfg: str, work: str, workers: int) -> None:
        self.label, self.backend, self.cfg, self.work, self.workers = label, backend, cfg, work, workers
        self.count = 0
        self.server = ServerProcess(os.path.join(work, "srv"), config=cfg, node_id="bench-node").start(timeout=120)
        self.client = Client(self.server.endpoint, timeout=600)
        self.some_id = ""

    def fill(self, n: int) -> None:
        """Create volumes until `n` exist, from `workers` concurrent callers."""
        ctl = self.client.controller
        s = time.perf_counter()

        def one(i: int) -> str:
            return ctl.CreateVolume(create_req(f"scale-{i:06d}", self.backend), timeout=600).volume.volume_id

        with ThreadPoolExecutor(self.workers) as ex:
            ids = list(ex.map(one, range(self.count, n)))
        if ids and not self.some_id:
            self.some_id = ids[0]
        made = n - self.count
        self.count = n
        took = time.perf_counter() - s
        print(f"  [{self.label}] filled to {n} volumes (+{made} in {took:.1f}s, {made / max(took, 1e-9):.0f}/s)"
              f"  {load()}", flush=True)
        wait_for_capacity(ctl, self.backend)

    # ---- one sample of each figure ----------------------------------------------------------------------------
    def create(self) -> float:
        ctl = self.client.controller
        s = time.perf_counter()
        vid = ctl.CreateVolume(create_req(f"probe-{uuid.uuid4().hex[:12]}", self.backend), timeout=600).volume.volume_id
        took = time.perf_counter() - s
        ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid), timeout=600)
        return took * 1e3

    def listing(self, page_times: list[float]) -> float:
        """Every page of PAGE; the pages' times go to `page_times`, the whole listing's time is returned."""
        token, n, start = "", 0, time.perf_counter()
        while True:
            s = time.perf_counter()
            r = self.client.controller.ListVolumes(pb.ListVolumesRequest(max_entries=PAGE, starting_token=token),
                                                   timeout=600)
            page_times.append((time.perf_counter() - s) * 1e3)
            n += len(r.entries)
            token = r.next_token
            if not token:
                break
        if n != self.count:
            print(f"  [{self.label}] note: the listing returned {n} volumes, {self.count} expected")
        return time.perf_counter() - start

    def first_page(self) -> float:
        s = time.perf_counter()
        self.client.controller.ListVolumes(pb.ListVolumesRequest(max_entries=PAGE), timeout=600)
        return (time.perf_counter() - s) * 1e3

    def capacity(self) -> float:
        s = time.perf_counter()
        self.client.controller.GetCapacity(pb.GetCapacityRequest(parameters={"backend": self.backend}), timeout=600)
        return (time.perf_counter() - s) * 1e3

    def get_volume(self) -> float:
        s = time.perf_counter()
        self.client.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=self.some_id), timeout=600)
        return (time.perf_counter() - s) * 1e3

    def restart(self, list_all: bool) -> tuple[float, float, float]:
        """(seconds until `serve --mode controller` on this state answers, its RSS idle, RSS after a full listing).
        The serving process is stopped meanwhile: one controller at a time."""
        self.client.close()
        self.server.stop()
        ctl_srv = ServerProcess(os.path.join(self.work, "ctl"), config=self.cfg, node_id="bench-node",
                                extra_args=["--mode", "controller", "--state-dir", self.server.state_dir])
        s = time.perf_counter()
        ctl_srv.start(timeout=300)
        took = time.perf_counter() - s
        assert ctl_srv.proc is not None
        time.sleep(1.0)
        idle = rss_mib(ctl_srv.proc.pid)
        c2 = Client(ctl_srv.endpoint, timeout=600)
        token = ""
        while list_all:
            token = c2.controller.ListVolumes(pb.ListVolumesRequest(max_entries=PAGE, starting_token=token),
                                              timeout=600).next_token
            if not token:
                break
        busy = rss_mib(ctl_srv.proc.pid)
        c2.close()
        ctl_srv.stop()
        self.server.start(timeout=300)
        self.client = Client(self.server.endpoint, timeout=600)
        return took, idle, busy

    def close(self) -> None:
        self.client.close()
        self.server.stop()


def compare(small: Subject, big: Subject, rounds: int) -> list[tuple[str, float, float, str]]:
    """Every figure for both subjects, alternating which goes first, `rounds` times; medians."""
    keys = ("CreateVolume p50 (ms)", "ListVolumes first page p50 (ms)", f"ListVolumes page of {PAGE} p50 (ms)",
            f"full listing, pages of {PAGE} (s)", "GetCapacity p50 (ms)", "ControllerGetVolume p50 (ms)",
            "controller start-up p50 (s)", "controller RSS idle (MiB)", "controller RSS after a full listing (MiB)")
    got: dict[tuple[str, int], list[float]] = {(k, i): [] for k in keys for i in (0, 1)}
    loads: dict[str, str] = {}
    for rnd in range(rounds):
        order = [(0, small), (1, big)] if rnd % 2 == 0 else [(1, big), (0, small)]
        for _ in range(5):
            for i, subj in order:
                got[(keys[0], i)].append(subj.create())
                got[(keys[1], i)].append(subj.first_page())
                got[(keys[4], i)].append(subj.capacity())
                got[(keys[5], i)].append(subj.get_volume())
        loads[keys[0]] = loads[keys[1]] = loads[keys[4]] = loads[keys[5]] = load()
        if rnd < 2:  # the whole listing twice per subject (on RBD at 10,000 volumes it takes minutes)
            for i, subj in order:
                got[(keys[3], i)].append(subj.listing(got[(keys[2], i)]))
            loads[keys[2]] = loads[keys[3]] = load()
        if rnd < 3:
            for i, subj in order:
                took, idle, busy = subj.restart(list_all=rnd == 0)
                got[(keys[6], i)].append(took)
                got[(keys[7], i)].append(idle)
                if rnd == 0:
                    got[(keys[8], i)].append(busy)
            loads[keys[6]] = loads[keys[7]] = loads[keys[8]] = load()
    return [(k, statistics.median(got[(k, 0)]), statistics.median(got[(k, 1)]), loads[k]) for k in keys]


def report(label: str, small: int, big: int, rows: list[tuple[str, float, float, str]]) -> None:
    print(f"\n{label}: {small} volumes vs {big} volumes, measured in alternation (growth = at {big} / at {small}; "
          f"goal <= 1.2 except the full listing, which should grow about {big / small:.0f}x)")
    print(f"{'':44}{'at ' + str(small):>12}{'at ' + str(big):>12}{'growth':>9}   load (1/5/15 min) then")
    for k, x, y, ld in rows:
        print(f"{k:44}{x:12.3f}{y:12.3f}{y / x if x else float('nan'):8.2f}x   {ld}")


def file_subject(work: str, workers: int, label: str) -> Subject:
    d = os.path.join(work, f"file-{label}")
    os.makedirs(d)
    cfg = os.path.join(d, "file.yaml")
    with open(cfg, "w") as f:
        yaml.safe_dump({"backends": {"local": {"type": "file", "directory": os.path.join(d, "volumes")}}}, f)
    return Subject(f"file {label}", "local", cfg, d, workers)


def rbd_subject(work: str, workers: int, c, label: str) -> Subject:
    """A subject in its own pool: the small one in a pool made here, with the admin user (the test cluster's
    csi user may use only the cluster's pool)."""
    import rbd
    d = os.path.join(work, f"rbd-{label}")
    os.makedirs(d)
    conf = {"type": "rbd", "monitors": [c.monitors], "user": c.csi_user, "keyringPath": c.csi_keyring,
            "pool": c.pool}
    if label == "small":
        pool = f"scale-{uuid.uuid4().hex[:8]}"
        r = c.rados()
        try:
            r.create_pool(pool)
            io = r.open_ioctx(pool)
            rbd.RBD().pool_init(io, True)
            io.close()
        finally:
            r.shutdown()
        conf.update(user="admin", keyringPath=c.admin_keyring, pool=pool)
    cfg = os.path.join(d, "rbd.yaml")
    with open(cfg, "w") as f:
        yaml.safe_dump({"backends": {"ceph": conf}}, f)
    return Subject(f"rbd {label}", "ceph", cfg, d, workers)


def node_startup(work: str, records: int) -> tuple[float, float]:
    """Seconds until `serve --mode node` answers with `records` stage records of file volumes whose devices are gone
    (what a reboot leaves: start-up reconciliation reads and drops each), for `records` and for 10."""
    def once(n: int) -> float:
        d = os.path.join(work, f"node-{n}")
        state = os.path.join(d, "state")
        rec_dir = os.path.join(state, "node", "staged")
        os.makedirs(rec_dir)
        cfg = os.path.join(d, "node.yaml")
        with open(cfg, "w") as f:
            yaml.safe_dump({"backends": {"local": {"type": "file", "directory": os.path.join(d, "volumes")}}}, f)
        for i in range(n):
            vid = f"local:vol-{uuid.uuid4()}"
            rec = {"volume_id": vid, "staging_path": os.path.join(d, "staging", str(i)), "device": f"/dev/loop{9000 + i}",
                   "access_type": "mount", "fs_type": "ext4", "state": "staged", "boot_id": "another-boot",
                   "attachment": {"device": f"/dev/loop{9000 + i}", "data": {}}}
            name = hashlib.sha256(vid.encode()).hexdigest()[:40] + ".json"
            with open(os.path.join(rec_dir, name), "w") as f:
                json.dump(rec, f)
        srv = ServerProcess(os.path.join(d, "srv"), config=cfg, node_id="bench-node",
                            extra_args=["--mode", "node", "--state-dir", state])
        s = time.perf_counter()
        srv.start(timeout=600)
        took = time.perf_counter() - s
        srv.stop()
        return took
    return once(10), once(records)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--volumes", type=int, default=10000)
    ap.add_argument("--rbd-volumes", type=int, default=None, help="volumes for RBD (default: --volumes)")
    ap.add_argument("--small", type=int, default=100)
    ap.add_argument("--backends", default="file,rbd")
    ap.add_argument("--records", type=int, default=1000, help="stage records for the node start-up figure")
    ap.add_argument("--workers", type=int, default=8, help="concurrent callers while filling")
    ap.add_argument("--rounds", type=int, default=4, help="alternating measuring rounds (5 calls per figure each)")
    ap.add_argument("--cluster-dir", help="use (or start) the cluster in this directory instead of a fresh one")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="tessera-bench-scale-", dir="/tmp")
    print(f"bench_scale: {load()}  (a shared machine: compare the growth factors, not absolute times)", flush=True)
    try:
        for which in a.backends.split(","):
            cluster = None
            big = a.volumes if which == "file" else (a.rbd_volumes or a.volumes)
            subjects: list[Subject] = []
            try:
                if which == "file":
                    subjects = [file_subject(work, a.workers, "small"), file_subject(work, a.workers, "big")]
                elif which == "rbd":
                    from tests.ceph.cluster import bootstrap, start
                    s = time.monotonic()
                    cluster = start(a.cluster_dir, mgr=True) if a.cluster_dir else \
                        bootstrap(os.path.join(work, "ceph"), mgr=True)
                    print(f"ceph cluster ready in {time.monotonic() - s:.1f}s ({cluster.dir})", flush=True)
                    subjects = [rbd_subject(work, a.workers, cluster, "small"),
                                rbd_subject(work, a.workers, cluster, "big")]
                else:
                    raise SystemExit(f"unknown backend {which!r}: file or rbd")
                subjects[0].fill(a.small)
                subjects[1].fill(big)
                report(which, a.small, big, compare(subjects[0], subjects[1], a.rounds))
            finally:
                for subj in subjects:
                    subj.close()
                if cluster is not None and not a.cluster_dir:
                    cluster.stop()
        if a.records:
            few, many = node_startup(work, a.records)
            print(f"\nnode start-up (`serve --mode node`, stale stage records reconciled): 10 records {few:.2f}s, "
                  f"{a.records} records {many:.2f}s, growth {many / few:.2f}x   {load()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
