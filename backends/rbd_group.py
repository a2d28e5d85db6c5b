"""Group snapshots of the RBD backend: one RBD group snapshot of every member image, through a temporary RBD group.

Why an RBD group: librbd cuts a group snapshot by taking every member image's exclusive lock (clients, krbd
included, hand it over and hold their writes) and snapshotting them all before letting go, so the members show one
instant of the write stream — the crash consistency the spec asks for. The member images may belong to no group,
so a temporary group (`tessera-tmpgroup-<uuid>`) holds them for the cut and is removed afterwards.

Each member then becomes an ordinary Tessera snapshot image (`tessera-snap-<uuid>` in its source's pool, with the
usual Tessera records, backends/rbd_records.py, plus `group`), so CreateVolume, ListSnapshots and GetSnapshot
treat it like any other.
On pacific, librbd clones only from snapshots in the user namespace and a group snapshot's per-image snapshots are
in the group namespace, so the member is a deep copy of the image *at the group snapshot* (opened by snapshot id),
made under a temporary name, stripped of the metadata the copy carried over and renamed into place. A cluster
whose librbd clones by snapshot id (reef) could clone instead: planned, not built.

Records: `tessera_group.<uuid>` in the backend's default pool holds the group (name, parameters, creation time,
members) and is the commit point, written after every member image exists and before their own records are. A retry
after a crash: with the record, commit what members still lack their records and drop the temporary group
(completes); without it, remove leftover member images and the temporary group and cut the group again (cleans up).
A delete removes the members first and the record last.
"""
from __future__ import annotations

import contextlib
import json
import time
from typing import TYPE_CHECKING, Any, Mapping, Optional

from .base import GroupSnapshot, Snapshot, object_uuid
from .errors import FailedPrecondition, InvalidArgument, NotFound

if TYPE_CHECKING:
    from .rbd import RbdBackend, _Conn

GROUP_PREFIX = "tessera-group-"
TMP_GROUP_PREFIX = "tessera-tmpgroup-"
TMP_IMAGE_PREFIX = "tessera-gtmp-"
RECORD_PREFIX = "tessera_group."
GROUP_SNAP = "tessera-group-snapshot"


def _uuid(driver: str, name: str) -> str:
    return object_uuid(driver, "group/" + name)


def group_local_id(backend: "RbdBackend", name: str) -> str:
    return f"{backend.options.pool}.{GROUP_PREFIX}{_uuid(backend.runtime.driver_name, name)}"


def _split_group(local_id: str) -> Optional[tuple[str, str]]:
    """(pool of the record, group uuid), or None for an ID this backend could not have made."""
    from .rbd import POOL_RE
    pool, _, rest = local_id.rpartition(".")
    if not pool or not POOL_RE.match(pool) or not rest.startswith(GROUP_PREFIX):
        return None
    return pool, rest[len(GROUP_PREFIX):]


def _member_uuid(driver: str, group_name: str, source_local_id: str) -> str:
    return object_uuid(driver, f"group-member/{group_name}/{source_local_id}")


def _read_record(io: Any, guuid: str) -> Optional[dict]:
    import rados
    try:
        raw = io.read(RECORD_PREFIX + guuid, 1 << 20)
    except rados.ObjectNotFound:
        return None
    return json.loads(raw.decode()) if raw else None


def _drop_tmp_group(io: Any, guuid: str) -> None:
    """Remove the temporary RBD group and its snapshot (the member images stay; they leave the group)."""
    import rbd
    name = TMP_GROUP_PREFIX + guuid
    if name not in list(rbd.RBD().group_list(io)):
        return
    g = rbd.Group(io, name)
    for s in list(g.list_snaps()):
        with contextlib.suppress(rbd.ImageNotFound, rbd.ObjectNotFound):
            g.remove_snap(s["name"])
    with contextlib.suppress(rbd.ImageNotFound, rbd.ObjectNotFound):
        rbd.RBD().group_remove(io, name)


def _group_snap_id(img: Any, group_name: str) -> int:
    import rbd
    for s in img.list_snaps():
        g = s.get("group") or {}
        if s.get("namespace") == rbd.RBD_SNAP_NAMESPACE_TYPE_GROUP and g.get("name") == group_name \
                and g.get("snap_name") == GROUP_SNAP:
            return s["id"]
    raise FailedPrecondition(f"the group snapshot of image {img.get_name()} is missing right after it was cut")


def _members(backend: "RbdBackend", name: str, sources: list[str]) -> list[tuple[str, str, str, str]]:
    """(source local id, pool, source image, member uuid) for every source."""
    from .rbd import VOL_PREFIX
    out = []
    for src in sources:
        parsed = backend._split(src, VOL_PREFIX)
        if parsed is None:
            raise NotFound(f"source volume {backend.name}:{src} does not exist")
        out.append((src, parsed[0], parsed[1], _member_uuid(backend.runtime.driver_name, name, src)))
    return out


def create(backend: "RbdBackend", name: str, sources: list[str], parameters: Mapping[str, str],
           secrets: Mapping[str, str]) -> GroupSnapshot:
    from .rbd import SNAP_PREFIX
    if parameters:
        raise InvalidArgument(f"the rbd backend takes no group snapshot parameters; got {', '.join(sorted(parameters))}")
    guuid = _uuid(backend.runtime.driver_name, name)
    gid = group_local_id(backend, name)
    members = _members(backend, name, sources)
    conn = backend._conn(secrets)
    with backend._ceph(f"create group snapshot {name!r}", conn):
        io = conn.ioctx(backend.options.pool)
        record = _read_record(io, guuid)
        if record is None:
            for _, pool, _, mu in members:  # what an earlier attempt left before the commit point
                for image in (SNAP_PREFIX + mu, TMP_IMAGE_PREFIX + mu):
                    if backend._open(conn, pool, image) is not None:
                        backend._remove(conn, pool, image, f"unfinished group member {pool}/{image}", secrets)
            _drop_tmp_group(io, guuid)
            record = _cut(backend, conn, io, name, guuid, members, parameters)
        _finish(backend, conn, io, gid, guuid, record)
    return get(backend, gid, secrets)


def _cut(backend: "RbdBackend", conn: "_Conn", io: Any, name: str, guuid: str,
         members: list[tuple[str, str, str, str]], parameters: Mapping[str, str]) -> dict:
    import rbd
    from .rbd import SNAP_PREFIX
    for src, pool, image, _ in members:
        img = backend._open(conn, pool, image)
        if img is None:
            raise NotFound(f"source volume {backend.name}:{src} does not exist")
        with img:
            if "name" not in backend._meta(conn.ioctx(pool), img):
                raise NotFound(f"source volume {backend.name}:{src} does not exist")
            if not img.features() & rbd.RBD_FEATURE_EXCLUSIVE_LOCK:
                raise FailedPrecondition(f"source volume {backend.name}:{src} has no exclusive-lock feature: librbd "
                                         "pauses a member's writers for a group snapshot through that lock, so "
                                         "without it the group could not be consistent (imageFeatures)")
    tmp = TMP_GROUP_PREFIX + guuid
    rbd.RBD().group_create(io, tmp)
    group = rbd.Group(io, tmp)
    for src, pool, image, _ in members:
        try:
            group.add_image(conn.ioctx(pool), image)
        except rbd.ImageExists:
            raise FailedPrecondition(f"source volume {backend.name}:{src} already belongs to an RBD group; an image "
                                     "can be in one group only, so Tessera cannot cut a group snapshot of it") from None
    group.create_snap(GROUP_SNAP)  # the instant: every member's exclusive lock taken, all snapshotted, released
    created = time.time()
    for src, pool, image, mu in members:
        pio = conn.ioctx(pool)
        tmp_image = TMP_IMAGE_PREFIX + mu
        with rbd.Image(pio, image, read_only=True) as s:
            s.set_snap_by_id(_group_snap_id(s, tmp))
            data_pool_id = s.data_pool_id()
            data_pool = None
            if data_pool_id >= 0 and data_pool_id != pio.get_pool_id():
                data_pool = conn.rados.pool_reverse_lookup(data_pool_id)
            # pacific's deep copy from a snapshot aborts the process (a librbd assertion in the object map's
            # snapshot rollback) when the copy has an object map: copy without it, then enable and rebuild it
            maps = s.features() & (rbd.RBD_FEATURE_OBJECT_MAP | rbd.RBD_FEATURE_FAST_DIFF)
            kw = {"features": s.features() & ~maps}
            if data_pool:
                kw["data_pool"] = data_pool
            s.deep_copy(pio, tmp_image, **kw)
        with rbd.Image(pio, tmp_image) as t:
            for key, _ in list(t.metadata_list()):  # the copy carried the source's metadata (its name, QoS)
                t.metadata_remove(key)
            if maps:
                t.update_features(maps, True)
                t.rebuild_object_map()
        rbd.RBD().rename(pio, tmp_image, SNAP_PREFIX + mu)
    record = {"name": name, "parameters": dict(parameters), "created": created,
              "members": [{"snapshot": f"{pool}.{SNAP_PREFIX}{mu}", "source_volume": src}
                          for src, pool, _, mu in members]}
    io.write_full(RECORD_PREFIX + guuid, json.dumps(record).encode())  # the commit point
    return record


def _finish(backend: "RbdBackend", conn: "_Conn", io: Any, gid: str, guuid: str, record: dict) -> None:
    """Give every member its snapshot records (naming the group) and drop the temporary group: both idempotent."""
    from .rbd import SNAP_PREFIX
    for m in record["members"]:
        parsed = backend._split(m["snapshot"], SNAP_PREFIX)
        if parsed is None:
            continue
        img = backend._open(conn, *parsed)
        if img is None:
            continue
        with img:
            if "name" in backend._meta(conn.ioctx(parsed[0]), img):
                continue
            depth = backend._depth(conn, img)
        backend._commit(conn.ioctx(parsed[0]), parsed[1], {
            "kind": "snapshot", "source_volume": m["source_volume"], "created": repr(record["created"]),
            "name": f"{record['name']}/{m['source_volume']}", "depth": str(depth), "group": gid})
    _drop_tmp_group(io, guuid)


def get(backend: "RbdBackend", local_id: str, secrets: Mapping[str, str]) -> GroupSnapshot:
    parsed = _split_group(local_id)
    if parsed is None:
        raise NotFound(f"group snapshot {backend.name}:{local_id} does not exist")
    conn = backend._conn(secrets)
    with backend._ceph(f"get group snapshot {local_id}", conn):
        try:
            io = conn.ioctx(parsed[0])
        except NotFound:
            raise NotFound(f"group snapshot {backend.name}:{local_id} does not exist") from None
        record = _read_record(io, parsed[1])
    if record is None:
        raise NotFound(f"group snapshot {backend.name}:{local_id} does not exist")
    members: list[Snapshot] = []
    for m in record["members"]:
        try:
            members.append(backend.get_snapshot(m["snapshot"], secrets))
        except NotFound:
            pass  # a delete that stopped half-way: its retry removes the rest
    return GroupSnapshot(local_id=local_id, name=record["name"], members=members, creation_time=record["created"],
                         parameters=record.get("parameters", {}))


def delete(backend: "RbdBackend", local_id: str, secrets: Mapping[str, str]) -> None:
    import rados
    from .rbd import SNAP_PREFIX
    parsed = _split_group(local_id)
    if parsed is None:
        return
    conn = backend._conn(secrets)
    with backend._ceph(f"delete group snapshot {local_id}", conn):
        try:
            io = conn.ioctx(parsed[0])
        except NotFound:
            return
        record = _read_record(io, parsed[1])
        if record is None:
            _drop_tmp_group(io, parsed[1])
            return
        backend._resume(conn, secrets)
        for m in record["members"]:
            snap = backend._split(m["snapshot"], SNAP_PREFIX)
            if snap is not None:
                backend._remove(conn, snap[0], snap[1], f"group member {m['snapshot']}", secrets)
        _drop_tmp_group(io, parsed[1])
        with contextlib.suppress(rados.ObjectNotFound):
            io.remove_object(RECORD_PREFIX + parsed[1])
