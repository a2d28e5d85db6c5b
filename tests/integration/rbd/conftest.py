"""Fixtures for the RBD backend tests: a backend instance on the session's test cluster (tests/ceph/)."""
from __future__ import annotations

import tempfile
from typing import Iterator

import pytest

from backends.rbd import RbdBackend
from tests.ceph.fixtures import CephInfo  # the fixtures themselves: tests/conftest.py's pytest_plugins
from tests.ceph.rbdutil import make_backend


@pytest.fixture
def state_dir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="tessera-rbd-state-") as d:
        yield d


@pytest.fixture
def backend(ceph_cluster: CephInfo, state_dir: str) -> Iterator[RbdBackend]:
    b = make_backend(ceph_cluster, state_dir)
    yield b
    b.close()


@pytest.fixture
def admin_io(ceph_cluster: CephInfo):
    """An admin ioctx on the test pool, to check from outside the backend what is really in the cluster."""
    r = ceph_cluster.cluster.rados()
    io = r.open_ioctx(ceph_cluster.pool)
    yield io
    io.close()
    r.shutdown()
