"""Controller logic, free of gRPC: shared by the CSI Controller service and the FlexVolume provisioner.

Validation that depends on the request (names, sizes, capabilities, topology) happens here, before any backend is
called; the backend only ever sees a request that makes sense. Every call claims each object it reads or writes in
the operation lock table (csi/locks.py: the keys and the conflict matrix); a conflicting call gets Aborted at once,
naming the operation it met. A create first looks for the name's volume in every backend (`find_by_name`), so a
retry naming another backend or pool answers ALREADY_EXISTS instead of making a second volume.
"""
from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

from backends.base import (Backend, CapabilitySpec, Capacity, ContentSource, CreateVolumeSpec, Snapshot, Volume,
                           mount_writer_problem)
from backends.errors import (AlreadyExists, Aborted, BackendUnavailable, CapacityExceeded, DeadlineExceeded,
                             InvalidArgument, NotFound, OutOfRange, PermissionDenied, Unsupported)
from backends.locking import Operation

from . import constants
from . import mutable as mutable_params
from .ids import NodeRef, make_id, parse_id, parse_node_id
from .locks import KeyedLocks, name_key, publish_key, snapshot_key, snapshot_name_key, volume_key
from .registry import Backends

log = logging.getLogger(__name__)

MAX_NAME = 128
INT64_MAX = (1 << 63) - 1  # the largest size CSI's int64 capacity fields can carry back
_TOKEN_PREFIX = "t1."


@dataclass
class Page:
    entries: list
    next_token: str


def check_capabilities(backend: Backend, caps: Sequence[CapabilitySpec]) -> Optional[str]:
    """None when the backend supports every capability, else the reason (a sentence for the user)."""
    f = backend.features()
    for c in caps:
        problem = mount_writer_problem(c)  # first: no backend can change it
        if problem:
            return problem
        if c.access_mode not in f.access_modes:
            return f"access mode {c.access_mode} is not supported by backend {backend.name!r} " \
                   f"(supported: {', '.join(sorted(f.access_modes))})"
        if c.access_type == "block" and not f.block:
            return f"raw block volumes are not supported by backend {backend.name!r}"
        if c.access_type == "mount" and c.fs_type and c.fs_type not in constants.SUPPORTED_FS_TYPES:
            return f"fsType {c.fs_type!r} is not supported (one of {', '.join(constants.SUPPORTED_FS_TYPES)})"
    return None


def _differing(have: Mapping[str, str], asked: Mapping[str, str]) -> str:
    """The parameter names whose values differ between a volume and a request, for the person reading the error."""
    return ", ".join(sorted(k for k in set(have) | set(asked) if have.get(k) != asked.get(k)))


def encode_token(last_id: str) -> str:
    return _TOKEN_PREFIX + base64.urlsafe_b64encode(last_id.encode()).decode().rstrip("=")


def decode_token(token: str) -> str:
    """The ID after which the next page starts. A token we did not make → Aborted, as the spec asks."""
    if not token.startswith(_TOKEN_PREFIX):
        raise Aborted(f"starting_token {token[:40]!r} was not issued by this plugin; restart the listing")
    body = token[len(_TOKEN_PREFIX):]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()
        parse_id(raw)
    except (binascii.Error, UnicodeDecodeError, ValueError, NotFound, InvalidArgument):
        raise Aborted(f"starting_token {token[:40]!r} is not valid; restart the listing") from None
    return raw


def paginate(items: list, key, max_entries: int, starting_token: str) -> Page:
    if max_entries < 0:
        raise InvalidArgument("max_entries must not be negative")
    items = sorted(items, key=key)
    if starting_token:
        after = decode_token(starting_token)
        items = [i for i in items if key(i) > after]
    if max_entries and len(items) > max_entries:
        page = items[:max_entries]
        return Page(page, encode_token(key(page[-1])))
    return Page(items, "")


def page_across(backends: Sequence[Backend], iterate: Callable[[Backend, str], Iterator[Any]], max_entries: int,
                starting_token: str, keep: Callable[[Any], bool] = lambda _: True) -> Page:
    """One page of a listing over several backends, in volume/snapshot ID order, loading only what the page returns
    (plus one entry to learn whether another page follows). Why: rebuilding the whole list for every page made a
    full paged listing quadratic, and on RBD every entry is an image opened.

    The token is the last returned ID, so a page resumes after it even when that object was deleted meanwhile.
    IDs are `<backend>:<local>` and ':' appears in no backend name, so every ID of backend A sorts before every ID
    of backend B exactly when `A + ':' < B + ':'`: the backends are walked in that order, each from the token's
    local ID (its own backend) or from its start (a later one)."""
    if max_entries < 0:
        raise InvalidArgument("max_entries must not be negative")
    after = parse_id(decode_token(starting_token)) if starting_token else None
    out: list[tuple[str, Any]] = []
    for b in sorted(backends, key=lambda x: x.name + ":"):
        if after is not None and b.name + ":" < after.backend + ":":
            continue
        items = iterate(b, after.local if after is not None and after.backend == b.name else "")
        try:
            for item in items:
                if not keep(item):
                    continue
                if max_entries and len(out) == max_entries:
                    return Page(out, encode_token(out[-1][0]))
                out.append((make_id(b.name, item.local_id), item))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # a generator holding a directory listing or a cluster connection's iteration
    return Page(out, "")


class ControllerOps:
    def __init__(self, backends: Backends, locks: Optional[KeyedLocks] = None, *, serving: bool = False) -> None:
        """`serving`: this process serves the CSI Controller service for as long as it lives, so single-instance
        backends claim their storage now (a second controller refuses to start). Short-lived users of these
        operations (a FlexVolume call, a command, a test) leave it False."""
        self.backends = backends
        self.locks = locks or KeyedLocks()
        if serving:
            for b in backends:
                b.claim_controller()

    @property
    def node_name(self) -> str:
        return self.backends.runtime.node_name

    # ---- volumes --------------------------------------------------------------------------------------
    def create_volume(self, name: str, required_bytes: int, limit_bytes: int, capabilities: Sequence[CapabilitySpec],
                      parameters: Mapping[str, str], secrets: Mapping[str, str],
                      source: Optional[tuple[str, str]] = None,
                      requisite: Sequence[Mapping[str, str]] = (), preferred: Sequence[Mapping[str, str]] = (),
                      mutable: Mapping[str, str] = {}) -> tuple[str, Volume]:
        """Create or find the volume for `name`. `source` is ("snapshot"|"volume", ID). Returns (volume ID, Volume).
        `mutable`: CreateVolume's mutable_parameters, checked with the parameters and applied after the create
        under the same claims (see `_apply_mutable`)."""
        if not name:
            raise InvalidArgument("name is required")
        if len(name) > MAX_NAME:
            raise InvalidArgument(f"name is longer than {MAX_NAME} characters")
        if not capabilities:
            raise InvalidArgument("volume_capabilities is required")
        if required_bytes < 0 or limit_bytes < 0:
            raise InvalidArgument("capacity_range must not be negative")
        if limit_bytes and required_bytes > limit_bytes:
            raise InvalidArgument(f"capacity_range.required_bytes ({required_bytes}) exceeds limit_bytes ({limit_bytes})")
        params = dict(parameters)
        backend = self.backends.for_create(params.pop(constants.PARAM_BACKEND, None))
        for k in constants.EXTRA_METADATA_PARAMS:
            params.pop(k, None)
        backend.validate_parameters(params)
        changes = mutable_params.check(backend, mutable)
        problem = check_capabilities(backend, capabilities)
        if problem:
            raise InvalidArgument(problem)
        size = self._size(backend, required_bytes, limit_bytes, params)
        content: Optional[ContentSource] = None
        if source is not None:
            content = self._content_source(backend, source[0], source[1], secrets)
        feats = backend.features()
        if feats.node_local:
            self._check_topology(requisite, preferred)
        spec = CreateVolumeSpec(name=name, size_bytes=size, limit_bytes=limit_bytes, parameters=params,
                                secrets=secrets, capabilities=list(capabilities), source=content,
                                requisite=[dict(t) for t in requisite], preferred=[dict(t) for t in preferred])
        planned = backend.local_id_for_name("volume", name, params)
        source_key = ""
        if content is not None:
            sid = make_id(backend.name, content.local_id)
            source_key = snapshot_key(sid) if content.kind == "snapshot" else volume_key(sid)
        with self.locks.operation(Operation("CreateVolume", name),
                                  exclusive=[name_key(name), volume_key(make_id(backend.name, planned)) if planned else ""],
                                  shared=[source_key], provider=backend.operation_lock_provider()):
            self._refuse_elsewhere(name, backend, params, secrets)
            vol = backend.create_volume(spec)
            vol = self._apply_mutable(backend, vol, changes, secrets)
        if vol.capacity_bytes < required_bytes or (limit_bytes and vol.capacity_bytes > limit_bytes):
            raise AlreadyExists(f"volume {name!r} already exists with {vol.capacity_bytes} bytes, outside the requested "
                                f"range [{required_bytes}, {limit_bytes or 'unlimited'}]")
        if (vol.source or None) != content:
            raise AlreadyExists(f"volume {name!r} already exists with a different content source")
        if vol.parameters != params:
            raise AlreadyExists(f"volume {name!r} already exists as {make_id(backend.name, vol.local_id)} with "
                                f"different parameters ({_differing(vol.parameters, params)})")
        return make_id(backend.name, vol.local_id), vol

    def _refuse_elsewhere(self, name: str, backend: Backend, params: Mapping[str, str],
                          secrets: Mapping[str, str]) -> None:
        """AlreadyExists when `name` already has a volume in another backend, or in this one with other parameters
        (another pool, say): the request's backend is one of the parameters a retry must repeat. A backend that
        cannot be asked right now is skipped with a warning: one unreachable storage must not stop every create."""
        for b in self.backends:
            try:
                # the request's own backend is not asked where this create goes: the create looks there itself
                found = b.find_elsewhere(name, params, secrets) if b is backend else b.find_by_name(name, secrets)
            except (BackendUnavailable, PermissionDenied, DeadlineExceeded) as e:
                if b is backend:
                    raise
                log.warning("could not check backend %s for an existing volume named %r: %s", b.name, name, e)
                continue
            if found is None:
                continue
            where = make_id(b.name, found.local_id)
            if b is not backend:
                raise AlreadyExists(f"volume {name!r} already exists in backend {b.name!r} ({where}); this request "
                                    f"asks for backend {backend.name!r}")
            if found.parameters != dict(params):
                raise AlreadyExists(f"volume {name!r} already exists as {where} with different parameters "
                                    f"({_differing(found.parameters, params)})")

    def _size(self, backend: Backend, required: int, limit: int, parameters: Mapping[str, str] = {}) -> int:
        unit = backend.allocation_unit()
        size = required or (min(constants.DEFAULT_VOLUME_SIZE, limit) if limit else constants.DEFAULT_VOLUME_SIZE)
        rounded = -(-size // unit) * unit
        if limit and rounded > limit:
            raise OutOfRange(f"backend {backend.name!r} allocates in units of {unit} bytes; no size in "
                             f"[{required}, {limit}] is possible")
        most = min(backend.max_volume_bytes(parameters) or INT64_MAX, INT64_MAX)
        if rounded > most:  # before any work: past this the storage fails half-way (EFBIG, OverflowError)
            raise OutOfRange(f"{rounded} bytes is more than the largest volume backend {backend.name!r} can hold "
                             f"({most} bytes)")
        return rounded

    def _content_source(self, backend: Backend, kind: str, raw_id: str, secrets: Mapping[str, str]) -> ContentSource:
        oid = parse_id(raw_id, kind)
        if oid.backend != backend.name:
            self.backends.for_id(oid.backend, f"{kind} {raw_id!r}")  # NotFound if that backend does not exist
            raise InvalidArgument(f"{kind} {raw_id!r} lives in backend {oid.backend!r}; a new volume from it must be "
                                  f"created in the same backend, not {backend.name!r}")
        feats = backend.features()
        if kind == "snapshot" and not feats.snapshots:
            raise InvalidArgument(f"backend {backend.name!r} does not support volumes from snapshots")
        if kind == "volume" and not feats.clones:
            raise InvalidArgument(f"backend {backend.name!r} does not support cloning volumes")
        if kind == "snapshot":
            backend.get_snapshot(oid.local, secrets)
        else:
            backend.get_volume(oid.local, secrets)
        return ContentSource(kind, oid.local)  # type: ignore[arg-type]

    def _check_topology(self, requisite: Sequence[Mapping[str, str]], preferred: Sequence[Mapping[str, str]]) -> None:
        """Node-local volumes can only be made on this node: fine if the CO accepts it, RESOURCE_EXHAUSTED if not."""
        wanted = list(preferred) + list(requisite)
        if not wanted:
            return
        key = constants.TOPOLOGY_NODE_KEY
        if not any(t.get(key, self.node_name) == self.node_name for t in requisite or wanted):
            nodes = sorted({t.get(key, "?") for t in requisite or wanted})
            raise CapacityExceeded(f"this controller provisions node-local volumes only on node {self.node_name!r}; "
                                   f"the request allows only {', '.join(nodes)}")

    def delete_volume(self, volume_id: str, secrets: Mapping[str, str]) -> None:
        try:
            oid = parse_id(volume_id)
            backend = self.backends.for_id(oid.backend, f"volume {volume_id!r}")
        except NotFound:
            return  # cannot exist, so it is deleted
        with self.locks.operation(Operation("DeleteVolume", volume_id), exclusive=[volume_key(volume_id)],
                                  provider=backend.operation_lock_provider()):
            backend.delete_volume(oid.local, secrets)

    def get_volume(self, volume_id: str, secrets: Mapping[str, str] = {}) -> tuple[Backend, Volume]:
        oid = parse_id(volume_id)
        backend = self.backends.for_id(oid.backend, f"volume {volume_id!r}")
        return backend, backend.get_volume(oid.local, secrets)

    def list_volumes(self, max_entries: int, starting_token: str) -> Page:
        return page_across([b for b in self.backends if b.features().list_volumes],
                           lambda b, start: b.iter_volumes(start, {}), max_entries, starting_token)

    def get_capacity(self, parameters: Mapping[str, str], capabilities: Sequence[CapabilitySpec],
                     segments: Optional[Mapping[str, str]]) -> Capacity:
        params = dict(parameters)
        backend = self.backends.for_create(params.pop(constants.PARAM_BACKEND, None))
        backend.validate_parameters(params)
        if capabilities and check_capabilities(backend, capabilities):
            return Capacity(0)
        if segments and backend.features().node_local and \
                segments.get(constants.TOPOLOGY_NODE_KEY, self.node_name) != self.node_name:
            return Capacity(0)
        return backend.get_capacity(params, segments)

    def expand_volume(self, volume_id: str, required_bytes: int, limit_bytes: int,
                      secrets: Mapping[str, str]) -> tuple[int, bool]:
        if required_bytes < 0 or limit_bytes < 0:
            raise InvalidArgument("capacity_range must not be negative")
        if limit_bytes and required_bytes > limit_bytes:
            raise InvalidArgument(f"capacity_range.required_bytes ({required_bytes}) exceeds limit_bytes ({limit_bytes})")
        oid = parse_id(volume_id)
        backend = self.backends.for_id(oid.backend, f"volume {volume_id!r}")
        if not backend.features().expand:
            raise Unsupported(f"backend {backend.name!r} does not support expansion")
        with self.locks.operation(Operation("ControllerExpandVolume", volume_id), exclusive=[volume_key(volume_id)],
                                  provider=backend.operation_lock_provider()):
            vol = backend.get_volume(oid.local, secrets)
            size = self._size(backend, max(required_bytes, 1), limit_bytes, vol.parameters)
            if vol.capacity_bytes >= size:
                return vol.capacity_bytes, False
            return backend.expand_volume(oid.local, size, secrets)

    @staticmethod
    def _apply_mutable(backend: Backend, vol: Volume, changes: Mapping[str, str],
                       secrets: Mapping[str, str]) -> Volume:
        """CreateVolume's mutable parameters, applied once the volume exists (still under the create's claims).
        A crash between the create and this step leaves a volume without them; the retried create finds the volume
        and applies them now. Only keys whose stored value differs are written, so a retry changes nothing twice."""
        pending = {k: v for k, v in changes.items() if vol.mutable_parameters.get(k) != v}
        if not pending:
            return vol
        return backend.modify_volume(vol.local_id, pending, secrets)

    def modify_volume(self, volume_id: str, mutable: Mapping[str, str], secrets: Mapping[str, str]) -> Volume:
        """ControllerModifyVolume: check every key and value first (INVALID_ARGUMENT, nothing changed), then, holding
        the volume exclusively (ABORTED against any other operation on it), store the values on the volume.
        Idempotent: values already in force are not written again. An empty request changes nothing (the spec:
        only keys named change anything) but still answers NOT_FOUND for a volume that does not exist."""
        oid = parse_id(volume_id)
        backend = self.backends.for_id(oid.backend, f"volume {volume_id!r}")
        changes = mutable_params.check(backend, mutable)
        with self.locks.operation(Operation("ControllerModifyVolume", volume_id), exclusive=[volume_key(volume_id)],
                                  provider=backend.operation_lock_provider()):
            vol = backend.get_volume(oid.local, secrets)
            return self._apply_mutable(backend, vol, changes, secrets)

    def publish(self, volume_id: str, node_id: str, readonly: bool, capability: CapabilitySpec,
                context: Mapping[str, str], secrets: Mapping[str, str]) -> dict[str, str]:
        oid = parse_id(volume_id)
        backend = self.backends.for_id(oid.backend, f"volume {volume_id!r}")
        node = parse_node_id(node_id)
        with self.locks.operation(Operation("ControllerPublishVolume", volume_id), exclusive=[publish_key(volume_id)],
                                  shared=[volume_key(volume_id)], provider=backend.operation_lock_provider()):
            vol = backend.get_volume(oid.local, secrets)
            problem = check_capabilities(backend, [capability])
            if problem:
                raise InvalidArgument(problem)
            self._check_node_reaches(backend, vol, node)
            return backend.controller_publish(oid.local, node, readonly, capability, vol.context, secrets)

    def _check_node_reaches(self, backend: Backend, vol: Volume, node: NodeRef) -> None:
        key = constants.TOPOLOGY_NODE_KEY
        if vol.topology and not any(t.get(key) == node.name for t in vol.topology if key in t):
            raise NotFound(f"node {node.name!r} cannot reach volume {backend.name}:{vol.local_id} "
                           f"(it lives on {', '.join(t.get(key, '?') for t in vol.topology)})")

    def unpublish(self, volume_id: str, node_id: str, secrets: Mapping[str, str]) -> None:
        try:
            oid = parse_id(volume_id)
            backend = self.backends.for_id(oid.backend, f"volume {volume_id!r}")
        except NotFound:
            return  # a volume that does not exist is not published anywhere
        node = parse_node_id(node_id) if node_id else None
        with self.locks.operation(Operation("ControllerUnpublishVolume", volume_id),
                                  exclusive=[publish_key(volume_id)], shared=[volume_key(volume_id)],
                                  provider=backend.operation_lock_provider()):
            backend.controller_unpublish(oid.local, node, secrets)

    # ---- snapshots ------------------------------------------------------------------------------------
    def create_snapshot(self, source_volume_id: str, name: str, parameters: Mapping[str, str],
                        secrets: Mapping[str, str]) -> tuple[str, Snapshot]:
        if not name:
            raise InvalidArgument("name is required")
        if len(name) > MAX_NAME:
            raise InvalidArgument(f"name is longer than {MAX_NAME} characters")
        if not source_volume_id:
            raise InvalidArgument("source_volume_id is required")
        oid = parse_id(source_volume_id)
        backend = self.backends.for_id(oid.backend, f"volume {source_volume_id!r}")
        if not backend.features().snapshots:
            raise InvalidArgument(f"backend {backend.name!r} does not support snapshots")
        params = {k: v for k, v in parameters.items() if not k.startswith("csi.storage.k8s.io/")}
        planned = backend.local_id_for_name("snapshot", name, params)
        source_id = make_id(backend.name, oid.local)
        with self.locks.operation(Operation("CreateSnapshot", name),
                                  exclusive=[snapshot_name_key(name),
                                             snapshot_key(make_id(backend.name, planned)) if planned else ""],
                                  shared=[volume_key(source_id)], provider=backend.operation_lock_provider()):
            snap = backend.create_snapshot(oid.local, name, params, secrets)
        if snap.source_volume_local_id != oid.local:
            raise AlreadyExists(f"snapshot {name!r} already exists for another volume "
                                f"({make_id(backend.name, snap.source_volume_local_id)})")
        return make_id(backend.name, snap.local_id), snap

    def delete_snapshot(self, snapshot_id: str, secrets: Mapping[str, str]) -> None:
        try:
            oid = parse_id(snapshot_id, "snapshot")
            backend = self.backends.for_id(oid.backend, f"snapshot {snapshot_id!r}")
        except NotFound:
            return
        if not backend.features().snapshots:
            return
        with self.locks.operation(Operation("DeleteSnapshot", snapshot_id), exclusive=[snapshot_key(snapshot_id)],
                                  provider=backend.operation_lock_provider()):
            if backend.features().group_snapshots:
                self._refuse_group_member(backend, snapshot_id, oid.local, secrets)
            backend.delete_snapshot(oid.local, secrets)

    @staticmethod
    def _refuse_group_member(backend: Backend, snapshot_id: str, local: str, secrets: Mapping[str, str]) -> None:
        """A member of a group snapshot goes with its group only: the spec's INVALID_ARGUMENT "Snapshot is part of
        a group" (the CO was told so through the member's group_snapshot_id)."""
        try:
            snap = backend.get_snapshot(local, secrets)
        except NotFound:
            return
        if snap.group_local_id:
            raise InvalidArgument(f"snapshot {snapshot_id!r} is part of group snapshot "
                                  f"{make_id(backend.name, snap.group_local_id)!r} and cannot be deleted on its own; "
                                  "call DeleteVolumeGroupSnapshot for the group")

    def get_snapshot(self, snapshot_id: str, secrets: Mapping[str, str] = {}) -> tuple[str, Snapshot]:
        """GetSnapshot. A read of one snapshot takes no claim, like ControllerGetVolume and ListSnapshots: it
        changes nothing, and the spec wants a snapshot still being made (ready_to_use false) answered, not ABORTED
        behind a flatten or a create. A snapshot that is gone, or an ID that cannot be one of ours, is NotFound."""
        oid = parse_id(snapshot_id, "snapshot")
        backend = self.backends.for_id(oid.backend, f"snapshot {snapshot_id!r}")
        if not backend.features().snapshots:
            raise NotFound(f"snapshot {snapshot_id!r} does not exist: backend {backend.name!r} has no snapshots")
        return snapshot_id, backend.get_snapshot(oid.local, secrets)

    def list_snapshots(self, max_entries: int, starting_token: str, snapshot_id: str = "",
                       source_volume_id: str = "", secrets: Mapping[str, str] = {}) -> Page:
        snaps: list[tuple[str, Snapshot]] = []
        if snapshot_id:
            try:
                oid = parse_id(snapshot_id, "snapshot")
                b = self.backends.for_id(oid.backend, "snapshot")
                if b.features().snapshots:
                    s = b.get_snapshot(oid.local, secrets)
                    snaps.append((snapshot_id, s))
            except NotFound:
                pass
        else:
            only: Optional[tuple[str, str]] = None
            if source_volume_id:
                try:
                    vid = parse_id(source_volume_id)
                    only = (vid.backend, vid.local)
                except NotFound:
                    return paginate([], key=lambda e: e[0], max_entries=max_entries, starting_token=starting_token)
            with_snapshots = [b for b in self.backends
                              if b.features().snapshots and (only is None or only[0] == b.name)]
            return page_across(with_snapshots, lambda b, start: b.iter_snapshots(start, secrets), max_entries,
                               starting_token,
                               keep=lambda s: only is None or s.source_volume_local_id == only[1])
        return paginate(snaps, key=lambda e: e[0], max_entries=max_entries, starting_token=starting_token)

    def source_volume_id(self, snapshot_id: str, snap: Snapshot) -> str:
        return make_id(parse_id(snapshot_id, "snapshot").backend, snap.source_volume_local_id)
