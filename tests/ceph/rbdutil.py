"""Helpers shared by RBD tests and benches: an RbdBackend on the test cluster."""
from __future__ import annotations

from backends.base import Runtime
from backends.rbd import RbdBackend, RbdOptions
from tests.ceph.fixtures import CephInfo

DRIVER = "tessera.csi.dev"


def make_backend(ceph: CephInfo, state_dir: str, **overrides) -> RbdBackend:
    """The backend as the `client.csi` user, short timeouts, clone depth 2 (so chains flatten in few steps)."""
    opts = dict(monitors=[ceph.monitors], user=ceph.csi_user, keyringPath=ceph.csi_keyring, pool=ceph.pool,
                cloneDepthLimit=2, connectTimeout=5, opTimeout=5, mounter="fuse")
    opts.update(overrides)
    return RbdBackend("ceph", RbdOptions(**opts), Runtime(DRIVER, "node-1", state_dir, "topology.tessera.csi.dev/node"))
