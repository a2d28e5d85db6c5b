"""Fixtures (re-exported by conftest.py) for the iSCSI backend's host tests: a real tgtd on 127.0.0.1 with a non-default portal and control port,
started and stopped by PID, plus libiscsi's userspace tools to look at the target from outside (the host has no
kernel initiator, so nothing here logs in through the kernel; the guest suite does that)."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import pytest

from backends.base import Runtime
from backends.iscsi import IscsiBackend, IscsiOptions
from backends.util import run
from tests.conftest import require

PREFIX = "iqn.2026-11.dev.tessera.test"


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@dataclass
class Tgtd:
    port: int
    control_port: int
    pid: int

    @property
    def portal(self) -> str:
        return f"127.0.0.1:{self.port}"


def _listening(control: int) -> bool:
    return run(["tgtadm", "-C", str(control), "--lld", "iscsi", "--mode", "target", "--op", "show"],
               check=False).returncode == 0


@contextlib.contextmanager
def running_tgtd(salt: int = 0) -> Iterator[Tgtd]:
    """A private tgtd on 127.0.0.1 (free TCP port), stopped by PID at the end. Its control port names an abstract
    unix socket (tgtd takes at most 32767): derived from the PID and `salt`, skipping any another tgtd answers on."""
    require(shutil.which("tgtd") is not None and shutil.which("tgtadm") is not None, "tgt (tgtd, tgtadm) installed")
    require(shutil.which("iscsi-inq") is not None, "libiscsi-bin (iscsi-inq, iscsi-ls, iscsi-readcapacity16)")
    control = 20000 + (os.getpid() + salt) % 12000
    while _listening(control):
        control = 20000 + (control - 20000 + 1) % 12000
    port = _free_port()
    log = tempfile.NamedTemporaryFile(prefix="tgtd-", suffix=".log", delete=False)
    proc = subprocess.Popen(["tgtd", "-f", "-C", str(control), "--iscsi", f"portal=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not _listening(control):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"tgtd did not come up: {open(log.name).read()}")
            time.sleep(0.05)
        yield Tgtd(port, control, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.unlink(log.name)


@pytest.fixture(scope="session")
def tgtd() -> Iterator[Tgtd]:
    with running_tgtd() as t:
        yield t


def make_backend(tgtd: Tgtd, workdir: str, **overrides) -> IscsiBackend:
    opts = {"portals": [tgtd.portal], "iqnPrefix": PREFIX, "targetDriver": "tgt", "tgtControlPort": tgtd.control_port,
            "backingStore": {"file": {"directory": os.path.join(workdir, "store")}}}
    opts.update(overrides)
    rt = Runtime(driver_name="tessera.csi.dev", node_name="target-host", state_dir=os.path.join(workdir, "state"),
                 topology_key="topology.tessera.csi.dev/node")
    os.makedirs(rt.state_dir, exist_ok=True)
    return IscsiBackend("san", IscsiOptions.model_validate(opts), rt)


@pytest.fixture
def backend(tgtd: Tgtd, tmp_path) -> Iterator[IscsiBackend]:
    b = make_backend(tgtd, str(tmp_path))
    yield b
    for v in list(b.list_volumes({})):  # leave tgtd clean for the next test
        b.delete_volume(v.local_id, {})


def lun_url(tgtd: Tgtd, iqn: str, lun: int, chap: Optional[tuple[str, str]] = None) -> str:
    cred = f"{chap[0]}%{chap[1]}@" if chap else ""
    return f"iscsi://{cred}127.0.0.1:{tgtd.port}/{iqn}/{lun}"


def iscsi_tool(tool: str, url: str, initiator: str) -> subprocess.CompletedProcess[str]:
    """Run a libiscsi tool as `initiator`; the URL may carry CHAP credentials, so it is never printed on failure."""
    return run([tool, "-i", initiator, url], check=False, timeout=30)
