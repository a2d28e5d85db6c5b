"""Idempotency across pools: a CreateVolume retried with the same name but another `pool` finds the volume the first
call made, wherever it went, and answers ALREADY_EXISTS naming that pool instead of making a second volume."""
from __future__ import annotations

import os

import grpc
import pytest
import rbd
import yaml

from backends.base import object_uuid
from csi._pb import csi_pb2 as pb
from tests.sanity.harness import Client, ServerProcess, mount_cap

pytestmark = pytest.mark.ceph
MIB = 1 << 20
DRIVER = "tessera.csi.dev"


def _request(name: str, pool: str | None = None) -> pb.CreateVolumeRequest:
    params = {"backend": "ceph"}
    if pool:
        params["pool"] = pool
    return pb.CreateVolumeRequest(name=name, capacity_range=pb.CapacityRange(required_bytes=8 * MIB),
                                  volume_capabilities=[mount_cap("ext4")], parameters=params)


@pytest.fixture
def second_pool(ceph_cluster):
    """A second rbd pool on the session cluster, removed afterwards."""
    c = ceph_cluster.cluster
    name = f"tessera-p2-{os.urandom(3).hex()}"
    r = c.rados()
    try:
        c.mon_command(r, "osd pool create", pool=name, pg_num=8, pgp_num=8)
        c.mon_command(r, "osd pool application enable", pool=name, app="rbd")
        with r.open_ioctx(name) as io:
            rbd.RBD().pool_init(io, True)
        yield name
    finally:
        c.mon_command(r, "osd pool delete", pool=name, pool2=name, yes_i_really_really_mean_it=True)
        r.shutdown()


def _server(tmp_path, sub: str, ceph, user: str, keyring: str) -> ServerProcess:
    cfg = tmp_path / f"{sub}.yaml"
    cfg.write_text(yaml.safe_dump({"backends": {"ceph": {
        "type": "rbd", "monitors": [ceph.monitors], "user": user, "keyringPath": keyring, "pool": ceph.pool}}}))
    return ServerProcess(str(tmp_path / sub), config=str(cfg), node_id=sub,
                         extra_args=["--mode", "controller"]).start()


def test_retry_naming_another_pool_answers_already_exists_naming_the_pool(ceph_cluster, second_pool, tmp_path):
    name = f"pools-{os.urandom(3).hex()}"
    image = "tessera-vol-" + object_uuid(DRIVER, name)
    # an admin-keyed controller may use any pool (the least-privilege user of the test cluster has only `rbd`)
    srv = _server(tmp_path, "admin", ceph_cluster, "admin", ceph_cluster.admin_keyring)
    c = Client(srv.endpoint, timeout=60)
    fresh = None
    try:
        vid = c.controller.CreateVolume(_request(name, second_pool), timeout=60).volume.volume_id
        assert vid.endswith(f"{second_pool}.{image}")
        # the same name without the pool parameter (the default pool): the existing volume is found, not doubled
        with pytest.raises(grpc.RpcError) as e:
            c.controller.CreateVolume(_request(name), timeout=60)
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS and second_pool in e.value.details(), \
            e.value.details()
        assert c.controller.CreateVolume(_request(name, second_pool), timeout=60).volume.volume_id == vid
        # a controller that never used that pool (not configured either) finds it too
        fresh = _server(tmp_path, "fresh", ceph_cluster, "admin", ceph_cluster.admin_keyring)
        cf = Client(fresh.endpoint, timeout=60)
        try:
            with pytest.raises(grpc.RpcError) as e:
                cf.controller.CreateVolume(_request(name), timeout=60)
            assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS and second_pool in e.value.details()
        finally:
            cf.close()
        r = ceph_cluster.cluster.rados()
        try:
            with r.open_ioctx(ceph_cluster.pool) as io:
                assert image not in rbd.RBD().list(io)  # no second volume in the default pool
        finally:
            r.shutdown()
        c.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid), timeout=60)
    finally:
        c.close()
        srv.stop()
        if fresh:
            fresh.stop()


def test_pools_the_user_may_not_read_do_not_stop_a_create(ceph_cluster, second_pool, tmp_path):
    """client.csi may use only the `rbd` pool; the other rbd pool of the cluster is skipped, not an error."""
    srv = _server(tmp_path, "csi", ceph_cluster, ceph_cluster.csi_user, ceph_cluster.csi_keyring)
    c = Client(srv.endpoint, timeout=60)
    try:
        vid = c.controller.CreateVolume(_request(f"pools-lp-{os.urandom(3).hex()}"), timeout=60).volume.volume_id
        c.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid), timeout=60)
    finally:
        c.close()
        srv.stop()
