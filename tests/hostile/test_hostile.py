"""The hostile-request suite (issue 10): at least 10,000 generated requests, valid and hostile mixed, across every
Identity, Controller and Node RPC, against a live `tessera-csi serve --mode all` with the default configuration,
inside a private mount namespace, with decoys planted under a temporary directory.

The run itself is tests/hostile/driver.py, executed once per session under `unshare --mount --propagation private`
(mounts made during the run, by the plugin or by the decoys, never reach the host's namespace; loop devices are
global and the driver detaches any it finds left). Each test below checks one property of that run's report, so a
failure names what broke, with a short repro of the first few requests that broke it.

Requests: HOSTILE_REQUESTS (default 10,000); seed: HOSTILE_SEED (default fixed), so every run sends the same ones."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from tests.conftest import require

HERE = os.path.dirname(os.path.abspath(__file__))
REQUESTS = int(os.environ.get("HOSTILE_REQUESTS", "10000"))
SEED = int(os.environ.get("HOSTILE_SEED", "20261206"))


def _prerequisites() -> None:
    require(os.geteuid() == 0, "root (the node plugin mounts and attaches loop devices)")
    for tool in ("unshare", "losetup", "mount", "mkfs.ext4"):
        require(shutil.which(tool) is not None, f"{tool} (util-linux / e2fsprogs)")
    try:
        import hypothesis  # noqa: F401
    except ImportError:
        require(False, "the Python package hypothesis (pip install -e '.[test]')")
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    require(probe.returncode == 0, f"unshare --mount (a private mount namespace): {probe.stderr.decode()[:200]}")
    require(os.path.exists("/dev/loop-control"), "/dev/loop-control (loop devices)")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    _prerequisites()
    root = str(tmp_path_factory.mktemp("hostile"))
    out = os.path.join(root, "report.json")
    work = os.path.join(root, "w")
    os.makedirs(work)
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", sys.executable,
                             os.path.join(HERE, "driver.py"), "--root", work, "--requests", str(REQUESTS),
                             "--seed", str(SEED), "--report", out], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=540)  # inside pytest-timeout's 600 s, so the driver's group is ended here
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its server and their children: one session
        proc.communicate()
        raise AssertionError("the hostile run did not finish within 540 s") from None
    assert proc.returncode == 0 and os.path.exists(out), f"the driver failed ({proc.returncode}):\n{err[-4000:]}"
    with open(out) as f:
        data = json.load(f)
    assert "error" not in data, f"the hostile run broke:\n{data['error']}"
    data["root"] = work
    return data


def _none(report: dict, *kinds: str) -> None:
    found = {k: report["findings"][k] for k in kinds if k in report["findings"]}
    lines = []
    for kind, f in found.items():
        lines.append(f"{kind}: {f['count']} finding(s); first ones:")
        lines.extend(f"  - {e}" for e in f["examples"][:10])
    assert not found, "\n".join(lines)


def test_enough_requests_across_every_rpc(report):
    from tests.hostile.calls import ALL_METHODS
    assert report["requests"] >= REQUESTS
    seen = {key.split(" ")[0] for key in report["counts"]}
    missing = sorted(set(ALL_METHODS) - seen)
    assert not missing, f"no request sent to {missing}"


def test_no_internal_or_unknown_answer_to_bad_input(report):
    _none(report, "internal")


def test_undecodable_requests_are_invalid_argument(report):
    _none(report, "undecodable")


def test_answers_are_short(report):
    _none(report, "long-answer")


def test_server_answers_throughout_and_stops_cleanly_on_sigterm(report):
    _none(report, "unresponsive", "stop")
    assert report.get("exit_code") == 0


def test_no_decoy_changed_or_removed(report):
    _none(report, "decoy")


def test_no_empty_directory_replaced(report):
    """An empty directory at a raw block target is the same directory (inode) after unpublish, not a new one."""
    _none(report, "decoy-empty-dir-replaced")


def test_no_mount_outside_the_requested_roots(report):
    _none(report, "mount-outside")


def test_no_loop_device_record_or_mount_leaked_after_cleanup(report):
    _none(report, "leak", "cleanup")


def test_log_lines_bounded_and_free_of_secrets(report):
    _none(report, "log")
    assert report["log_longest_line"] <= 8192
