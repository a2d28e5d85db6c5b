"""Helpers shared by RBD tests and benches: an RbdBackend on the test cluster."""
from __future__ import annotations

import time

from backends.base import Runtime
from backends.errors import Aborted
from backends.rbd import RbdBackend, RbdOptions
from tests.ceph.fixtures import CephInfo

DRIVER = "tessera.csi.dev"


def records(io, image: str) -> dict[str, str]:
    """What `rados -p POOL listomapvals rbd_id.IMAGE` shows of Tessera's records (`tessera.*`, prefix kept), read
    with librados directly; {} when the image's id object is gone."""
    import rados
    with rados.ReadOpCtx() as op:
        entries, _ = io.get_omap_vals(op, "", "tessera.", 1000)
        try:
            io.operate_read_op(op, f"rbd_id.{image}")
        except rados.ObjectNotFound:
            return {}
        return {k: v.decode() for k, v in entries}


def drop_record(io, image: str, key: str) -> None:
    """Remove one record (`tessera.name`: what a create that died before its commit point leaves)."""
    import rados
    with rados.WriteOpCtx() as op:
        io.remove_omap_keys(op, (key,))
        io.operate_write_op(op, f"rbd_id.{image}")


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
