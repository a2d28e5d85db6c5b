"""`--log-format json`: every line the process writes to stderr is one JSON object, its own RPC lines as fields and
lines that C libraries write straight to file descriptor 2 wrapped with their level."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import grpc

from csi._pb import csi_pb2 as pb
from csi._pb import csi_pb2_grpc as rpc

from tests.integration.test_server import CAP, TESSERA, _start, _stop


def _objects(stderr: str) -> list[dict]:
    out = []
    for line in stderr.splitlines():
        if line.strip():
            obj = json.loads(line)  # raises on a prefixed or partial line
            assert isinstance(obj, dict), line
            out.append(obj)
    return out


def test_serve_json_lines_carry_rpc_fields(tmp_path):
    proc, sock = _start(tmp_path, "--log-format", "json")
    with grpc.insecure_channel(f"unix://{sock}") as ch:
        rpc.IdentityStub(ch).Probe(pb.ProbeRequest(), timeout=10)
        try:
            rpc.ControllerStub(ch).CreateVolume(pb.CreateVolumeRequest(name="", volume_capabilities=[CAP]), timeout=10)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    code, err = _stop(proc)
    assert code == 0
    objs = _objects(err)
    probe = [o for o in objs if o.get("method") == "Probe"]
    create = [o for o in objs if o.get("method") == "CreateVolume"]
    assert probe and probe[0]["code"] == "OK" and probe[0]["level"] == "info"
    assert create and create[0]["code"] == "INVALID_ARGUMENT" and create[0]["level"] == "warning"
    assert all({"time", "level", "logger"} <= o.keys() for o in objs)


def test_config_error_is_one_json_line_and_not_lost(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("backends:\n  fast: {type: file}\n")
    r = subprocess.run(TESSERA + ["serve", "--log-format", "json", "--endpoint", f"unix://{tmp_path}/s.sock",
                                  "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    messages = " ".join(o.get("message", "") for o in _objects(r.stderr))
    assert "backends.fast.directory: Field required" in messages


def test_foreign_stderr_lines_are_wrapped_with_their_level():
    # What librados does: a C-level write(2, ...) of a Ceph log line, bypassing Python entirely.
    script = textwrap.dedent("""
        import logging, os
        from csi.logfmt import configure
        configure("json", "info")
        os.write(2, b"2026-12-06T00:00:00.000+0000 7f3a2b1c6640 -1 auth: unable to find a keyring\\n")
        os.write(2, b"2026-12-06T00:00:00.000+0000 7f3a2b1c6640  0 monclient: hunting for new mon\\n")
        os.write(2, b"something without a priority\\n")
        logging.getLogger("os_brick").warning("iscsiadm said %s", "no")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    objs = _objects(r.stderr)
    by_msg = {o.get("message", ""): o for o in objs}
    assert by_msg["2026-12-06T00:00:00.000+0000 7f3a2b1c6640 -1 auth: unable to find a keyring"]["level"] == "error"
    assert by_msg["2026-12-06T00:00:00.000+0000 7f3a2b1c6640  0 monclient: hunting for new mon"]["level"] == "warning"
    assert by_msg["something without a priority"]["logger"] == "stderr"
    brick = by_msg["iscsiadm said no"]
    assert brick["logger"] == "os_brick" and brick["level"] == "warning"


def test_text_format_keeps_the_prefixed_lines(tmp_path):
    proc, sock = _start(tmp_path, "--log-format", "text")
    with grpc.insecure_channel(f"unix://{sock}") as ch:
        rpc.IdentityStub(ch).Probe(pb.ProbeRequest(), timeout=10)
    code, err = _stop(proc)
    line = next(ln for ln in err.splitlines() if '"method": "Probe"' in ln)
    assert " INFO tessera.rpc {" in line
