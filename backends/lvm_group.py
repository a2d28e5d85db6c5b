"""Group snapshots of the lvm backend (thin pools): every member paused at one instant, each cut as LVM's own thin
snapshot, all resumed.

Pausing: each member staged on this node is used through Tessera's device layer above its LV (backends/lvm_top.py).
Suspending that layer freezes and flushes the filesystem on it and holds every new write; LVM then cuts its ordinary
thin snapshot of the LV below, which it still finds running. All members' layers stay suspended from the first
snapshot to the last, so restored together they show one instant of the write stream. A member attached nowhere on
this node is not being written (the backend is node-local). A member whose LV is open without the layer (staged by a
version before it, or opened by hand) cannot be paused: FAILED_PRECONDITION before anything is paused.

Records live in the members' LV tags, like everything of this backend: each member carries the group's ID, name,
size (member count) and creation time, and `state=pending` until the group's commit. The group exists when all of
its members exist and none is pending; the commit drops `pending` from each member in turn, so a crash before the
last one leaves an unfinished group that lookups and listings do not show and whose retry removes the members and
cuts the group again. A delete removes the members; one stopped half-way leaves an unfinished group that its retry
finishes removing.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Iterable, Mapping, Optional

from .base import GroupSnapshot, object_uuid
from .errors import FailedPrecondition, InvalidArgument, NotFound, listing
from .lvm_volumes import LvInfo, fields_to_tags

if TYPE_CHECKING:
    from .lvm import LvmBackend

GROUP_PREFIX = "tg-"


def group_local_id(driver_name: str, name: str) -> str:
    return GROUP_PREFIX + object_uuid(driver_name, "group/" + name)


def member_local_id(driver_name: str, group_name: str, source_local_id: str, snapshot_prefix: str) -> str:
    """A member's snapshot ID, from the group's name and its source volume (never equal to a CreateSnapshot's)."""
    return snapshot_prefix + object_uuid(driver_name, f"group-member/{group_name}/{source_local_id}")


def _members(backend: "LvmBackend", gid: str) -> list[LvInfo]:
    from .lvm import NS
    return sorted((lv for lv in backend.lvm.list() if backend._mine(lv) and lv.fields(NS).get("group") == gid),
                  key=lambda lv: lv.name)


def whole(members: list[LvInfo]) -> bool:
    """All members of the group exist and the group has committed (see the module doc)."""
    from .lvm import NS
    if not members:
        return False
    fields = [m.fields(NS) for m in members]
    return all(f.get("gsize") == str(len(members)) and f.get("state") != "pending" for f in fields)


def committed_groups(backend: "LvmBackend", lvs: Iterable[LvInfo]) -> set[str]:
    """The IDs of the whole groups among `lvs` (one listing serves every member's visibility)."""
    from .lvm import NS
    by_group: dict[str, list[LvInfo]] = {}
    for lv in lvs:
        gid = lv.fields(NS).get("group")
        if gid and backend._mine(lv):
            by_group.setdefault(gid, []).append(lv)
    return {gid for gid, ms in by_group.items() if whole(ms)}


def load(backend: "LvmBackend", gid: str) -> Optional[GroupSnapshot]:
    from .lvm import NS
    if not gid.startswith(GROUP_PREFIX):
        return None
    members = _members(backend, gid)
    if not whole(members):
        return None
    f = members[0].fields(NS)
    try:
        created = float(f.get("ctime", "0"))
    except ValueError:
        created = 0.0
    return GroupSnapshot(local_id=gid, name=f.get("gname", ""), members=[backend._snapshot(m) for m in members],
                         creation_time=created, parameters={})


def get(backend: "LvmBackend", gid: str) -> GroupSnapshot:
    group = load(backend, gid)
    if group is None:
        raise NotFound(f"group snapshot {backend.name}:{gid} does not exist")
    return group


def create(backend: "LvmBackend", name: str, sources: list[str], parameters: Mapping[str, str]) -> GroupSnapshot:
    from .lvm import NS, PENDING_TAG, SNAPSHOT_PREFIX, VOLUME_PREFIX
    from . import lvm_top
    if parameters:
        raise InvalidArgument(f"the lvm backend takes no group snapshot parameters; got {listing(parameters)}")
    driver = backend.runtime.driver_name
    gid = group_local_id(driver, name)
    existing = load(backend, gid)
    if existing is not None:
        return existing
    for leftover in _members(backend, gid):  # what an earlier attempt of this create left before its commit
        backend.lvm.remove(leftover.name)
    origins = []
    for src in sources:
        lv = backend._find(src, "volume", VOLUME_PREFIX)
        if lv is None:
            raise NotFound(f"source volume {backend.name}:{src} does not exist")
        if lv.open and not lvm_top.present(backend.lvm.vg, src):
            raise FailedPrecondition(
                f"source volume {backend.name}:{src} is in use on this node without Tessera's device layer (staged "
                "by an older version, or opened by hand), so its writes cannot be paused and a group snapshot would "
                "not be write-order consistent; unstage and stage it again (restart its pod), or snapshot it alone")
        origins.append(lv)
    backend._ensure_room(sum(lv.size for lv in origins))
    created = time.time()
    members = [(src, member_local_id(driver, name, src, SNAPSHOT_PREFIX)) for src in sources]
    tags = {mid: fields_to_tags(NS, {"kind": "snapshot", "name": f"{name}/{src}", "of": src,
                                     "ctime": f"{created:.3f}", "group": gid, "gname": name,
                                     "gsize": str(len(members))})
            for src, mid in members}
    with backend._paused(sources):
        for src, mid in members:
            backend.lvm.snapshot(src, mid, tags[mid] + [PENDING_TAG], activation_skip=True)
    for _, mid in members:
        backend._fix_tags(mid, tags[mid])  # a thin snapshot starts with its origin's tags
    for _, mid in members:  # the commit: the group is whole once the last member drops `pending`
        backend.lvm.del_tags(mid, [PENDING_TAG])
    return get(backend, gid)


def delete(backend: "LvmBackend", gid: str) -> None:
    if not gid.startswith(GROUP_PREFIX):
        return
    for member in _members(backend, gid):
        backend.lvm.remove(member.name)
