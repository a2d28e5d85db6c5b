"""Group snapshot logic, free of gRPC (the GroupController service, csi/group_controller.py, translates).

Validation happens here before any backend is called: a name, at least one source volume, no source twice, every
source in one backend (a group is cut by one storage at one instant; volumes of two backends cannot be paused
together, so such a request is INVALID_ARGUMENT naming both backends). Claims in the operation lock table as
csi/locks.py lists them: a create holds the group name and the group it will make exclusively and every source
volume shared (as CreateSnapshot does); a delete holds the group and each of its member snapshots exclusively.

Idempotency by name: the backend derives the group from the name; an existing group of that name answers the
create when it has the same sources (in any order) and parameters, ALREADY_EXISTS otherwise.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from backends.base import Backend, GroupSnapshot
from backends.errors import AlreadyExists, InvalidArgument, NotFound
from backends.locking import Operation

from .controllerops import MAX_NAME
from .ids import make_id, parse_id
from .locks import KeyedLocks, group_key, group_name_key, snapshot_key, volume_key
from .registry import Backends

KIND = "group snapshot"
_CO_PREFIX = "csi.storage.k8s.io/"  # parameters the external-snapshotter adds; not the StorageClass's


def supported(backends: Backends) -> bool:
    """Whether any configured backend cuts group snapshots (else the GroupController service is not served)."""
    return any(b.features().group_snapshots for b in backends)


class GroupOps:
    def __init__(self, backends: Backends, locks: KeyedLocks) -> None:
        self.backends = backends
        self.locks = locks

    def _backend_of(self, group_snapshot_id: str) -> tuple[Backend, str]:
        oid = parse_id(group_snapshot_id, KIND)
        backend = self.backends.for_id(oid.backend, f"{KIND} {group_snapshot_id!r}")
        if not backend.features().group_snapshots:
            raise NotFound(f"{KIND} {group_snapshot_id!r} does not exist: backend {backend.name!r} has no group "
                           "snapshots")
        return backend, oid.local

    def create(self, name: str, source_volume_ids: Sequence[str], parameters: Mapping[str, str],
               secrets: Mapping[str, str]) -> tuple[str, GroupSnapshot]:
        if not name:
            raise InvalidArgument("name is required")
        if len(name) > MAX_NAME:
            raise InvalidArgument(f"name is longer than {MAX_NAME} characters")
        if not source_volume_ids:
            raise InvalidArgument("source_volume_ids is required (at least one volume)")
        twice = sorted({v for v in source_volume_ids if list(source_volume_ids).count(v) > 1})
        if twice:
            raise InvalidArgument(f"source_volume_ids names {', '.join(repr(v) for v in twice)} more than once")
        oids = [parse_id(v) for v in source_volume_ids]  # "" → InvalidArgument; not ours → NotFound
        backend_names = sorted({o.backend for o in oids})
        for b in backend_names:
            self.backends.for_id(b, f"volume in backend {b!r}")  # NotFound for a backend that does not exist
        if len(backend_names) > 1:
            raise InvalidArgument(f"the source volumes live in different backends ({', '.join(backend_names)}); a "
                                  "group snapshot is cut by one storage at one instant, so all its volumes must be "
                                  "in one backend")
        backend = self.backends.for_id(backend_names[0], "volume")
        if not backend.features().group_snapshots:
            raise InvalidArgument(f"backend {backend.name!r} does not support group snapshots")
        params = {k: v for k, v in parameters.items() if not k.startswith(_CO_PREFIX)}
        sources = [o.local for o in oids]
        for o, raw in zip(oids, source_volume_ids):
            backend.get_volume(o.local, secrets)  # NotFound before any work, naming the volume
        planned = backend.group_local_id_for_name(name)
        with self.locks.operation(Operation("CreateVolumeGroupSnapshot", name),
                                  exclusive=[group_name_key(name),
                                             group_key(make_id(backend.name, planned)) if planned else ""],
                                  shared=[volume_key(v) for v in source_volume_ids],
                                  provider=backend.operation_lock_provider()):
            group = backend.create_group_snapshot(name, sources, params, secrets)
        if sorted(group.source_volume_local_ids) != sorted(sources):
            have = ", ".join(make_id(backend.name, v) for v in sorted(group.source_volume_local_ids))
            raise AlreadyExists(f"group snapshot {name!r} already exists with other source volumes ({have})")
        if group.parameters != params:
            raise AlreadyExists(f"group snapshot {name!r} already exists with different parameters")
        return make_id(backend.name, group.local_id), group

    def _check_members(self, group_snapshot_id: str, backend: Backend, group: GroupSnapshot,
                       snapshot_ids: Sequence[str]) -> None:
        """The spec's "snapshot list mismatch": the caller's list, when it sends one, must be the group's."""
        if not snapshot_ids:
            return
        have = {make_id(backend.name, m.local_id) for m in group.members}
        if set(snapshot_ids) != have or len(set(snapshot_ids)) != len(snapshot_ids):
            raise InvalidArgument(f"snapshot_ids do not match the members of {KIND} {group_snapshot_id!r} "
                                  f"(it has {', '.join(sorted(have)) or 'no members left'})")

    def delete(self, group_snapshot_id: str, snapshot_ids: Sequence[str], secrets: Mapping[str, str]) -> None:
        try:
            backend, local = self._backend_of(group_snapshot_id)
            group = backend.get_group_snapshot(local, secrets)
        except NotFound:
            return  # does not exist (any more): deleted, as the spec asks
        self._check_members(group_snapshot_id, backend, group, snapshot_ids)
        members = [snapshot_key(make_id(backend.name, m.local_id)) for m in group.members]
        with self.locks.operation(Operation("DeleteVolumeGroupSnapshot", group_snapshot_id),
                                  exclusive=[group_key(group_snapshot_id), *members],
                                  provider=backend.operation_lock_provider()):
            backend.delete_group_snapshot(local, secrets)

    def get(self, group_snapshot_id: str, snapshot_ids: Sequence[str],
            secrets: Mapping[str, str]) -> tuple[str, GroupSnapshot]:
        """A read: no claim, like GetSnapshot (a group being cut or flattened is answered, not ABORTED)."""
        backend, local = self._backend_of(group_snapshot_id)
        group = backend.get_group_snapshot(local, secrets)
        self._check_members(group_snapshot_id, backend, group, snapshot_ids)
        return group_snapshot_id, group
