#!/usr/bin/env python3
"""Cost of the FlexVolume shim, printed as figures and ratios (nothing asserts on time).

    .venv/bin/python bench/bench_flex.py [--iterations 20] [--init-iterations 40] [--cold-iterations 6]
                                         [--size-mib 64]

  init            wall time of `block init` as kubelet runs it (a new process each time): through the installed
                  launcher (`python -m flex.install`, shebang = venv python) and through the repo's `flex/block`
                  (which re-executes under the venv). Target: < 150 ms.
  mount           setting a volume up for a pod, on an already formatted file-backend volume:
                    shim, attach: false   `mount DIR OPTS` (stages + publishes in one call)
                    shim, attach: true    `mountdevice GLOBAL DEV OPTS` + `mount DIR OPTS`
                    shim via agent        `mount DIR OPTS` through the installed launcher while the optional node
                                          agent (flex.agent) runs: the launcher forwards the call over a unix socket
                    shim via agent, fast  the same through the compiled front door (flex/fastpath/block.c)
                    gRPC                  NodeStageVolume + NodePublishVolume to a running `tessera-csi serve`
                  ratio = shim / gRPC (target <= 1.2). "cold" rows: a new blank volume each time, so the
                  mount includes mkfs.ext4, as a pod's first mount of a new claim does. Teardown (unmount[+unmountdevice] vs
                  NodeUnpublish+NodeUnstage) is timed and printed the same way.
Runs alternate shim and gRPC per iteration so machine drift hits both alike. Needs root.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from csi._pb import csi_pb2 as pb  # noqa: E402
from tests.sanity.harness import Client, ServerProcess, mount_cap  # noqa: E402


def pct(xs, p):
    xs = sorted(xs)
    k = (len(xs) - 1) * p
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def line(label, xs):
    print(f"{label:<34} n={len(xs):<3} p50 {statistics.median(xs) * 1e3:8.1f} ms  p95 {pct(xs, .95) * 1e3:8.1f} ms  "
          f"max {max(xs) * 1e3:8.1f} ms", flush=True)


def shim_call(exe, env, *args):
    t = time.perf_counter()
    p = subprocess.run([exe, *args], capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t
    reply = json.loads(p.stdout + p.stderr)
    if p.returncode != 0 or reply["status"] != "Success":
        raise SystemExit(f"shim {args[0]} failed: {reply}")
    return dt


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--init-iterations", type=int, default=40)
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--cold-iterations", type=int, default=6)
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_flex needs root (loop devices, mounts)", file=sys.stderr)
        return 2
    from flex.install import install
    work = tempfile.mkdtemp(prefix="bench-flex-")
    cfg = os.path.join(work, "config.yaml")
    with open(cfg, "w") as f:
        f.write(f"stateDir: {work}/shim-state\nbackends:\n  local:\n    type: file\n    directory: {work}/shim-files\n")
    env = dict(os.environ, TESSERA_CONFIG=cfg, TESSERA_FLEX_LOG=os.path.join(work, "shim.log"),
               TESSERA_NODE_NAME="bench-node")
    launcher = install(os.path.join(work, "plugins"), sys.executable, REPO, cfg, "bench-node",
                       os.path.join(work, "shim.log"))
    agent_sock = os.path.join(work, "agent.sock")
    agent_launcher = install(os.path.join(work, "plugins-agent"), sys.executable, REPO, cfg, "bench-node",
                             os.path.join(work, "shim.log"), agent_sock)
    from flex.install import build_fast_launcher
    fast_launcher = install(os.path.join(work, "plugins-fast"), sys.executable, REPO, cfg, "bench-node",
                            os.path.join(work, "shim.log"), agent_sock,
                            build_fast_launcher(os.path.join(work, "block-fast")))
    repo_exe = os.path.join(REPO, "flex", "block")

    print(f"# bench_flex: {a.iterations} mount iterations, {a.init_iterations} init runs, {a.size_mib} MiB volumes")
    for exe in (launcher, repo_exe, fast_launcher):  # warm the page cache and bytecode
        shim_call(exe, env, "init")
    li, ri, fi = [], [], []
    for _ in range(a.init_iterations):
        li.append(shim_call(launcher, env, "init"))
        ri.append(shim_call(repo_exe, env, "init"))
        fi.append(shim_call(fast_launcher, env, "init"))
    line("init (installed launcher)", li)
    line("init (fast front door -> block.py)", fi)
    line("init (repo flex/block, re-exec)", ri)
    print(f"init target < 150 ms: launcher p95 {'OK' if pct(li, .95) < .15 else 'OVER'}, "
          f"fast p95 {'OK' if pct(fi, .95) < .15 else 'OVER'}, flex/block p95 {'OK' if pct(ri, .95) < .15 else 'OVER'}")

    # volumes: one for the shim (its config), one for the server
    from backends.base import CapabilitySpec
    from csi.config import load_config
    from csi.controllerops import ControllerOps
    from csi.registry import Backends
    ops = ControllerOps(Backends(load_config(cfg), "bench-node"))
    size = a.size_mib << 20
    vid, vol = ops.create_volume("bench-flex", size, 0, [CapabilitySpec("mount", "SINGLE_NODE_WRITER", "ext4")], {}, {})
    opts = json.dumps({"kubernetes.io/fsType": "ext4", "kubernetes.io/readwrite": "rw",
                       "kubernetes.io/pvOrVolumeName": "pv-bench", "volumeID": vid, **vol.context})
    kubelet = os.path.join(work, "kubelet")
    server = ServerProcess(os.path.join(work, "srv"), node_id="bench-node").start()
    agent = subprocess.Popen([sys.executable, "-m", "flex.agent", "--socket", agent_sock, "--config", cfg,
                              "--node-name", "bench-node"], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=open(os.path.join(work, "agent.log"), "w"))
    deadline = time.time() + 30
    while not os.path.exists(agent_sock) and time.time() < deadline:
        time.sleep(0.05)
    client = Client(server.endpoint, timeout=120)
    try:
        gvol = client.controller.CreateVolume(pb.CreateVolumeRequest(
            name="bench-grpc", volume_capabilities=[mount_cap("ext4")],
            capacity_range=pb.CapacityRange(required_bytes=size)), timeout=60).volume
        cap = mount_cap("ext4")
        t_af, t_at, t_g, t_ag, t_fa = [], [], [], [], []
        d_af, d_at, d_g, d_ag, d_fa = [], [], [], [], []
        for i in range(a.iterations + 1):
            pod = os.path.join(kubelet, "pods", f"p{i}", "volumes", "tessera~block", "pv-bench")
            os.makedirs(pod)
            # shim, attach: false
            up = shim_call(launcher, env, "mount", pod, opts)
            down = shim_call(launcher, env, "unmount", pod)
            # shim through the agent
            up3 = shim_call(agent_launcher, env, "mount", pod, opts)
            down3 = shim_call(agent_launcher, env, "unmount", pod)
            os.makedirs(pod, exist_ok=True)
            up4 = shim_call(fast_launcher, env, "mount", pod, opts)
            down4 = shim_call(fast_launcher, env, "unmount", pod)
            os.makedirs(pod, exist_ok=True)
            # shim, attach: true
            g = os.path.join(kubelet, "plugins", "kubernetes.io", "flexvolume", "tessera", "block", "mounts",
                             f"pv-bench-{i}")
            os.makedirs(g)
            os.makedirs(pod, exist_ok=True)
            up2 = shim_call(launcher, env, "mountdevice", g, "", opts) + shim_call(launcher, env, "mount", pod, opts)
            down2 = shim_call(launcher, env, "unmount", pod) + shim_call(launcher, env, "unmountdevice", g)
            # gRPC
            stg = tempfile.mkdtemp(dir=work)
            tgt = os.path.join(tempfile.mkdtemp(dir=work), "t")
            t = time.perf_counter()
            client.node.NodeStageVolume(pb.NodeStageVolumeRequest(
                volume_id=gvol.volume_id, staging_target_path=stg, volume_capability=cap,
                volume_context=gvol.volume_context), timeout=120)
            client.node.NodePublishVolume(pb.NodePublishVolumeRequest(
                volume_id=gvol.volume_id, staging_target_path=stg, target_path=tgt, volume_capability=cap,
                volume_context=gvol.volume_context), timeout=120)
            gu = time.perf_counter() - t
            t = time.perf_counter()
            client.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=gvol.volume_id, target_path=tgt),
                                            timeout=120)
            client.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=gvol.volume_id,
                                                                      staging_target_path=stg), timeout=120)
            gd = time.perf_counter() - t
            if i == 0:
                continue  # the first round formats both volumes
            t_af.append(up), d_af.append(down), t_at.append(up2), d_at.append(down2), t_g.append(gu), d_g.append(gd)
            t_ag.append(up3), d_ag.append(down3), t_fa.append(up4), d_fa.append(down4)
        line("mount: shim attach:false (mount)", t_af)
        line("mount: shim attach:true (mdev+mount)", t_at)
        line("mount: shim via agent (mount)", t_ag)
        line("mount: shim via agent, fast", t_fa)
        line("mount: gRPC Stage+Publish", t_g)
        line("teardown: shim attach:false", d_af)
        line("teardown: shim attach:true", d_at)
        line("teardown: shim via agent", d_ag)
        line("teardown: shim via agent, fast", d_fa)
        line("teardown: gRPC Unpublish+Unstage", d_g)
        g50 = statistics.median(t_g)
        print(f"mount ratio p50 (shim/gRPC): attach:false {statistics.median(t_af) / g50:.2f}, "
              f"attach:true {statistics.median(t_at) / g50:.2f}, via agent {statistics.median(t_ag) / g50:.2f}, "
              f"via agent fast {statistics.median(t_fa) / g50:.2f} (target <= 1.2)")
        gd50 = statistics.median(d_g)
        print(f"teardown ratio p50 (shim/gRPC): attach:false {statistics.median(d_af) / gd50:.2f}, "
              f"attach:true {statistics.median(d_at) / gd50:.2f}, via agent {statistics.median(d_ag) / gd50:.2f}, "
              f"via agent fast {statistics.median(d_fa) / gd50:.2f}")
        if "mount " not in open(os.path.join(work, "agent.log")).read():
            raise SystemExit("the agent answered no call: the 'via agent' figures are not what they claim")
        client.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=gvol.volume_id), timeout=60)

        # cold: first mount of a blank volume (mkfs included)
        c_af, c_ag, c_g, c_fa = [], [], [], []
        for i in range(a.cold_iterations):
            for mode, sink in (("inproc", c_af), ("agent", c_ag), ("fast", c_fa)):
                cvid, cvol = ops.create_volume(f"bench-cold-{mode}-{i}", size, 0,
                                               [CapabilitySpec("mount", "SINGLE_NODE_WRITER", "ext4")], {}, {})
                copts = json.dumps({"kubernetes.io/fsType": "ext4", "kubernetes.io/readwrite": "rw",
                                    "kubernetes.io/pvOrVolumeName": f"pv-cold-{mode}-{i}", "volumeID": cvid,
                                    **cvol.context})
                pod = os.path.join(kubelet, "pods", f"cold-{mode}-{i}", "volumes", "tessera~block", "pv")
                os.makedirs(pod)
                exe = {"inproc": launcher, "agent": agent_launcher, "fast": fast_launcher}[mode]
                sink.append(shim_call(exe, env, "mount", pod, copts))
                shim_call(exe, env, "unmount", pod)
                ops.delete_volume(cvid, {})
            cg = client.controller.CreateVolume(pb.CreateVolumeRequest(
                name=f"bench-cold-grpc-{i}", volume_capabilities=[mount_cap("ext4")],
                capacity_range=pb.CapacityRange(required_bytes=size)), timeout=60).volume
            stg = tempfile.mkdtemp(dir=work)
            tgt = os.path.join(tempfile.mkdtemp(dir=work), "t")
            t = time.perf_counter()
            client.node.NodeStageVolume(pb.NodeStageVolumeRequest(
                volume_id=cg.volume_id, staging_target_path=stg, volume_capability=cap,
                volume_context=cg.volume_context), timeout=120)
            client.node.NodePublishVolume(pb.NodePublishVolumeRequest(
                volume_id=cg.volume_id, staging_target_path=stg, target_path=tgt, volume_capability=cap,
                volume_context=cg.volume_context), timeout=120)
            c_g.append(time.perf_counter() - t)
            client.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=cg.volume_id, target_path=tgt),
                                            timeout=120)
            client.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=cg.volume_id,
                                                                      staging_target_path=stg), timeout=120)
            client.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=cg.volume_id), timeout=60)
        if a.cold_iterations:
            line("cold mount: shim in-process", c_af)
            line("cold mount: shim via agent", c_ag)
            line("cold mount: shim via agent, fast", c_fa)
            line("cold mount: gRPC Stage+Publish", c_g)
            cg50 = statistics.median(c_g)
            print(f"cold mount ratio p50 (shim/gRPC): in-process {statistics.median(c_af) / cg50:.2f}, "
                  f"via agent {statistics.median(c_ag) / cg50:.2f}, via agent fast {statistics.median(c_fa) / cg50:.2f}")
    finally:
        agent.terminate()
        agent.wait(30)
        client.close()
        server.stop()
        ops.delete_volume(vid, {})
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
