"""Where the RBD backend keeps its records of an image, as an operator finds them, and that images committed by an
earlier Tessera (records in the image's metadata, what `rbd image-meta list` shows) keep working after an upgrade:
still volumes, never taken for an unfinished create (a retry would remove it), their records moved to the id object
at the first write. Checked through an admin handle on the real cluster."""
from __future__ import annotations

import json
import uuid

import pytest
import rbd

from backends.base import CapabilitySpec, ContentSource, CreateVolumeSpec, object_uuid
from backends.rbd import FEATURE_NAMES, VOL_PREFIX, RbdBackend, _feature_bits
from csi.ids import NodeRef

from tests.ceph.rbdutil import records, until_done

pytestmark = pytest.mark.ceph
MIB = 1 << 20
RWO = CapabilitySpec("mount", "SINGLE_NODE_WRITER", "ext4")
NODE_A = NodeRef("node-a", {"rbd": "1"})


def _spec(name: str, size: int = 64 * MIB, source: ContentSource | None = None) -> CreateVolumeSpec:
    return CreateVolumeSpec(name=name, size_bytes=size, limit_bytes=0, parameters={}, secrets={}, capabilities=[RWO],
                            source=source)


def _image(local_id: str) -> str:
    return local_id.rpartition(".")[2]


def _image_meta(io, image: str) -> dict[str, str]:
    with rbd.Image(io, image, read_only=True) as img:
        return dict(img.metadata_list())


def test_a_create_commits_its_records_on_the_id_object(backend: RbdBackend, admin_io):
    name = f"rec-{uuid.uuid4().hex[:8]}"
    vol = backend.create_volume(_spec(name))
    image = _image(vol.local_id)
    assert records(admin_io, image) == {"tessera.name": name, "tessera.kind": "volume", "tessera.parameters": "{}",
                                        "tessera.image": image}
    assert not [k for k in _image_meta(admin_io, image) if k.startswith("tessera.")]
    until_done(backend.delete_volume, vol.local_id, {})
    assert records(admin_io, image) == {}  # gone with the image


def test_a_volume_committed_by_an_earlier_version_keeps_working(backend: RbdBackend, admin_io, ceph_cluster):
    """The earlier version's commit: the image created by librbd, then `tessera.kind`, `tessera.parameters`,
    `tessera.name` and `tessera.image` set as image metadata in one step; nothing on the id object."""
    name = f"old-{uuid.uuid4().hex[:8]}"
    image = VOL_PREFIX + object_uuid(backend.runtime.driver_name, name)
    rbd.RBD().create(admin_io, image, 64 * MIB, features=_feature_bits(FEATURE_NAMES))
    with rbd.Image(admin_io, image) as img:
        for k, v in {"kind": "volume", "parameters": json.dumps({}), "name": name, "image": image}.items():
            img.metadata_set("tessera." + k, v)
        image_id = img.id()
    local_id = f"{ceph_cluster.pool}.{image}"
    assert backend.get_volume(local_id, {}).name == name
    assert local_id in {v.local_id for v in backend.list_volumes({})}
    again = backend.create_volume(_spec(name))  # a retry of its create: answered, not redone
    assert (again.local_id, again.name, again.capacity_bytes) == (local_id, name, 64 * MIB)
    with rbd.Image(admin_io, image, read_only=True) as img:
        assert img.id() == image_id, "the committed image was replaced"
    # a clone of it stopped before its commit carries the old records in its copied metadata, naming the parent
    child_name = f"old-clone-{uuid.uuid4().hex[:8]}"
    child = VOL_PREFIX + object_uuid(backend.runtime.driver_name, child_name)
    with rbd.Image(admin_io, image) as p:
        p.create_snap(child)
        rbd.RBD().clone(admin_io, image, child, admin_io, child, features=p.features())
    assert _image_meta(admin_io, child)["tessera.name"] == name
    clone = backend.create_volume(_spec(child_name, source=ContentSource("volume", local_id)))
    assert (_image(clone.local_id), clone.name, clone.source) == (child, child_name, ContentSource("volume", local_id))
    assert backend.get_volume(clone.local_id, {}).name == child_name
    # the first write (a publication) moves the old records to the id object, beside the new one
    backend.controller_publish(local_id, NODE_A, False, RWO, again.context, {})
    moved = records(admin_io, image)
    assert {k: moved.get(k) for k in ("tessera.name", "tessera.kind", "tessera.image")} == {
        "tessera.name": name, "tessera.kind": "volume", "tessera.image": image}
    assert [k for k in moved if k.startswith("tessera.pub.")]
    assert backend.get_volume(local_id, {}).published_nodes == ["node-a?rbd=1"]
    backend.controller_unpublish(local_id, NODE_A, {})
    assert backend.get_volume(local_id, {}).published_nodes == [] and backend.get_volume(local_id, {}).name == name
    until_done(backend.delete_volume, clone.local_id, {})
    until_done(backend.delete_volume, local_id, {})
    assert image not in rbd.RBD().list(admin_io)
