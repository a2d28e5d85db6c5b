"""The installed launcher (python -m flex.install) as kubelet runs it, with and without the optional node agent:
the same answers either way, calls really go to the agent while it runs, and everything keeps working when the agent
is gone or serves another config."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import pytest

from flex.install import DRIVER_DIR, EXECUTABLE, install
from tests.integration.flex.kubelet import REPO, Kubelet
from tests.integration.flex.walk import kubelet_options, provision_pv


@pytest.fixture
def agent_factory(flexnode):
    procs = []

    def start(config: str, sock: str) -> subprocess.Popen:
        log = open(os.path.join(flexnode.root, f"agent-{len(procs)}.log"), "w")
        p = subprocess.Popen([sys.executable, "-m", "flex.agent", "--socket", sock, "--config", config,
                              "--node-name", "flex-node"], cwd=REPO, stdout=log, stderr=log)
        procs.append(p)
        deadline = time.time() + 30
        while not os.path.exists(sock):
            assert p.poll() is None and time.time() < deadline, open(log.name).read()
            time.sleep(0.05)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.terminate()
            assert p.wait(30) == 0


def _provision(flexnode, name: str):
    ops = flexnode.controller_ops()
    vid, pv = provision_pv(ops, name)
    return ops, vid, pv


def test_installed_launcher_layout_and_init(flexnode):
    plugins = os.path.join(flexnode.root, "plugins")
    path = install(plugins, sys.executable, REPO, flexnode.config, "flex-node", flexnode.log)
    assert path == os.path.join(plugins, "volume", "exec", DRIVER_DIR, EXECUTABLE)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o755
    assert [n for n in os.listdir(os.path.dirname(path))] == [EXECUTABLE]  # no temp file left for kubelet to run
    k = Kubelet(flexnode.config, flexnode.log, exe=path)
    k.env.pop("TESSERA_CONFIG")  # the launcher carries the config path itself: kubelet passes no environment
    assert k.ok("init")["capabilities"]["attach"] is False


def test_calls_go_through_the_agent_and_fall_back_without_it(flexnode, agent_factory):
    sock = os.path.join(flexnode.root, "agent.sock")
    path = install(os.path.join(flexnode.root, "plugins"), sys.executable, REPO, flexnode.config, "flex-node",
                   flexnode.log, sock)
    k = Kubelet(flexnode.config, flexnode.log, exe=path)
    ops, vid, pv = _provision(flexnode, "agent1")
    name = pv["metadata"]["name"]
    agent = agent_factory(flexnode.config, sock)
    d1 = flexnode.pod_dir("p1", name)
    assert k.call("mount", d1, kubelet_options(pv, "p1")).ok
    with open(os.path.join(d1, "f"), "w") as f:
        f.write("via agent")
    assert k.call("unmount", d1).ok
    bad = k.call("mount", d1, '{"volumeID": "nosuch:v"}')
    assert bad.rc == 1 and "no backend named 'nosuch'" in bad.reply["message"]
    agent_log = open(os.path.join(flexnode.root, "agent-0.log")).read()
    assert f"mount {d1} <options> -> Success" in agent_log and f"unmount {d1} -> Success" in agent_log
    assert "Failure" in agent_log
    # agent stopped: the same calls run in-process
    agent.terminate()
    assert agent.wait(30) == 0
    d2 = flexnode.pod_dir("p2", name)
    assert k.call("mount", d2, kubelet_options(pv, "p2")).ok
    with open(os.path.join(d2, "f")) as f:
        assert f.read() == "via agent"
    assert k.call("unmount", d2).ok
    assert open(os.path.join(flexnode.root, "agent-0.log")).read().count(" -> ") == 3
    ops.delete_volume(vid, {})


def test_agent_for_another_config_is_not_used(flexnode, agent_factory):
    other = os.path.join(flexnode.root, "other.yaml")
    with open(other, "w") as f:
        f.write(open(flexnode.config).read())
    sock = os.path.join(flexnode.root, "agent.sock")
    agent_factory(other, sock)
    path = install(os.path.join(flexnode.root, "plugins"), sys.executable, REPO, flexnode.config, "flex-node",
                   flexnode.log, sock)
    k = Kubelet(flexnode.config, flexnode.log, exe=path)
    ops, vid, pv = _provision(flexnode, "agent2")
    d = flexnode.pod_dir("p1", pv["metadata"]["name"])
    assert k.call("mount", d, kubelet_options(pv, "p1")).ok
    assert k.call("unmount", d).ok
    assert " -> " not in open(os.path.join(flexnode.root, "agent-0.log")).read()
    ops.delete_volume(vid, {})


@pytest.fixture(scope="module")
def fast_binary(tmp_path_factory):
    import shutil
    from flex.install import build_fast_launcher
    if not shutil.which("cc"):
        pytest.fail("MISSING: a C compiler (cc) to build flex/fastpath/block.c")
    return build_fast_launcher(str(tmp_path_factory.mktemp("fast") / "block"))


def test_fast_launcher_forwards_to_the_agent_and_falls_back(flexnode, agent_factory, fast_binary):
    sock = os.path.join(flexnode.root, "agent.sock")
    path = install(os.path.join(flexnode.root, "plugins"), sys.executable, REPO, flexnode.config, "flex-node",
                   flexnode.log, sock, fast_binary)
    assert sorted(os.listdir(os.path.dirname(path))) == ["block", "block.agent", "block.py"]
    k = Kubelet(flexnode.config, flexnode.log, exe=path)
    k.env.pop("TESSERA_CONFIG")
    # no agent yet: everything runs through block.py
    assert k.ok("init")["capabilities"]["attach"] is False
    ops, vid, pv = _provision(flexnode, "fast1")
    name = pv["metadata"]["name"]
    d0 = flexnode.pod_dir("p0", name)
    assert k.call("mount", d0, kubelet_options(pv, "p0")).ok
    assert k.call("unmount", d0).ok
    agent_factory(flexnode.config, sock)
    d1 = flexnode.pod_dir("p1", name)
    assert k.call("mount", d1, kubelet_options(pv, "p1")).ok
    assert k.call("unmount", d1).ok
    a = k.call("getvolumename", kubelet_options(pv))
    assert a.reply["status"] == "Not supported" and a.rc == 1
    assert k.ok("init")["capabilities"]["attach"] is False  # init never goes to the agent
    log = open(os.path.join(flexnode.root, "agent-0.log")).read()
    assert f"mount {d1} <options> -> Success" in log and f"unmount {d1} -> Success" in log
    assert "getvolumename" in log and f"mount {d0}" not in log and "init" not in log
    ops.delete_volume(vid, {})


def test_fast_launcher_without_agent_settings_falls_back(flexnode, fast_binary):
    path = install(os.path.join(flexnode.root, "plugins"), sys.executable, REPO, flexnode.config, "flex-node",
                   flexnode.log, os.path.join(flexnode.root, "none.sock"), fast_binary)
    os.unlink(os.path.join(os.path.dirname(path), "block.agent"))
    k = Kubelet(flexnode.config, flexnode.log, exe=path)
    assert k.ok("init")["status"] == "Success"
    a = k.call("unmount", flexnode.pod_dir("p9", "x"))
    assert a.ok and "nothing to unmount" in a.reply["message"]
