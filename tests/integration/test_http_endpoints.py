"""The metrics port as an operator's Prometheus and kubelet use it: capacity and count gauges per backend, staged
volumes per node, and /healthz and /readyz that answer from the same check as the CSI Probe."""
from __future__ import annotations

import os
import re
import time
import urllib.error
import urllib.request

import grpc

from csi._pb import csi_pb2 as pb
from csi._pb import csi_pb2_grpc as rpc
from tests.integration.test_server import CAP, _free_port, _start, _stop


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _metric(text: str, name: str, **labels: str) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if labels else "") + r" (\S+)"
    m = re.search(r"^" + pattern + r"$", text, re.M)
    return float(m.group(1)) if m else None


def _wait_metric(url: str, name: str, want: float, **labels: str) -> str:
    deadline = time.monotonic() + 30
    while True:
        _, text = _get(url)
        if _metric(text, name, **labels) == want or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


def test_capacity_counts_and_health(tmp_path):
    port = _free_port()
    proc, sock = _start(tmp_path, "--metrics-address", f"127.0.0.1:{port}", "--usage-interval", "1")
    base = f"http://127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(f"unix://{sock}") as ch:
            ctl = rpc.ControllerStub(ch)
            for i in range(3):
                ctl.CreateVolume(pb.CreateVolumeRequest(name=f"usage-{i}", volume_capabilities=[CAP],
                                                        capacity_range=pb.CapacityRange(required_bytes=1 << 20)),
                                 timeout=30)
        text = _wait_metric(f"{base}/metrics", "tessera_backend_volumes", 3, backend="local")
        assert _metric(text, "tessera_backend_volumes", backend="local") == 3
        st = os.statvfs(tmp_path / "state" / "file")
        total = _metric(text, "tessera_backend_capacity_bytes", backend="local", kind="total")
        free = _metric(text, "tessera_backend_capacity_bytes", backend="local", kind="free")
        assert total == st.f_blocks * st.f_frsize
        assert free is not None and 0 < free <= total
        assert _metric(text, "tessera_backend_usage_up", backend="local") == 1
        assert _metric(text, "tessera_node_staged_volumes") == 0
        assert _get(f"{base}/healthz") == (200, "ok\n")
        assert _get(f"{base}/readyz") == (200, "ok\n")
        assert _get(f"{base}/nothing")[0] == 404
    finally:
        code, _ = _stop(proc)
    assert code == 0


def test_healthz_fails_with_the_probe(tmp_path):
    """A file backend whose directory has gone: Probe says not ready, and so do /healthz and /readyz, with why."""
    cfg = tmp_path / "c.yaml"
    data = tmp_path / "data"
    cfg.write_text(f"backends:\n  local: {{type: file, directory: {data}}}\n")
    port = _free_port()
    proc, sock = _start(tmp_path, "--config", str(cfg), "--metrics-address", f"127.0.0.1:{port}")
    try:
        with grpc.insecure_channel(f"unix://{sock}") as ch:
            assert rpc.IdentityStub(ch).Probe(pb.ProbeRequest(), timeout=10).ready.value is True
            os.rename(data, tmp_path / "moved")
            probe_ready = rpc.IdentityStub(ch).Probe(pb.ProbeRequest(), timeout=10).ready.value
        code, body = _get(f"http://127.0.0.1:{port}/healthz")
        assert probe_ready is False
        assert code == 503 and "backend local" in body
        assert _get(f"http://127.0.0.1:{port}/readyz")[0] == 503
    finally:
        os.rename(tmp_path / "moved", data) if (tmp_path / "moved").exists() else None
        _stop(proc)
