"""What an operator sees of an RBD backend (usage for the metrics endpoint, orphans), checked against the cluster."""
from __future__ import annotations

import uuid

import pytest
import rbd

from backends.base import CapabilitySpec, CreateVolumeSpec
from tests.ceph.rbdutil import drop_record, make_backend

pytestmark = pytest.mark.ceph
MIB = 1 << 20
CAPS = [CapabilitySpec("mount", "SINGLE_NODE_WRITER", "ext4")]


def _spec(name: str) -> CreateVolumeSpec:
    return CreateVolumeSpec(name=name, size_bytes=16 * MIB, limit_bytes=0, parameters={}, secrets={},
                            capabilities=CAPS)


def test_usage_counts_and_needs_a_mgr_for_pool_figures(fresh_ceph_cluster, state_dir):
    b = make_backend(fresh_ceph_cluster, state_dir)
    try:
        before = b.usage()
        vol = b.create_volume(_spec(f"usage-{uuid.uuid4().hex[:8]}"))
        after = b.usage()
        assert after.volumes == (before.volumes or 0) + 1
        assert after.free_bytes is None and after.total_bytes is None  # no mgr: no guess
        assert any("ceph-mgr" in p for p in after.problems), after.problems
        b.delete_volume(vol.local_id, {})
    finally:
        b.close()


def test_usage_pool_figures_with_a_mgr(ceph_mgr, state_dir):
    b = make_backend(ceph_mgr, state_dir)
    try:
        u = b.usage()
        assert u.problems == []
        assert u.total_bytes is not None and u.free_bytes is not None and 0 < u.free_bytes <= u.total_bytes
        assert 0.0 <= u.gauges["pool_used_percent"] <= 100.0
    finally:
        b.close()


def test_orphans_lists_an_unfinished_create_and_leaves_it(ceph_cluster, state_dir, admin_io):
    b = make_backend(ceph_cluster, state_dir)
    try:
        done = b.create_volume(_spec(f"done-{uuid.uuid4().hex[:8]}"))
        crashed = b.create_volume(_spec(f"crashed-{uuid.uuid4().hex[:8]}"))
        image = crashed.local_id.split(".", 1)[1]
        drop_record(admin_io, image, "tessera.name")  # what a create that died before its commit point leaves
        found = {o.object: o.reason for o in b.orphans()}
        pool = crashed.local_id.split(".", 1)[0]
        assert f"{pool}/{image}" in found and "commit point" in found[f"{pool}/{image}"]
        assert f"{pool}/{done.local_id.split('.', 1)[1]}" not in found
        assert image in rbd.RBD().list(admin_io)  # read-only
        b.delete_volume(done.local_id, {})
        b.delete_volume(crashed.local_id, {})
    finally:
        b.close()
