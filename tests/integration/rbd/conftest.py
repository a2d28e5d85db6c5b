"""Fixtures for the RBD backend tests: a backend instance on the session's test cluster (tests/ceph/)."""
from __future__ import annotations

import sys
import tempfile
from typing import Iterator

# The ceph fixtures come from the `tests.ceph.fixtures` plugin (tests/conftest.py's pytest_plugins, or
# `-p tests.ceph.fixtures`); a registered plugin is imported before this file. When it is not registered, define
# them here so this directory also runs on its own. (Checked before anything below imports that module.)
_plugin_registered = "tests.ceph.fixtures" in sys.modules

import pytest  # noqa: E402

from backends.rbd import RbdBackend  # noqa: E402
from tests.ceph.fixtures import CephInfo  # noqa: E402
from tests.ceph.rbdutil import make_backend  # noqa: E402

if not _plugin_registered:
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
