"""The server process as an operator meets it: start, logs, metrics, stale sockets, SIGTERM, bad config."""
from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest

from csi._pb import csi_pb2 as pb
from csi._pb import csi_pb2_grpc as rpc

TESSERA = [sys.executable, "-m", "csi.cli"]
CAP = pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(fs_type="ext4"),
                          access_mode=pb.VolumeCapability.AccessMode(mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _start(tmp_path, *extra: str, sock: str | None = None, **popen) -> tuple[subprocess.Popen, str]:
    sock = sock or str(tmp_path / "csi.sock")
    proc = subprocess.Popen(TESSERA + ["serve", "--endpoint", f"unix://{sock}", "--state-dir", str(tmp_path / "state"),
                                       "--node-id", "test-node", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early: {proc.stderr.read()}")
        if os.path.exists(sock):
            ch = grpc.insecure_channel(f"unix://{sock}")
            try:
                grpc.channel_ready_future(ch).result(timeout=1)
                return proc, sock
            except grpc.FutureTimeoutError:
                pass
            finally:
                ch.close()
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("server did not come up")


def _stop(proc: subprocess.Popen) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=40)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, err


def test_log_lines_and_metrics(tmp_path):
    port = _free_port()
    proc, sock = _start(tmp_path, "--metrics-address", f"127.0.0.1:{port}")
    try:
        with grpc.insecure_channel(f"unix://{sock}") as ch:
            ctl = rpc.ControllerStub(ch)
            vol = ctl.CreateVolume(pb.CreateVolumeRequest(name="logged", volume_capabilities=[CAP],
                                                          capacity_range=pb.CapacityRange(required_bytes=8 << 20),
                                                          secrets={"userKey": "TOP-SECRET-VALUE"})).volume
            with pytest.raises(grpc.RpcError) as err:
                ctl.DeleteVolume(pb.DeleteVolumeRequest())
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'tessera_csi_requests_total{code="OK",method="CreateVolume"} 1.0' in metrics
        assert 'tessera_csi_requests_total{code="INVALID_ARGUMENT",method="DeleteVolume"} 1.0' in metrics
        assert 'tessera_csi_request_duration_seconds_bucket{code="OK",le="0.005",method="DeleteVolume"}' in metrics
    finally:
        rc, err = _stop(proc)
    assert rc == 0
    assert "TOP-SECRET-VALUE" not in err
    lines = [json.loads(l.split(" tessera.rpc ", 1)[1]) for l in err.splitlines() if " tessera.rpc " in l]
    create = [l for l in lines if l["method"] == "CreateVolume"]
    assert create and create[0]["code"] == "OK" and create[0]["name"] == "logged" and "duration_ms" in create[0]
    delete = [l for l in lines if l["method"] == "DeleteVolume"]
    assert {d["code"] for d in delete} == {"OK", "INVALID_ARGUMENT"}
    assert any(d.get("volume_id") == vol.volume_id for d in delete)


def test_sigterm_finishes_calls_and_removes_socket(tmp_path):
    proc, sock = _start(tmp_path)
    results: list[str] = []
    stop = threading.Event()

    def hammer():
        with grpc.insecure_channel(f"unix://{sock}") as ch:
            ident = rpc.IdentityStub(ch)
            ctl = rpc.ControllerStub(ch)
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    ctl.CreateVolume(pb.CreateVolumeRequest(name=f"v{i}", volume_capabilities=[CAP],
                                                            capacity_range=pb.CapacityRange(required_bytes=1 << 20)),
                                     timeout=10)
                    ident.Probe(pb.ProbeRequest(), timeout=10)
                    results.append("ok")
                except grpc.RpcError as e:
                    results.append(e.code().name)
                    if e.code() == grpc.StatusCode.UNAVAILABLE:
                        return

    t = threading.Thread(target=hammer)
    t.start()
    time.sleep(0.5)
    rc, err = _stop(proc)
    stop.set()
    t.join(10)
    assert rc == 0, err
    assert not os.path.exists(sock), "socket left behind after SIGTERM"
    assert results.count("ok") > 0
    assert set(results) <= {"ok", "UNAVAILABLE", "CANCELLED"}, results


def test_a_native_abort_leaves_every_threads_stack_in_the_log(tmp_path):
    """librbd or librados aborting (an assert, an uncaught C++ exception in one of their threads) takes the process
    down; the pod log must then show which Python code every thread was running, or the crash cannot be traced.
    SIGABRT is what abort() raises; no core file is written (RLIMIT_CORE 0 in the child)."""
    proc, _ = _start(tmp_path, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0)))
    proc.send_signal(signal.SIGABRT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGABRT
    assert "Fatal Python error: Aborted" in err
    assert "serve_forever" in err and "_serve" in err  # the main thread's frames, file and function named


def test_stale_socket_is_replaced_and_live_one_is_not(tmp_path):
    sock = str(tmp_path / "csi.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(sock)
    dead.close()  # the file stays, nobody listens: what a crash leaves
    proc, _ = _start(tmp_path, sock=sock)
    try:
        second = subprocess.run(TESSERA + ["serve", "--endpoint", f"unix://{sock}", "--state-dir",
                                           str(tmp_path / "state2")], capture_output=True, text=True, timeout=30)
        assert second.returncode == 2
        assert "already listening" in second.stderr
    finally:
        assert _stop(proc)[0] == 0


def test_invalid_config_stops_with_every_problem(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("backends:\n  a: {type: file}\n  b: {type: nope}\n")
    r = subprocess.run(TESSERA + ["serve", "--endpoint", f"unix://{tmp_path}/s.sock", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "backends.a.directory: Field required" in r.stderr
    assert "backends.b.type: unknown backend type 'nope'" in r.stderr
    assert "defaultBackend: required" in r.stderr


@pytest.mark.parametrize("mode,ready", [("node", True), ("controller", False), ("all", False)])
def test_probe_follows_the_services_served(tmp_path, mode, ready):
    """A node plugin's liveness must not follow the storage's control plane: with the Ceph monitors unreachable,
    the node plugin (which needs only the mounter's tool) is ready, a controller is not, and says why in its log."""
    dead = _free_port()
    cfg = tmp_path / "config.yaml"
    key = tmp_path / "keyring"
    key.write_text("[client.csi]\n\tkey = AQBw3ZxlAAAAABAAWdZQ5oA3rDqQnW0gDZ9mEg==\n")
    cfg.write_text(f"backends:\n  ceph:\n    type: rbd\n    monitors: ['127.0.0.1:{dead}']\n    user: csi\n"
                   f"    keyringPath: {key}\n    pool: rbd\n    mounter: fuse\n    connectTimeout: 1\n")
    proc, sock = _start(tmp_path, "--config", str(cfg), "--mode", mode)
    try:
        with grpc.insecure_channel(f"unix://{sock}") as ch:
            resp = rpc.IdentityStub(ch).Probe(pb.ProbeRequest(), timeout=30)
        assert resp.ready.value is ready
    finally:
        rc, err = _stop(proc)
    assert rc == 0
    if not ready:
        assert '"event": "probe"' in err and "ceph" in err
