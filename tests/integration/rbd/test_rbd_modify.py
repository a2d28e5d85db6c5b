"""ControllerModifyVolume on RBD: QoS limits as image configuration (backends/rbd_qos.py), checked from outside the
backend with the admin librbd handle (the image's metadata and librbd's effective configuration).

A throttling measurement belongs in bench/, not here: these tests check what librbd is told, not how fast it goes.
"""
from __future__ import annotations

import time
import uuid

import pytest
import rbd

from backends.base import CapabilitySpec
from backends.errors import Aborted, InvalidArgument, NotFound
from csi.config import parse_config
from csi.controllerops import ControllerOps
from csi.locks import volume_key
from csi.registry import Backends

pytestmark = pytest.mark.ceph
MIB = 1 << 20
CAPS = [CapabilitySpec("mount", "SINGLE_NODE_WRITER", "ext4")]
IMAGE_SOURCE = 2  # RBD_CONFIG_SOURCE_IMAGE: the value comes from the image's own metadata


@pytest.fixture
def make_ops(ceph_cluster, state_dir):
    made = []

    def make(mounter: str = "fuse") -> ControllerOps:
        cfg = parse_config({"stateDir": state_dir, "backends": {"ceph": {
            "type": "rbd", "monitors": [ceph_cluster.monitors], "user": ceph_cluster.csi_user,
            "keyringPath": ceph_cluster.csi_keyring, "pool": ceph_cluster.pool, "mounter": mounter}}})
        backends = Backends(cfg, "node-1")
        made.append(backends)
        return ControllerOps(backends)
    yield make
    for b in made:
        b.close()


@pytest.fixture
def ops(make_ops) -> ControllerOps:
    return make_ops()


def image_of(volume_id: str) -> str:
    return volume_id.rpartition(".")[2]


def image_config(io, volume_id: str, key: str) -> tuple[str, str, int]:
    """(metadata value, librbd's effective value, its source) for one option, read by the admin client."""
    with rbd.Image(io, image_of(volume_id), read_only=True) as img:
        try:
            stored = img.metadata_get("conf_" + key)
        except KeyError:
            stored = ""
        entry = next(e for e in img.config_list() if e["name"] == key)
        return stored, entry["value"], entry["source"]


def new_volume(ops: ControllerOps, mutable=None) -> str:
    vid, _ = ops.create_volume(f"pvc-{uuid.uuid4().hex[:8]}", 64 * MIB, 0, CAPS, {}, {}, mutable=mutable or {})
    return vid


def test_modify_sets_image_configuration(ops, admin_io):
    vid = new_volume(ops)
    assert image_config(admin_io, vid, "rbd_qos_iops_limit") == ("", "0", 0)
    vol = ops.modify_volume(vid, {"rbd_qos_iops_limit": "100", "rbd_qos_read_bps_limit": "0020971520"}, {})
    assert image_config(admin_io, vid, "rbd_qos_iops_limit") == ("100", "100", IMAGE_SOURCE)
    assert image_config(admin_io, vid, "rbd_qos_read_bps_limit") == ("20971520", "20971520", IMAGE_SOURCE)
    assert vol.mutable_parameters == {"rbd_qos_iops_limit": "100", "rbd_qos_read_bps_limit": "20971520"}
    # a second modify of one key leaves the other as it was
    ops.modify_volume(vid, {"rbd_qos_iops_limit": "250"}, {})
    assert image_config(admin_io, vid, "rbd_qos_iops_limit")[:2] == ("250", "250")
    assert image_config(admin_io, vid, "rbd_qos_read_bps_limit")[0] == "20971520"
    _, got = ops.get_volume(vid)
    assert got.mutable_parameters == {"rbd_qos_iops_limit": "250", "rbd_qos_read_bps_limit": "20971520"}
    ops.delete_volume(vid, {})


def test_create_with_mutable_parameters(ops, admin_io):
    vid = new_volume(ops, {"rbd_qos_write_iops_limit": "40", "rbd_qos_write_iops_burst": "80"})
    assert image_config(admin_io, vid, "rbd_qos_write_iops_limit")[:2] == ("40", "40")
    assert image_config(admin_io, vid, "rbd_qos_write_iops_burst")[:2] == ("80", "80")
    ops.delete_volume(vid, {})


def test_refused_request_changes_nothing(ops, admin_io):
    vid = new_volume(ops, {"rbd_qos_iops_limit": "100"})
    with pytest.raises(InvalidArgument, match="rbd_qos_no_such"):
        ops.modify_volume(vid, {"rbd_qos_iops_limit": "5", "rbd_qos_no_such": "1"}, {})
    with pytest.raises(InvalidArgument, match="rbd_qos_iops_burst_seconds"):
        ops.modify_volume(vid, {"rbd_qos_iops_limit": "5", "rbd_qos_iops_burst_seconds": "0"}, {})
    with pytest.raises(InvalidArgument, match="rbd_qos_bps_limit"):
        ops.modify_volume(vid, {"rbd_qos_iops_limit": "5", "rbd_qos_bps_limit": "-1"}, {})
    assert image_config(admin_io, vid, "rbd_qos_iops_limit")[:2] == ("100", "100")
    ops.delete_volume(vid, {})


def test_concurrent_operation_on_the_volume_is_aborted(ops, admin_io):
    vid = new_volume(ops)
    with ops.locks.hold(volume_key(vid)):
        with pytest.raises(Aborted):
            ops.modify_volume(vid, {"rbd_qos_iops_limit": "100"}, {})
    assert image_config(admin_io, vid, "rbd_qos_iops_limit")[0] == ""
    ops.modify_volume(vid, {"rbd_qos_iops_limit": "100"}, {})  # once the other operation is done
    assert image_config(admin_io, vid, "rbd_qos_iops_limit")[0] == "100"
    ops.delete_volume(vid, {})


def test_missing_volume_is_not_found(ops):
    vid = new_volume(ops)
    ops.delete_volume(vid, {})
    with pytest.raises(NotFound):
        ops.modify_volume(vid, {"rbd_qos_iops_limit": "100"}, {})


def test_open_librbd_client_sees_the_new_limit(ops, admin_io):
    """A librbd client that has the image open (as rbd-nbd and rbd-fuse do) picks the change up from the header
    notification, without reopening."""
    vid = new_volume(ops)

    def effective(img) -> str:
        return next(e["value"] for e in img.config_list() if e["name"] == "rbd_qos_iops_limit")
    with rbd.Image(admin_io, image_of(vid)) as img:
        assert effective(img) == "0"
        ops.modify_volume(vid, {"rbd_qos_iops_limit": "300"}, {})
        deadline = time.monotonic() + 30  # a bound on the wait, not a speed check
        seen = effective(img)
        while seen != "300" and time.monotonic() < deadline:
            time.sleep(0.2)
            img.stat()  # any call lets librbd run a refresh the notification asked for
            seen = effective(img)
        assert seen == "300"
    ops.delete_volume(vid, {})


@pytest.mark.parametrize("mounter,fragment", [("krbd", "node"), ("nbd", "librbd"), ("fuse", "librbd")])
def test_context_says_who_enforces(make_ops, mounter, fragment):
    ops = make_ops(mounter)
    vid = new_volume(ops)
    _, plain = ops.get_volume(vid)
    assert "qosEnforcement" not in plain.context  # no limit, nothing to say
    vol = ops.modify_volume(vid, {"rbd_qos_iops_limit": "100"}, {})
    assert vol.context["qosEnforcement"].startswith(fragment)
    ops.delete_volume(vid, {})
