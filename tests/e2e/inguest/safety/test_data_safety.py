"""Data safety across nodes and tenants, in the real-kernel guest (issue 11): what a user relies on, checked from
outside the plugin.

- A reader-only volume staged by two nodes at once (each node a plugin of its own, with its own device): a write
  through either device fails, nothing can be created in either mount, and the volume's bytes on the storage are
  the same before and after (checksummed there: librbd for RBD, the backing LV for iSCSI).
- A read-write RBD attach while another node holds the image read-write: FAILED_PRECONDITION naming the holder.
- A raw block MULTI_NODE_MULTI_WRITER volume written by both nodes: each sees the other's bytes.
- Thick LVM: a new volume on the extents of a deleted one reads zeros.
"""
from __future__ import annotations

import errno
import os
import subprocess

import grpc
import pytest

from csi._pb import csi_pb2 as pb
from tests.e2e.inguest.safety.env import (MIB, PORTALS, Pair, digest, mount_options, mount_source,
                                          pread_direct, pwrite_direct, write_refused)
from tests.sanity.harness import block_cap, mount_cap

SIZE = 64 * MIB
WRITER = mount_cap("ext4")
READER = mount_cap("ext4", "MULTI_NODE_READER_ONLY")


def _fill_as_writer(p: Pair, vol: pb.Volume, tag: str, pc=None, context=None) -> None:
    """What a first user does: stage read-write on node a, write a file, let go."""
    staging = p.stage(p.a, vol, WRITER, f"{tag}-w", pc, context)
    target = p.publish(p.a, vol, WRITER, staging, f"{tag}-w")
    with open(os.path.join(target, "kept"), "w") as f:
        f.write("written before the readers came")
        f.flush()
        os.fsync(f.fileno())
    p.unpublish(p.a, vol, target)
    p.unstage(p.a, vol, staging)


def _check_reader(p: Pair, node, vol: pb.Volume, staging: str, tag: str) -> str:
    """The staging mount is read-only, nothing can be made in it, a write through its device fails, the data is
    there; also through a read-only publish. Returns the device."""
    dev = mount_source(staging)
    assert dev and dev.startswith("/dev/"), dev
    assert "ro" in mount_options(staging), mount_options(staging)
    with pytest.raises(OSError) as info:
        open(os.path.join(staging, f"new-{node.name}"), "w").close()
    assert info.value.errno == errno.EROFS
    assert write_refused(dev), f"{node.name}: a write through {dev} succeeded"
    target = p.publish(node, vol, READER, staging, tag, readonly=True)
    with open(os.path.join(target, "kept")) as f:
        assert f.read() == "written before the readers came"
    return dev


# ---- RBD (krbd) ----------------------------------------------------------------------------------------------
def _image_digest(ceph_cluster, vol: pb.Volume) -> str:
    import hashlib

    import rbd
    r = ceph_cluster.cluster.rados()
    io = r.open_ioctx(vol.volume_context["pool"])
    try:
        with rbd.Image(io, vol.volume_context["image"], read_only=True) as img:
            h = hashlib.sha256()
            for off in range(0, img.size(), 4 * MIB):
                h.update(img.read(off, 4 * MIB))
            return h.hexdigest()
    finally:
        io.close()
        r.shutdown()


def test_rbd_reader_only_on_two_nodes_never_writes(rbd: Pair, ceph_cluster) -> None:
    vol = rbd.create("ds-rbd-rox", SIZE, WRITER)
    kept = rbd.mark()  # the volume outlives the stages below
    _fill_as_writer(rbd, vol, "rox")
    before = _image_digest(ceph_cluster, vol)
    sa = rbd.stage(rbd.a, vol, READER, "rox-r")
    sb = rbd.stage(rbd.b, vol, READER, "rox-r")
    da = _check_reader(rbd, rbd.a, vol, sa, "rox-r")
    db = _check_reader(rbd, rbd.b, vol, sb, "rox-r")
    assert da != db, "both nodes ended up on one mapping: each node must map the image itself"
    assert rbd.cleanup(kept) == []
    assert _image_digest(ceph_cluster, vol) == before, "a reader-only stage changed the image"


def test_rbd_second_read_write_node_refused_naming_the_holder(rbd: Pair) -> None:
    cap = block_cap()
    vol = rbd.create("ds-rbd-rwo", SIZE, cap)
    sa = rbd.stage(rbd.a, vol, cap, "rwo")
    with pytest.raises(grpc.RpcError) as info:
        rbd.stage(rbd.b, vol, cap, "rwo")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()
    assert "client." in info.value.details(), info.value.details()
    rbd.unstage(rbd.a, vol, sa)
    rbd.stage(rbd.b, vol, cap, "rwo")  # the holder let go: now the other node may write


# ---- iSCSI (LIO) ---------------------------------------------------------------------------------------------
def _via(vol: pb.Volume, portal: str) -> dict:
    """The volume context as a node that logs in through `portal` gets it (one of the backend's portals): one
    guest holds both nodes, and a separate portal gives each its own session and SCSI disk."""
    return {**vol.volume_context, "targetPortals": portal}


def _backing_lv(iscsi_vg, vol: pb.Volume) -> str:
    return f"/dev/{iscsi_vg.name}/{vol.volume_id.split(':', 1)[1]}"


def test_iscsi_reader_only_on_two_nodes_never_writes(iscsi: Pair, iscsi_vg) -> None:
    vol = iscsi.create("ds-iscsi-rox", SIZE, WRITER)
    kept = iscsi.mark()  # the volume outlives the stages below
    pc = iscsi.controller_publish(iscsi.a, vol, WRITER, False)
    _fill_as_writer(iscsi, vol, "rox", pc, _via(vol, PORTALS[0]))
    iscsi.controller_unpublish(iscsi.a, vol)
    before = digest(_backing_lv(iscsi_vg, vol), SIZE)
    pca = iscsi.controller_publish(iscsi.a, vol, READER, True)
    pcb = iscsi.controller_publish(iscsi.b, vol, READER, True)
    sa = iscsi.stage(iscsi.a, vol, READER, "rox-r", pca, _via(vol, PORTALS[0]))
    sb = iscsi.stage(iscsi.b, vol, READER, "rox-r", pcb, _via(vol, PORTALS[1]))
    da = _check_reader(iscsi, iscsi.a, vol, sa, "rox-r")
    db = _check_reader(iscsi, iscsi.b, vol, sb, "rox-r")
    assert os.stat(da).st_rdev != os.stat(db).st_rdev, "both nodes share one SCSI disk"
    assert iscsi.cleanup(kept) == []
    assert digest(_backing_lv(iscsi_vg, vol), SIZE) == before, "a reader-only stage changed the volume"


def test_iscsi_multi_writer_block_written_by_both(iscsi: Pair) -> None:
    cap = block_cap("MULTI_NODE_MULTI_WRITER")
    vol = iscsi.create("ds-iscsi-mw", SIZE, cap)
    # both nodes share this guest's initiator IQN, so one ACL admits both: publish to both before either stages,
    # so that the cleanup (in reverse) logs both out before the ACL goes
    nodes = ((iscsi.a, PORTALS[0]), (iscsi.b, PORTALS[1]))
    pcs = [iscsi.controller_publish(node, vol, cap, False) for node, _ in nodes]
    targets = []
    for (node, portal), pc in zip(nodes, pcs):
        staging = iscsi.stage(node, vol, cap, "mw", pc, _via(vol, portal))
        targets.append(iscsi.publish(node, vol, cap, staging, "mw"))
    ta, tb = targets
    assert os.stat(ta).st_rdev != os.stat(tb).st_rdev
    from_a, from_b = os.urandom(MIB), os.urandom(MIB)
    pwrite_direct(ta, from_a, 0)
    pwrite_direct(tb, from_b, MIB)
    for t in (ta, tb):
        assert pread_direct(t, MIB, 0) == from_a
        assert pread_direct(t, MIB, MIB) == from_b


# ---- thick LVM -----------------------------------------------------------------------------------------------
def _extents(vg: str, lv: str) -> str:
    out = subprocess.run(["lvs", "--noheadings", "-o", "seg_pe_ranges", f"{vg}/{lv}"], capture_output=True, text=True,
                         check=True, env={**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1"}).stdout
    return out.strip()


def test_thick_lvm_new_volume_on_old_extents_reads_zeros(thick: Pair, thick_vg) -> None:
    """Through the raw LV (what the next tenant's device shows): a pattern written over the whole volume, the
    volume deleted, a new one of the same size made on the same extents reads zeros everywhere."""
    cap = block_cap()
    old = thick.create("ds-thick-old", SIZE, cap)
    lv = old.volume_id.split(":", 1)[1]
    thick.stage(thick.a, old, cap, "old")  # activates the LV
    device = f"/dev/{thick_vg.name}/{lv}"
    pattern = os.urandom(MIB)
    for off in range(0, SIZE, MIB):
        pwrite_direct(device, pattern, off)
    assert pread_direct(device, MIB, SIZE - MIB) == pattern
    where = _extents(thick_vg.name, lv)
    assert thick.cleanup() == []  # unstage, delete
    new = thick.create("ds-thick-new", SIZE, cap)
    lv = new.volume_id.split(":", 1)[1]
    assert _extents(thick_vg.name, lv) == where, "the new volume did not get the old one's extents: no proof"
    thick.stage(thick.a, new, cap, "new")
    device = f"/dev/{thick_vg.name}/{lv}"
    zero = bytes(MIB)
    for off in range(0, SIZE, MIB):
        assert pread_direct(device, MIB, off) == zero, f"the new volume shows old bytes at offset {off}"
