"""Node side of the RBD backend on the host: the `fuse` mounter (rbd-fuse + loop device). krbd and rbd-nbd need
kernel modules the host lacks; they are exercised inside the real-kernel guest (tests/e2e)."""
from __future__ import annotations

import os
import stat
import uuid

import pytest
import rbd

from backends.base import Attachment, CapabilitySpec, CreateVolumeSpec
from backends.rbd import RbdBackend
from backends.util import run

pytestmark = pytest.mark.ceph
MIB = 1 << 20


def _size(dev: str) -> int:
    return int(run(["blockdev", "--getsize64", dev]).stdout)


def _mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def test_fuse_attach_write_expand_detach(backend: RbdBackend, admin_io):
    vol = backend.create_volume(CreateVolumeSpec(f"node-{uuid.uuid4().hex[:8]}", 64 * MIB, 0, {}, {},
                                                 [CapabilitySpec("block", "SINGLE_NODE_WRITER")]))
    att = backend.node_attach(vol.local_id, vol.context, {}, {})
    try:
        assert stat.S_ISBLK(os.stat(att.device).st_mode)
        assert _size(att.device) == 64 * MIB
        # idempotent: a second attach returns the same device
        assert backend.node_attach(vol.local_id, vol.context, {}, {}).device == att.device
        pattern = os.urandom(MIB)
        fd = os.open(att.device, os.O_WRONLY)
        try:
            os.pwrite(fd, pattern, 3 * MIB)
            os.fsync(fd)
        finally:
            os.close(fd)
        with rbd.Image(admin_io, vol.context["image"], read_only=True) as img:
            assert img.read(3 * MIB, MIB) == pattern  # the bytes reached the cluster
        # online growth: controller resize, then the node refresh makes the kernel see it
        backend.expand_volume(vol.local_id, 128 * MIB, {})
        backend.node_refresh_size(vol.local_id, att)
        assert _size(att.device) == 128 * MIB
        # a volume attached on a node cannot be deleted under it
        from backends.errors import InUse
        with pytest.raises(InUse):
            backend.delete_volume(vol.local_id, {})
    finally:
        backend.node_detach(vol.local_id, att)
    assert not _mounted(att.data["mountpoint"])
    # detach again, and detach from a record made before a reboot, are both success
    backend.node_detach(vol.local_id, att)
    backend.node_detach(vol.local_id, Attachment(device="/dev/loop-gone", data=dict(att.data)))
    backend.delete_volume(vol.local_id, {})
    assert vol.context["image"] not in rbd.RBD().list(admin_io)


def test_fuse_attach_with_secrets_and_filesystem(ceph_cluster, state_dir, admin_io):
    """Credentials from node-stage secrets only (no key in the config); a filesystem made on the device is what
    a restored snapshot sees."""
    from tests.ceph.rbdutil import make_backend
    b = make_backend(ceph_cluster, state_dir, keyringPath=None)
    secrets = {"userID": ceph_cluster.csi_user, "userKey": ceph_cluster.csi_key}
    vol = b.create_volume(CreateVolumeSpec(f"fs-{uuid.uuid4().hex[:8]}", 64 * MIB, 0, {}, secrets,
                                           [CapabilitySpec("mount", "SINGLE_NODE_WRITER", "ext4")]))
    att = b.node_attach(vol.local_id, vol.context, {}, secrets)
    try:
        run(["mkfs.ext4", "-q", "-L", "tessera-rbd", att.device])
    finally:
        b.node_detach(vol.local_id, att)
    snap = b.create_snapshot(vol.local_id, f"s-{uuid.uuid4().hex[:8]}", {}, secrets)
    from backends.base import ContentSource
    restored = b.create_volume(CreateVolumeSpec(f"r-{uuid.uuid4().hex[:8]}", 64 * MIB, 0, {}, secrets,
                                                [CapabilitySpec("mount", "SINGLE_NODE_WRITER", "ext4")],
                                                ContentSource("snapshot", snap.local_id)))
    att2 = b.node_attach(restored.local_id, restored.context, {}, secrets)
    try:
        assert run(["blkid", "-o", "value", "-s", "LABEL", att2.device]).stdout.strip() == "tessera-rbd"
    finally:
        b.node_detach(restored.local_id, att2)
    from tests.ceph.rbdutil import until_done
    for lid in (restored.local_id, vol.local_id):
        until_done(b.delete_volume, lid, secrets)
    until_done(b.delete_snapshot, snap.local_id, secrets)  # ABORTED while the flatten its source's delete queued runs
    # the key file the node wrote for rbd-fuse is private
    keyfiles = [f for f in os.listdir(os.path.join(state_dir, "rbd", "ceph")) if f.startswith("key-")]
    assert keyfiles and all(os.stat(os.path.join(state_dir, "rbd", "ceph", f)).st_mode & 0o077 == 0 for f in keyfiles)
    b.close()


def _vol(b: RbdBackend, mode: str = "SINGLE_NODE_WRITER"):
    return b.create_volume(CreateVolumeSpec(f"ds-{uuid.uuid4().hex[:8]}", 64 * MIB, 0, {}, {},
                                            [CapabilitySpec("block", mode)]))


def test_reader_only_attach_refuses_writes(backend: RbdBackend, admin_io):
    """A reader-only attach is read-only at the device: a write through it fails and the image is unchanged."""
    vol = _vol(backend, "MULTI_NODE_READER_ONLY")
    att = backend.node_attach(vol.local_id, vol.context, {}, {}, readonly=True)
    try:
        with pytest.raises(OSError):
            fd = os.open(att.device, os.O_WRONLY)
            try:
                os.pwrite(fd, b"x" * 4096, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
        with rbd.Image(admin_io, vol.context["image"], read_only=True) as img:
            assert img.read(0, 4096) == bytes(4096)
    finally:
        backend.node_detach(vol.local_id, att)
    backend.delete_volume(vol.local_id, {})


def test_second_writer_refused_naming_the_holder(ceph_cluster, backend: RbdBackend, tmp_path):
    """Another node (a second plugin with its own state) attaching read-write while the first holds the image
    read-write: FAILED_PRECONDITION naming the watcher; once the first lets go, it works."""
    from backends.errors import FailedPrecondition
    from tests.ceph.rbdutil import make_backend
    other = make_backend(ceph_cluster, str(tmp_path / "node-b"))
    vol = _vol(backend)
    att = backend.node_attach(vol.local_id, vol.context, {}, {})
    try:
        with pytest.raises(FailedPrecondition) as info:
            other.node_attach(vol.local_id, vol.context, {}, {})
        assert "client." in str(info.value) and vol.context["image"] in str(info.value)
    finally:
        backend.node_detach(vol.local_id, att)
    att2 = other.node_attach(vol.local_id, vol.context, {}, {})
    other.node_detach(vol.local_id, att2)
    other.close()
    backend.delete_volume(vol.local_id, {})


def test_a_passing_read_write_open_is_not_a_writer(backend: RbdBackend, admin_io):
    """A client that opens the image read-write for a moment (what librbd does to a clone's parent when a controller
    flattens or deletes a snapshot of it) is not a second writer: the attach waits it out and succeeds."""
    import threading
    vol = _vol(backend)
    opened, done = threading.Event(), threading.Event()

    def passing_open() -> None:
        with rbd.Image(admin_io, vol.context["image"]):  # read-write: a watch on the header
            opened.set()
            done.wait(1.5)
    t = threading.Thread(target=passing_open)
    t.start()
    try:
        assert opened.wait(10)
        att = backend.node_attach(vol.local_id, vol.context, {}, {})  # FAILED_PRECONDITION without the wait
        backend.node_detach(vol.local_id, att)
    finally:
        done.set()
        t.join()
    backend.delete_volume(vol.local_id, {})


@pytest.mark.parametrize("field,value", [("pool", "other-pool"), ("pool", "-x"), ("image", "--help"),
                                         ("image", "a/b"), ("mounter", "sh")])
def test_static_context_checked_before_use(backend: RbdBackend, field: str, value: str):
    """A static PV's context cannot name a pool the backend is not configured for, nor a name Ceph would not
    accept (or a tool would read as an option): INVALID_ARGUMENT, nothing mapped."""
    from backends.errors import InvalidArgument
    ctx = {"pool": backend.options.pool, "image": "tessera-vol-x", "mounter": "fuse", field: value}
    with pytest.raises(InvalidArgument):
        backend.node_attach(f"{backend.options.pool}.tessera-vol-x", ctx, {}, {})
