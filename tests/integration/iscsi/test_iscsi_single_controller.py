"""The iSCSI controller runs beside its target, alone: a second controller process on the same target refuses to
start (with a message naming the first) instead of racing it; once the first is gone, a new one starts."""
from __future__ import annotations

import os
import subprocess

import yaml

from tests.sanity.harness import ServerProcess, tessera_command


def _config(tmp_path) -> str:
    path = str(tmp_path / "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"backends": {"iscsi": {
            "type": "iscsi", "portals": ["127.0.0.1:3260"], "iqnPrefix": "iqn.2026-01.dev.csi.tessera.single",
            "targetDriver": "tgt", "tgtControlPort": 1,
            "backingStore": {"file": {"directory": str(tmp_path / "store")}},
            "chapKeyFile": str(tmp_path / "chap.key")}}}, f)
    return path


def test_second_controller_on_the_same_target_refuses_to_start(tmp_path):
    config = _config(tmp_path)
    first = ServerProcess(str(tmp_path / "one"), config, node_id="target-host", extra_args=["--mode", "controller"])
    # the same target and the same host state directory, as a second replica on the target host would have
    state = first.state_dir
    first.start()
    try:
        second = subprocess.run(tessera_command() + ["serve", "--mode", "controller", "--config", config,
                                                     "--state-dir", state, "--node-id", "target-host",
                                                     "--endpoint", f"unix://{tmp_path}/two.sock"],
                                capture_output=True, text=True, timeout=60)
        assert second.returncode != 0, second.stdout
        assert "iSCSI target iqn.2026-01.dev.csi.tessera.single (tgt) is already served by tessera-csi controller " \
               f"pid {first.proc.pid}" in second.stderr, second.stderr[-2000:]
        assert "runs exactly one controller beside its target" in second.stderr
        assert "Traceback" not in second.stderr, second.stderr[-2000:]
        assert second.returncode == 2
        assert not os.path.exists(f"{tmp_path}/two.sock")
        # a node plugin on the same host is no controller: it starts
        node = ServerProcess(str(tmp_path / "node"), config, node_id="target-host", extra_args=["--mode", "node"])
        node.start()
        assert node.stop() == 0, node.log_tail()
    finally:
        assert first.stop() == 0, first.log_tail()
    # the first one has gone: its lock went with it
    third = ServerProcess(str(tmp_path / "one"), config, node_id="target-host", extra_args=["--mode", "controller"])
    third.start()
    assert third.stop() == 0, third.log_tail()
