"""Fixtures for the RBD backend tests: a backend instance on the session's test cluster (tests/ceph/)."""
from __future__ import annotations

import os
import tempfile
from typing import Iterator

import pytest

from backends.rbd import RbdBackend
from tests.ceph.fixtures import CephInfo
from tests.ceph.rbdutil import make_backend

# The ceph fixtures come from the `tests.ceph.fixtures` plugin registered in tests/conftest.py; when that line is
# not there yet, import them here so this directory runs on its own.
try:
    import tests.conftest as _root
    _registered = "tests.ceph.fixtures" in getattr(_root, "pytest_plugins", ())
except ImportError:  # pragma: no cover
    _registered = False
if not _registered:
    from tests.ceph.fixtures import ceph_cluster, ceph_mgr, fresh_ceph_cluster  # noqa: F401

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
