"""RBD group snapshots (backends/rbd_group.py) on the test cluster: a group of three images restores to what was
written before the group was cut and not what was written after; members are ordinary snapshots naming their group;
the temporary RBD group never outlives the call; delete removes every member image and the record; a create killed
just before its commit point is cleaned up and cut again by its retry, never leaving half a group."""
from __future__ import annotations

import json
import uuid

import pytest
import rbd

from backends import rbd_group
from backends.base import CapabilitySpec, ContentSource, CreateVolumeSpec
from backends.errors import FailedPrecondition, NotFound
from backends.rbd import RbdBackend

pytestmark = pytest.mark.ceph
MIB = 1 << 20
CAPS = [CapabilitySpec("block", "SINGLE_NODE_WRITER")]


def spec(name: str, source: ContentSource | None = None) -> CreateVolumeSpec:
    return CreateVolumeSpec(name=name, size_bytes=16 * MIB, limit_bytes=0, parameters={}, secrets={},
                            capabilities=CAPS, source=source)


def image(local_id: str) -> str:
    return local_id.rpartition(".")[2]


def write(io, local_id: str, offset: int, data: bytes) -> None:
    with rbd.Image(io, image(local_id)) as img:
        img.write(data, offset)
        img.flush()


def read(io, local_id: str, offset: int, length: int) -> bytes:
    with rbd.Image(io, image(local_id), read_only=True) as img:
        return img.read(offset, length)


def leftovers(io) -> list[str]:
    groups = [g for g in rbd.RBD().group_list(io) if g.startswith(rbd_group.TMP_GROUP_PREFIX)]
    images = [i for i in rbd.RBD().list(io) if i.startswith(rbd_group.TMP_IMAGE_PREFIX)]
    return groups + images


@pytest.fixture
def three(backend: RbdBackend, admin_io):
    tag = uuid.uuid4().hex[:8]
    vols = [backend.create_volume(spec(f"grp-{tag}-{i}")) for i in range(3)]
    for i, v in enumerate(vols):
        write(admin_io, v.local_id, 0, b"before-%d" % i)
        write(admin_io, v.local_id, 9 * MIB, b"tail-before-%d" % i)
    yield vols
    for v in vols:
        backend.delete_volume(v.local_id, {})


def test_members_restore_to_the_instant_of_the_group(backend: RbdBackend, admin_io, three):
    name = f"group-{uuid.uuid4().hex[:8]}"
    group = backend.create_group_snapshot(name, [v.local_id for v in three], {}, {})
    for i, v in enumerate(three):
        write(admin_io, v.local_id, 0, b"AFTER!-%d" % i)
    assert len(group.members) == 3 and group.ready_to_use
    assert not leftovers(admin_io), "the temporary RBD group or copies outlived the create"
    again = backend.create_group_snapshot(name, [v.local_id for v in three], {}, {})
    assert [m.local_id for m in again.members] == [m.local_id for m in group.members]
    assert again.creation_time == group.creation_time
    by_source = {m.source_volume_local_id: m for m in group.members}
    restored = []
    try:
        for i, v in enumerate(three):
            m = by_source[v.local_id]
            assert m.group_local_id == group.local_id
            assert backend.get_snapshot(m.local_id, {}).group_local_id == group.local_id
            r = backend.create_volume(spec(f"restore-{uuid.uuid4().hex[:8]}", ContentSource("snapshot", m.local_id)))
            restored.append(r)
            assert read(admin_io, r.local_id, 0, 8) == b"before-%d" % i
            assert read(admin_io, r.local_id, 9 * MIB, 13) == b"tail-before-%d" % i
        listed = {s.local_id: s for s in backend.list_snapshots({})}
        assert all(listed[m.local_id].group_local_id == group.local_id for m in group.members)
    finally:
        for r in restored:
            backend.delete_volume(r.local_id, {})
    backend.delete_group_snapshot(group.local_id, {})
    backend.delete_group_snapshot(group.local_id, {})  # idempotent
    with pytest.raises(NotFound):
        backend.get_group_snapshot(group.local_id, {})
    for m in group.members:
        with pytest.raises(NotFound):
            backend.get_snapshot(m.local_id, {})
    assert not leftovers(admin_io)


def test_a_create_killed_before_its_commit_is_redone(backend: RbdBackend, admin_io, three, monkeypatch):
    name = f"group-{uuid.uuid4().hex[:8]}"

    class Killed(BaseException):
        pass

    class DyingJson:  # a fake json module for rbd_group alone: the step right before the record is written
        loads = staticmethod(json.loads)

        @staticmethod
        def dumps(*a, **kw):
            raise Killed()
    monkeypatch.setattr(rbd_group, "json", DyingJson)
    with pytest.raises(Killed):
        backend.create_group_snapshot(name, [v.local_id for v in three], {}, {})
    monkeypatch.setattr(rbd_group, "json", json)
    assert leftovers(admin_io), "the simulated kill came after the copies, before the commit"
    gid = rbd_group.group_local_id(backend, name)
    with pytest.raises(NotFound):
        backend.get_group_snapshot(gid, {})
    assert not [s for s in backend.list_snapshots({}) if s.group_local_id == gid], "half a group is visible"
    group = backend.create_group_snapshot(name, [v.local_id for v in three], {}, {})
    assert len(group.members) == 3 and not leftovers(admin_io)
    for i, v in enumerate(three):
        m = [m for m in group.members if m.source_volume_local_id == v.local_id][0]
        assert read(admin_io, m.local_id, 0, 8) == b"before-%d" % i
    backend.delete_group_snapshot(group.local_id, {})
    assert not [i for i in rbd.RBD().list(admin_io) if i in {image(m.local_id) for m in group.members}]


def test_unknown_group(backend: RbdBackend):
    with pytest.raises(NotFound):
        backend.get_group_snapshot(f"{backend.options.pool}.{rbd_group.GROUP_PREFIX}00000000-0000-0000-0000-000000000000", {})
    backend.delete_group_snapshot("nonsense", {})


def test_member_without_exclusive_lock_refused(backend: RbdBackend, admin_io, three):
    plain = backend.create_volume(CreateVolumeSpec(name=f"grp-plain-{uuid.uuid4().hex[:8]}", size_bytes=16 * MIB,
                                                   limit_bytes=0, parameters={"imageFeatures": "layering"},
                                                   secrets={}, capabilities=CAPS))
    try:
        with pytest.raises(FailedPrecondition, match="exclusive-lock"):
            backend.create_group_snapshot(f"group-{uuid.uuid4().hex[:8]}", [three[0].local_id, plain.local_id],
                                          {}, {})
        assert not leftovers(admin_io)
    finally:
        backend.delete_volume(plain.local_id, {})
