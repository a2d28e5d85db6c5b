"""Changed-block tracking on the RBD backend, through the real server on the test Ceph cluster: known blocks
written through the staged raw block device (the fuse mounter: rbd-fuse + a loop device, as the host has no rbd
module), two snapshots, and GetMetadataAllocated / GetMetadataDelta must name exactly the written blocks.

Granularity (README, "Snapshot metadata"): allocated extents are whole RADOS objects (4 MiB), answered from the
object maps with fast-diff and by listing each object without it; the delta is in 64 KiB blocks (a block comparison
over the allocated objects of both snapshots)."""
from __future__ import annotations

import os
import time
import uuid

import grpc
import pytest
import yaml

from csi._pb import csi_pb2 as pb
from tests.ceph.fixtures import CephInfo
from tests.integration.snapmeta import (BEFORE, BETWEEN, BLOCK, SIZE, Metadata, check_paging, flat, make_scenario,
                                        rounded, write_blocks)
from tests.sanity.harness import MIB, PLUGIN, ServerProcess, block_cap

pytestmark = pytest.mark.ceph
C = grpc.StatusCode
OBJECT = 4 * MIB  # the cluster's default object size, which Tessera's images use

FEATURES = {
    # default image features (layering, exclusive-lock, object-map, fast-diff, deep-flatten): the object maps answer
    "fast-diff": {},
    # no object map: librbd lists each object's snapshots instead
    "no-object-map": {"imageFeatures": "layering,exclusive-lock"},
}


# flattenPolicy: `depth` keeps snapshot images as clones of the volume (reads go through the parent); `always`
# flattens each snapshot image at once (its own objects, copied up from the volume)
@pytest.fixture(scope="module", params=["depth", "always"], ids=["clone", "flattened"])
def server(ceph_cluster: CephInfo, tmp_path_factory, request):
    workdir = str(tmp_path_factory.mktemp("rbd-snapmeta"))
    config = os.path.join(workdir, "config.yaml")
    with open(config, "w") as f:
        yaml.safe_dump({"backends": {"ceph": {
            "type": "rbd", "monitors": [ceph_cluster.monitors], "user": ceph_cluster.csi_user,
            "keyringPath": ceph_cluster.csi_keyring, "pool": ceph_cluster.pool, "mounter": "fuse",
            "flattenPolicy": request.param, "connectTimeout": 10, "opTimeout": 20}}}, f)
    srv = ServerProcess(os.path.join(workdir, "srv"), config=config, node_id="cbt-rbd-node").start()
    yield srv
    rc = srv.stop()
    assert rc == 0, f"server exit code {rc} after SIGTERM:\n{srv.log_tail()}"


def wait_ready(client, snapshot_id: str, attempts: int = 600) -> None:
    """Until GetSnapshot says ready_to_use: with flattenPolicy always, when the background flatten has finished (the
    metadata is then read from the flattened image, and no flatten is left to meet the test's cleanup)."""
    for _ in range(attempts):
        if client.controller.GetSnapshot(pb.GetSnapshotRequest(snapshot_id=snapshot_id), timeout=60).snapshot.ready_to_use:
            return
        time.sleep(0.2)
    raise AssertionError(f"snapshot {snapshot_id} never became ready_to_use")


def test_capability_advertised(client):
    assert PLUGIN.Value("SNAPSHOT_METADATA_SERVICE") in client.plugin_caps()


@pytest.mark.parametrize("features", list(FEATURES), ids=list(FEATURES))
def test_allocated_delta_and_paging(client, ledger, dirs, features):
    sc = make_scenario(ledger, dirs, {"backend": "ceph", **FEATURES[features]}, prefix="cbt-rbd")
    for snap in (sc.first, sc.second, sc.other):
        wait_ready(client, snap.snapshot_id)
    md = Metadata(client)
    messages, capacity = md.allocated(sc.first.snapshot_id)
    assert capacity == SIZE
    assert flat(messages) == rounded(BEFORE, OBJECT)
    messages, capacity = md.allocated(sc.second.snapshot_id)
    assert capacity == SIZE
    assert flat(messages) == rounded(BEFORE + BETWEEN, OBJECT)

    messages, capacity = md.delta(sc.first.snapshot_id, sc.second.snapshot_id)
    assert capacity == SIZE
    expected = rounded(BETWEEN, BLOCK)
    assert flat(messages) == expected
    messages, _ = md.delta(sc.first.snapshot_id, sc.second.snapshot_id, max_results=1)
    assert [m for m in messages if m] == [[r] for r in expected]
    messages, _ = md.delta(sc.first.snapshot_id, sc.second.snapshot_id, start=expected[0][0] + expected[0][1])
    assert flat(messages) == expected[1:]
    check_paging(md, sc.second.snapshot_id, rounded(BEFORE + BETWEEN, OBJECT))

    err = md.delta_code(pb.GetMetadataDeltaRequest(base_snapshot_id=sc.first.snapshot_id,
                                                   target_snapshot_id=sc.other.snapshot_id))
    assert err.code() == C.INVALID_ARGUMENT, err.details()
    assert md.allocated_code(pb.GetMetadataAllocatedRequest(snapshot_id=sc.first.snapshot_id,
                                                            starting_offset=SIZE + 1)).code() == C.OUT_OF_RANGE


def test_unknown_snapshots_not_found(client):
    md = Metadata(client)
    for unknown in ("ceph:rbd.tessera-snap-00000000-0000-0000-0000-000000000000", "ceph:vol-1", "fake-snapshot-id"):
        assert md.allocated_code(pb.GetMetadataAllocatedRequest(snapshot_id=unknown)).code() == C.NOT_FOUND
        assert md.delta_code(pb.GetMetadataDeltaRequest(base_snapshot_id=unknown,
                                                        target_snapshot_id=unknown)).code() == C.NOT_FOUND


def test_delta_across_an_expansion(client, ledger, dirs):
    """A volume grown between the snapshots: the delta covers the target's size, and a block written past the
    base's end is changed; the grown part nobody wrote is not."""
    vol = ledger.create_volume(pb.CreateVolumeRequest(
        name=f"cbt-grow-{uuid.uuid4().hex[:8]}", volume_capabilities=[block_cap()], parameters={"backend": "ceph"},
        capacity_range=pb.CapacityRange(required_bytes=SIZE)))
    write_blocks(ledger, dirs, vol, [(0, BLOCK)], 7)
    base = ledger.create_snapshot(pb.CreateSnapshotRequest(source_volume_id=vol.volume_id,
                                                           name=f"cbt-grow-{uuid.uuid4().hex[:8]}"))
    grown = client.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=2 * SIZE),
        volume_capability=block_cap()), timeout=120)
    assert grown.capacity_bytes == 2 * SIZE
    write_blocks(ledger, dirs, vol, [(SIZE + 3 * BLOCK, 10)], 8)
    target = ledger.create_snapshot(pb.CreateSnapshotRequest(source_volume_id=vol.volume_id,
                                                             name=f"cbt-grow-{uuid.uuid4().hex[:8]}"))
    for snap in (base, target):
        wait_ready(client, snap.snapshot_id)
    messages, capacity = Metadata(client).delta(base.snapshot_id, target.snapshot_id)
    assert capacity == 2 * SIZE
    assert flat(messages) == [(SIZE + 3 * BLOCK, BLOCK)]
