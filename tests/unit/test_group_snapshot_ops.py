"""Group snapshots (csi/groupops.py over backends/file_group.py) on the real file backend in a temporary directory:
idempotency by name, the refusals the spec names, member snapshots as ordinary snapshots that go with their group
only, the claims in the lock table, and a create that died before its commit point being redone by its retry.
The volumes here are attached nowhere, so no filesystem is frozen (tests/integration/test_group_snapshot_file.py
freezes mounted ones)."""
from __future__ import annotations

import os

import pytest

from backends import errors as e
from backends.base import CapabilitySpec
from backends.locking import Operation
from csi.config import parse_config
from csi.controllerops import ControllerOps
from csi.groupops import GroupOps
from csi.locks import volume_key
from csi.registry import Backends

MIB = 1 << 20
CAP = [CapabilitySpec("block", "SINGLE_NODE_WRITER")]


@pytest.fixture
def world(tmp_path):
    cfg = parse_config({"stateDir": str(tmp_path / "state"), "defaultBackend": "local",
                        "backends": {n: {"type": "file", "directory": str(tmp_path / n)} for n in ("local", "other")}})
    backends = Backends(cfg, "node-1")
    ops = ControllerOps(backends)
    vols = []
    for i in range(3):
        vid, vol = ops.create_volume(f"vol{i}", 4 * MIB, 0, CAP, {}, {})
        with open(vol.context["path"], "r+b") as f:
            f.write(f"volume {i}".encode())
        vols.append(vid)
    return ops, GroupOps(backends, ops.locks), vols


def test_create_is_idempotent_and_members_are_snapshots(world):
    ops, gops, vols = world
    gid, group = gops.create("g1", vols, {}, {})
    again_id, again = gops.create("g1", list(reversed(vols)), {}, {})
    assert again_id == gid and again.creation_time == group.creation_time
    assert [m.local_id for m in again.members] == [m.local_id for m in group.members]
    assert group.ready_to_use and len(group.members) == 3
    listed = {sid: s for sid, s in ops.list_snapshots(0, "").entries}
    for m in group.members:
        sid = f"local:{m.local_id}"
        assert listed[sid].group_local_id == gid.partition(":")[2]
    restored = []
    for i, m in enumerate(group.members):
        vid, vol = ops.create_volume(f"r{i}", 4 * MIB, 0, CAP, {}, {}, source=("snapshot", f"local:{m.local_id}"))
        with open(vol.context["path"], "rb") as f:
            restored.append(f.read(8))
    assert sorted(restored) == [b"volume 0", b"volume 1", b"volume 2"]


def test_same_name_other_sources_already_exists(world):
    _, gops, vols = world
    gops.create("g1", vols, {}, {})
    with pytest.raises(e.AlreadyExists):
        gops.create("g1", vols[:2], {}, {})


@pytest.mark.parametrize("sources, error", [
    ([], e.InvalidArgument), (["local:vol-00000000-0000-0000-0000-000000000000"], e.NotFound),
    (["nosuch:vol-1"], e.NotFound), ([""], e.InvalidArgument)])
def test_refusals(world, sources, error):
    _, gops, _ = world
    with pytest.raises(error):
        gops.create("bad", sources, {}, {})


def test_same_volume_twice_and_mixed_backends_invalid(world):
    ops, gops, vols = world
    with pytest.raises(e.InvalidArgument, match="more than once"):
        gops.create("twice", [vols[0], vols[0]], {}, {})
    other, _ = ops.create_volume("elsewhere", 4 * MIB, 0, CAP, {"backend": "other"}, {})
    with pytest.raises(e.InvalidArgument, match="different backends"):
        gops.create("mixed", [vols[0], other], {}, {})


def test_member_goes_with_its_group_only(world):
    ops, gops, vols = world
    gid, group = gops.create("g1", vols, {}, {})
    member = f"local:{group.members[0].local_id}"
    with pytest.raises(e.InvalidArgument, match="part of group snapshot"):
        ops.delete_snapshot(member, {})
    with pytest.raises(e.InvalidArgument, match="do not match"):
        gops.delete(gid, [member], {})
    with pytest.raises(e.InvalidArgument, match="do not match"):
        gops.get(gid, [member], {})
    gops.delete(gid, [f"local:{m.local_id}" for m in group.members], {})
    with pytest.raises(e.NotFound):
        gops.get(gid, [], {})
    with pytest.raises(e.NotFound):
        ops.get_snapshot(member)
    gops.delete(gid, [], {})  # idempotent
    gops.delete("local:group-00000000-0000-0000-0000-000000000000", [], {})
    gops.delete("not an id", [], {})


def test_claims_conflict_with_volume_delete(world):
    ops, gops, vols = world
    with ops.locks.operation(Operation("DeleteVolume", vols[1]), exclusive=[volume_key(vols[1])]):
        with pytest.raises(e.Aborted, match="DeleteVolume"):
            gops.create("g1", vols, {}, {})
    gid, group = gops.create("g1", vols, {}, {})
    member = f"local:{group.members[0].local_id}"
    with ops.locks.operation(Operation("CreateVolume", "r"), shared=["snapshot/" + member]):
        with pytest.raises(e.Aborted, match="CreateVolume"):
            gops.delete(gid, [], {})


def test_a_create_that_died_before_its_commit_is_redone(world):
    ops, gops, vols = world
    gid, group = gops.create("g1", vols, {}, {})
    backend = ops.backends.for_id("local", "")
    record = os.path.join(backend.group_dir, gid.partition(":")[2][len("group-"):] + ".json")
    os.unlink(record)  # the state a kill -9 between the members' records and the group's record leaves
    with pytest.raises(e.NotFound):
        gops.get(gid, [], {})
    assert not [s for _, s in ops.list_snapshots(0, "").entries if s.group_local_id], \
        "members of an uncommitted group are not snapshots yet"
    with pytest.raises(e.NotFound):
        ops.create_volume("r", 4 * MIB, 0, CAP, {}, {}, source=("snapshot", f"local:{group.members[0].local_id}"))
    again_id, again = gops.create("g1", vols, {}, {})
    assert again_id == gid and len(again.members) == 3 and again.ready_to_use
