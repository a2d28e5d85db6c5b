"""ControllerPublish on RBD against a real Ceph cluster: the records on the image, the spec's refusals, what
ControllerGetVolume and ListVolumes report, and that no record (or any `tessera.*` key) travels into a snapshot or
clone through librbd's copy of the parent's metadata.

Checked from outside the backend where the cluster can tell (the records on the image's id object and the image's
metadata, through an admin handle)."""
from __future__ import annotations

import uuid

import pytest
import rbd

from backends.base import CapabilitySpec, ContentSource, CreateVolumeSpec, object_uuid
from backends.errors import AlreadyExists, FailedPrecondition, NotFound
from backends.rbd import VOL_PREFIX, RbdBackend
from csi.ids import NodeRef

from tests.ceph.rbdutil import records, until_done

pytestmark = pytest.mark.ceph
MIB = 1 << 20
RWO = CapabilitySpec("mount", "SINGLE_NODE_WRITER", "ext4")
ROX = CapabilitySpec("mount", "MULTI_NODE_READER_ONLY", "ext4")
NODE_A, NODE_B = NodeRef("node-a", {"rbd": "1"}), NodeRef("node-b", {"rbd": "1", "zone": "z1"})


def _spec(name: str, size: int = 64 * MIB, source: ContentSource | None = None) -> CreateVolumeSpec:
    return CreateVolumeSpec(name=name, size_bytes=size, limit_bytes=0, parameters={}, secrets={}, capabilities=[RWO],
                            source=source)


def _uniq(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _image(local_id: str) -> str:
    return local_id.rpartition(".")[2]


def _records(io, local_id: str) -> dict[str, str]:
    return {k: v for k, v in records(io, _image(local_id)).items() if k.startswith("tessera.pub.")}


def test_publications_are_recorded_on_the_image_and_a_second_node_is_refused(backend: RbdBackend, admin_io):
    vol = backend.create_volume(_spec(_uniq("pub")))
    assert backend.get_volume(vol.local_id, {}).published_nodes == []
    assert backend.controller_publish(vol.local_id, NODE_A, False, RWO, vol.context, {}) == {}
    [(key, record)] = _records(admin_io, vol.local_id).items()
    assert "node-a" in record and "SINGLE_NODE_WRITER" in record
    assert backend.get_volume(vol.local_id, {}).published_nodes == ["node-a?rbd=1"]
    listed = [v for v in backend.list_volumes({}) if v.local_id == vol.local_id]
    assert [v.published_nodes for v in listed] == [["node-a?rbd=1"]]
    # the same publication again: OK, nothing written
    backend.controller_publish(vol.local_id, NODE_A, False, RWO, vol.context, {})
    assert _records(admin_io, vol.local_id) == {key: record}
    # the same node with another readonly flag: ALREADY_EXISTS (the spec)
    with pytest.raises(AlreadyExists, match="already published to node node-a"):
        backend.controller_publish(vol.local_id, NODE_A, True, RWO, vol.context, {})
    # another node while a single-node mode holds it: FAILED_PRECONDITION naming the holder
    with pytest.raises(FailedPrecondition, match="node node-a"):
        backend.controller_publish(vol.local_id, NODE_B, False, RWO, vol.context, {})
    assert backend.get_volume(vol.local_id, {}).published_nodes == ["node-a?rbd=1"]
    # unpublished there, the other node may have it; its node ID is reported as it came, attributes and all
    backend.controller_unpublish(vol.local_id, NODE_A, {})
    backend.controller_unpublish(vol.local_id, NODE_A, {})  # idempotent
    backend.controller_publish(vol.local_id, NODE_B, False, RWO, vol.context, {})
    assert backend.get_volume(vol.local_id, {}).published_nodes == ["node-b?rbd=1&zone=z1"]
    # no node: unpublished everywhere
    backend.controller_unpublish(vol.local_id, None, {})
    # a node ID no rbd node plugin reports (NodeGetInfo adds rbd=1): the spec's NOT_FOUND, and no record
    with pytest.raises(NotFound, match="does not exist as an rbd node"):
        backend.controller_publish(vol.local_id, NodeRef("node-a"), False, RWO, vol.context, {})
    assert _records(admin_io, vol.local_id) == {}
    until_done(backend.delete_volume, vol.local_id, {})
    # a volume that is gone is unpublished (OK) and cannot be published (NOT_FOUND)
    backend.controller_unpublish(vol.local_id, NODE_A, {})
    with pytest.raises(NotFound):
        backend.controller_publish(vol.local_id, NODE_A, False, RWO, vol.context, {})


def test_readers_on_many_nodes_but_one_writer(backend: RbdBackend, admin_io):
    vol = backend.create_volume(_spec(_uniq("pub-ro")))
    backend.controller_publish(vol.local_id, NODE_A, True, ROX, vol.context, {})
    backend.controller_publish(vol.local_id, NODE_B, True, ROX, vol.context, {})
    assert backend.get_volume(vol.local_id, {}).published_nodes == ["node-a?rbd=1", "node-b?rbd=1&zone=z1"]
    assert len(_records(admin_io, vol.local_id)) == 2
    backend.controller_unpublish(vol.local_id, None, {})
    until_done(backend.delete_volume, vol.local_id, {})


def test_snapshots_and_clones_carry_none_of_their_sources_records(backend: RbdBackend, admin_io):
    """librbd's clone copies the parent's metadata into the child; a published source must not make its snapshot,
    its clone or a restore of that snapshot look published (or refuse their own publication)."""
    src = backend.create_volume(_spec(_uniq("pub-src")))
    backend.controller_publish(src.local_id, NODE_A, False, RWO, src.context, {})
    snap = backend.create_snapshot(src.local_id, _uniq("pub-snap"), {}, {})
    clone = backend.create_volume(_spec(_uniq("pub-clone"), source=ContentSource("volume", src.local_id)))
    restored = backend.create_volume(_spec(_uniq("pub-restored"), 128 * MIB, ContentSource("snapshot", snap.local_id)))
    for local_id in (snap.local_id, clone.local_id, restored.local_id):
        keys = records(admin_io, _image(local_id))
        with rbd.Image(admin_io, _image(local_id), read_only=True) as img:
            keys.update(img.metadata_list())  # nor in the image metadata librbd's clone copies
        assert not [k for k in keys if k.startswith("tessera.pub.")], f"{local_id} inherited {keys}"
        assert keys["tessera.image"] == _image(local_id)
    for vol in (clone, restored):
        assert backend.get_volume(vol.local_id, {}).published_nodes == []
        backend.controller_publish(vol.local_id, NODE_B, False, RWO, vol.context, {})  # not refused for node-a
        backend.controller_unpublish(vol.local_id, None, {})
    backend.controller_unpublish(src.local_id, None, {})
    for vol in (clone, restored):
        until_done(backend.delete_volume, vol.local_id, {})
    until_done(backend.delete_snapshot, snap.local_id, {})
    until_done(backend.delete_volume, src.local_id, {})


def test_a_clone_stopped_before_its_commit_is_not_taken_for_its_source(backend: RbdBackend, admin_io):
    """A create from a volume killed after librbd's clone and before Tessera's commit leaves an image whose
    metadata librbd copied from the source (its name, parameters, ...). The retry must see an unfinished create
    and redo it, not answer the source's metadata (wrong name, no content source, the source's size)."""
    src = backend.create_volume(_spec(_uniq("half-src")))
    name = _uniq("half-clone")
    child = VOL_PREFIX + object_uuid(backend.runtime.driver_name, name)
    with rbd.Image(admin_io, _image(src.local_id)) as p:  # what `_clone` had done when the kill came
        p.create_snap(child)
        rbd.RBD().clone(admin_io, _image(src.local_id), child, admin_io, child, features=p.features())
    vol = backend.create_volume(_spec(name, 128 * MIB, ContentSource("volume", src.local_id)))
    assert _image(vol.local_id) == child
    assert (vol.name, vol.capacity_bytes) == (name, 128 * MIB)
    assert vol.source == ContentSource("volume", src.local_id)
    got = backend.get_volume(vol.local_id, {})
    assert (got.name, got.capacity_bytes, got.source) == (name, 128 * MIB, ContentSource("volume", src.local_id))
    until_done(backend.delete_volume, vol.local_id, {})
    until_done(backend.delete_volume, src.local_id, {})
