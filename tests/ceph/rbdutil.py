"""Helpers shared by RBD tests and benches: an RbdBackend on the test cluster."""
from __future__ import annotations

import time

from backends.base import Runtime
from backends.errors import Aborted
from backends.rbd import RbdBackend, RbdOptions
from tests.ceph.fixtures import CephInfo

DRIVER = "tessera.csi.dev"


def make_backend(ceph: CephInfo, state_dir: str, **overrides) -> RbdBackend:
    """The backend as the `client.csi` user, short timeouts, clone depth 2 (so chains flatten in few steps)."""
    opts = dict(monitors=[ceph.monitors], user=ceph.csi_user, keyringPath=ceph.csi_keyring, pool=ceph.pool,
                cloneDepthLimit=2, connectTimeout=5, opTimeout=5, mounter="fuse")
    opts.update(overrides)
    return RbdBackend("ceph", RbdOptions(**opts), Runtime(DRIVER, "node-1", state_dir, "topology.tessera.csi.dev/node"))


def until_done(fn, *args, bound: float = 120.0):
    """Call as a CO does: ABORTED (another operation, e.g. a background flatten, holds the object) means retry after
    a moment. `bound` only keeps a broken run from hanging; it is not a speed assertion."""
    deadline = time.monotonic() + bound
    while True:
        try:
            return fn(*args)
        except Aborted:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
