"""The shim's self-contained runtime (python -m flex.bundle) really is self-contained.

The bundle is built once per session from this venv, the launcher installed by flex.install --bundle, and kubelet's
calls (init, then a file-backend volume mounted, written, unmounted, mounted again and read back) run in a private
mount namespace in which the host's Python is gone: empty tmpfs over /usr/lib/python3, /usr/lib/python3.11,
/usr/local/lib/python3*, pyenv's root, the repository's .venv and the repository itself, and /dev/null over the
interpreter binary. Only the bundle is left to run on. flex.bundle.verify adds what hiding directories cannot show:
every shared object mapped into the bundled interpreter comes from the bundle.

The namespace is held by one process (`unshare ... sleep`); each call enters it with `nsenter`, the way kubelet
would run the driver on a node without Python. Mounts made in it stay in it, so files are written and read there too.
"""
from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from flex import bundle as B
from flex.install import install
from tests.integration.flex.kubelet import REPO, Kubelet
from tests.integration.flex.walk import kubelet_options, provision_pv

HIDDEN_DIRS = ["/usr/lib/python3", "/usr/lib/python3.11", *sorted(glob.glob("/usr/local/lib/python3*")),
               os.path.expanduser("~/.pyenv"), os.path.join(REPO, ".venv"), REPO]


def _require(*tools: str) -> None:
    missing = [t for t in tools if not shutil.which(t)]
    if missing or os.geteuid() != 0:
        pytest.fail(f"MISSING: root and {', '.join(missing) or 'tools'} for the bundle tests")


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> str:
    """One bundle per session (~10 s to build, ~180 MiB: removed afterwards)."""
    _require("ldd", "dpkg-query")
    out = str(tmp_path_factory.mktemp("flex-bundle") / "tessera-flex")
    B.build(out, REPO)
    yield out
    shutil.rmtree(out, ignore_errors=True)


@pytest.fixture
def hidden_host_python(tmp_path):
    """A process holding a private mount namespace without the host's Python; returns its pid."""
    _require("unshare", "nsenter", "mount")
    hidden = [d for d in HIDDEN_DIRS if os.path.isdir(d)]
    interpreter = os.path.realpath(sys._base_executable)  # /usr/bin/python3.11
    script = "set -e\n" + "".join(f"mount -t tmpfs -o size=1m,mode=0755 tessera-hide '{d}'\n" for d in hidden) + \
             f"mount --bind /dev/null '{interpreter}'\necho ready\nexec sleep 600\n"
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    line = holder.stdout.readline()
    if line.strip() != "ready":
        holder.kill()
        pytest.fail(f"cannot set up the mount namespace: {holder.stderr.read()}")
    yield holder.pid
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)


def in_ns(pid: int, *argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["nsenter", "--target", str(pid), "--mount", "--", *argv], capture_output=True, text=True,
                          cwd="/", timeout=120, **kw)


def ns_kubelet(flexnode, pid: int, driver: str) -> Kubelet:
    """A Kubelet whose driver executable runs inside the namespace; the environment tempts a host Python."""
    wrapper = os.path.join(flexnode.root, "driver-in-ns")
    with open(wrapper, "w") as f:
        f.write(f"#!/bin/sh\nexec nsenter --target {pid} --mount -- '{driver}' \"$@\"\n")
    os.chmod(wrapper, 0o755)
    k = Kubelet(flexnode.config, flexnode.log, exe=wrapper)
    k.env.pop("TESSERA_CONFIG")  # the launcher carries it: kubelet passes no environment
    k.env.update(PYTHONHOME="/usr", PYTHONPATH=f"{REPO}:/usr/lib/python3/dist-packages", PYTHONSTARTUP="/nonexistent")
    return k


def _provision(flexnode, name: str):
    ops = flexnode.controller_ops()
    vid, pv = provision_pv(ops, name)
    return ops, vid, pv


def _loops(prefix: str) -> list[str]:
    out = subprocess.run(["losetup", "-a", "-n", "-O", "NAME,BACK-FILE", "--raw"], capture_output=True, text=True)
    return [ln.split()[0] for ln in out.stdout.splitlines() if prefix in ln]


def test_bundle_layout_and_everything_mapped_comes_from_it(bundle):
    m = B.load_manifest(bundle)
    assert os.path.isfile(os.path.join(bundle, m["loader"])) and m["loader"].startswith("lib/ld-")
    assert {"grpcio", "pydantic_core", "PyYAML"} <= set(m["pip"]) and "kubernetes" not in m["pip"]
    stdlib = os.path.join(bundle, "lib", "python%d.%d" % sys.version_info[:2])
    assert os.path.isfile(os.path.join(stdlib, "os.py")) and os.path.isdir(os.path.join(stdlib, "lib-dynload"))
    for gone in ("test", "idlelib", "tkinter", "turtledemo", "ensurepip"):
        assert not os.path.exists(os.path.join(stdlib, gone)), gone
    assert not glob.glob(os.path.join(stdlib, "config-*"))
    for dirpath, _, files in os.walk(bundle):  # nothing points out of the tree
        for f in files:
            assert not os.path.islink(os.path.join(dirpath, f)), os.path.join(dirpath, f)
    report = B.verify(bundle)
    mapped = [p for p in report["maps"] if ".so" in os.path.basename(p)]
    assert any(p.endswith("/lib/libc.so.6") for p in mapped) and all(p.startswith(bundle) for p in mapped)
    if "python3-rbd" in m["debian"]:
        assert any(os.path.basename(p) == "librbd.so.1" for p in mapped)
    print(f"\nbundle {bundle}: {B.disk_usage(bundle) / 2**20:.0f} MiB, {len(m['libraries'])} libraries")


def test_verify_notices_a_library_taken_from_the_host(bundle, tmp_path):
    """A relocated copy works; the same copy without libffi falls back to the host's, and verify says so."""
    copy = str(tmp_path / "moved")
    subprocess.run(["cp", "-al", bundle, copy], check=True)
    B.verify(copy, ["flex.shim", "ctypes"])
    os.unlink(os.path.join(copy, "lib", "libffi.so.8"))
    with pytest.raises(B.BundleError, match=r"mapped from outside the bundle: \S*libffi\.so\.8"):
        B.verify(copy, ["ctypes"])


def test_kubelet_calls_through_the_bundle_without_the_host_python(flexnode, bundle, hidden_host_python):
    pid = hidden_host_python
    # the namespace really lacks the host's Python and this repository
    for d in ("/usr/lib/python3", "/usr/lib/python3.11", REPO):
        assert in_ns(pid, "ls", "-A", d).stdout == "", d
    assert in_ns(pid, os.path.realpath(sys._base_executable), "-c", "pass").returncode != 0
    # control: the venv launcher (shebang = this venv's python) cannot run there
    venv_launcher = install(os.path.join(flexnode.root, "plugins-venv"), sys.executable, REPO, flexnode.config,
                            "flex-node", flexnode.log)
    r = in_ns(pid, venv_launcher, "init")
    assert r.returncode != 0 and '"Success"' not in r.stdout, (r.stdout, r.stderr)

    path = install(os.path.join(flexnode.root, "plugins"), config=flexnode.config, node="flex-node",
                   log=flexnode.log, bundle=bundle)
    k = ns_kubelet(flexnode, pid, path)
    started = time.monotonic()
    a = k.call("init")
    assert a.ok and a.stderr == "" and a.reply["capabilities"]["attach"] is False, a.reply

    ops, vid, pv = _provision(flexnode, "bundle1")
    name = pv["metadata"]["name"]
    d1 = flexnode.pod_dir("p1", name)
    a = k.call("mount", d1, kubelet_options(pv, "p1"))
    assert a.ok, a.reply
    w = in_ns(pid, "sh", "-c", f"printf 'through the bundle\\n' > '{d1}/hello.txt' && findmnt -n -o FSTYPE '{d1}'")
    assert w.returncode == 0 and w.stdout.strip() == "ext4", w.stderr
    assert k.call("unmount", d1).ok
    assert in_ns(pid, "findmnt", "-n", d1).stdout == ""
    d2 = flexnode.pod_dir("p2", name)
    assert k.call("mount", d2, kubelet_options(pv, "p2")).ok
    assert in_ns(pid, "cat", f"{d2}/hello.txt").stdout == "through the bundle\n"
    assert k.call("unmount", d2).ok
    assert k.call("unmount", d2).ok  # kubelet retries: still Success
    left = in_ns(pid, "findmnt", "-rn", "-o", "TARGET").stdout.split()
    assert not [m for m in left if m.startswith(flexnode.root)] and _loops(flexnode.root) == []
    # the shim logged the calls, and no Python traceback from a missing module
    log = open(flexnode.log).read()
    assert f"unmount {d2} -> Success" in log and "Traceback" not in log
    assert time.monotonic() - started < 60
    ops.delete_volume(vid, {})


@pytest.fixture(scope="module")
def fast_binary(tmp_path_factory):
    from flex.install import build_fast_launcher
    _require("cc")
    return build_fast_launcher(str(tmp_path_factory.mktemp("fast") / "block"))


def test_front_door_and_agent_run_from_the_bundle(flexnode, bundle, hidden_host_python, fast_binary):
    """The static front door falls back to the sh launcher, and a node agent started from the bundle answers."""
    pid = hidden_host_python
    sock = os.path.join(flexnode.root, "agent.sock")
    path = install(os.path.join(flexnode.root, "plugins"), config=flexnode.config, node="flex-node",
                   log=flexnode.log, agent_socket=sock, fast_launcher=fast_binary, bundle=bundle)
    k = ns_kubelet(flexnode, pid, path)
    assert k.ok("init")["capabilities"]["attach"] is False  # front door -> block.py (sh) -> bundle
    ops, vid, pv = _provision(flexnode, "bundle2")
    name = pv["metadata"]["name"]
    agent_log = open(os.path.join(flexnode.root, "agent.log"), "w")
    agent = subprocess.Popen(["nsenter", "--target", str(pid), "--mount", "--",
                              os.path.join(bundle, "bin", "tessera-python"), "-m", "flex.agent", "--socket", sock,
                              "--config", flexnode.config, "--node-name", "flex-node"],
                             stdout=agent_log, stderr=agent_log, cwd="/")
    try:
        deadline = time.time() + 30
        while not os.path.exists(sock):
            assert agent.poll() is None and time.time() < deadline, open(agent_log.name).read()
            time.sleep(0.05)
        d1 = flexnode.pod_dir("p1", name)
        assert k.call("mount", d1, kubelet_options(pv, "p1")).ok
        assert in_ns(pid, "sh", "-c", f"echo via-agent > '{d1}/f'").returncode == 0
        assert k.call("unmount", d1).ok
        log = open(agent_log.name).read()
        assert f"mount {d1} <options> -> Success" in log and f"unmount {d1} -> Success" in log
    finally:
        agent.terminate()
        assert agent.wait(30) == 0
    # agent gone: the front door falls back to the bundle in-process
    d2 = flexnode.pod_dir("p2", name)
    assert k.call("mount", d2, kubelet_options(pv, "p2")).ok
    assert in_ns(pid, "cat", f"{d2}/f").stdout == "via-agent\n"
    assert k.call("unmount", d2).ok
    assert _loops(flexnode.root) == []
    ops.delete_volume(vid, {})
