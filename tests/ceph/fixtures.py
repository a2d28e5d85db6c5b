"""pytest fixtures for a real Ceph cluster (see tests/ceph/cluster.py). Register with
`pytest_plugins = ["tests.ceph.fixtures"]` in a conftest.

`ceph_cluster` (session): one mon + one memstore OSD for the whole run, with pool `rbd` and a least-privilege
`client.csi` user. `ceph_mgr` adds a ceph-mgr to it on first use (pool statistics, for capacity tests only: the
mgr costs ~300 MB and ~3 s, so tests that do not need it never pay). `fresh_ceph_cluster` (function) is a private
cluster for tests that stop and restart the daemons.

A missing ceph package is a failure, not a skip: a green run must mean the RBD code ran against Ceph.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Iterator

import pytest

from tests.ceph.cluster import Cluster, bootstrap

REQUIRED_PROGRAMS = ("ceph-mon", "ceph-osd", "ceph-mgr", "monmaptool", "rbd-fuse")
# Seconds to wait for the cluster (and the mgr's first statistics). An emulated guest (QEMU TCG) needs minutes.
READY_TIMEOUT = float(os.environ.get("TESSERA_CEPH_READY_TIMEOUT", "60"))


@dataclass
class CephInfo:
    """What a test needs to talk to the cluster."""
    cluster: Cluster
    monitors: str
    conf: str
    pool: str
    admin_keyring: str
    admin_key: str
    csi_user: str
    csi_keyring: str
    csi_key: str

    @classmethod
    def of(cls, c: Cluster) -> "CephInfo":
        return cls(cluster=c, monitors=c.monitors, conf=c.conf, pool=c.pool, admin_keyring=c.admin_keyring,
                   admin_key=c.admin_key, csi_user=c.csi_user, csi_keyring=c.csi_keyring, csi_key=c.csi_key)


def _require_ceph() -> None:
    missing = [p for p in REQUIRED_PROGRAMS if shutil.which(p) is None]
    try:
        import rados  # noqa: F401
        import rbd  # noqa: F401
    except ImportError:
        missing.append("python3-rados/python3-rbd")
    if missing:
        pytest.fail(f"Ceph tests need {', '.join(missing)} (apt-get install ceph-mon ceph-osd ceph-mgr ceph-common "
                    "rbd-fuse python3-rbd python3-rados)", pytrace=False)


def _tmpdir(prefix: str) -> str:
    # Short path: ceph admin sockets live inside and unix socket paths are limited to 107 bytes.
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


@pytest.fixture(scope="session")
def ceph_cluster() -> Iterator[CephInfo]:
    _require_ceph()
    d = _tmpdir("tessera-ceph-")
    c = bootstrap(d, timeout=READY_TIMEOUT)
    try:
        yield CephInfo.of(c)
    finally:
        c.stop()
        if os.environ.get("TESSERA_KEEP_CEPH") != "1":
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def ceph_mgr(ceph_cluster: CephInfo) -> CephInfo:
    """The session cluster with a ceph-mgr running (started on first use, stopped with the cluster)."""
    c = ceph_cluster.cluster
    if not c.with_mgr:
        c.start_mgr()
        c.wait_ready(READY_TIMEOUT)
    return ceph_cluster


@pytest.fixture
def fresh_ceph_cluster() -> Iterator[CephInfo]:
    """A private cluster for one test (for stopping and restarting daemons without disturbing the others)."""
    _require_ceph()
    d = _tmpdir("tessera-ceph1-")
    c = bootstrap(d, timeout=READY_TIMEOUT)
    try:
        yield CephInfo.of(c)
    finally:
        c.stop()
        shutil.rmtree(d, ignore_errors=True)
