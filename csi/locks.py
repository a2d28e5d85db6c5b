"""The operation lock table: every RPC claims each object it reads or writes, and the loser of a conflict gets
ABORTED at once, with a message naming the operation it met.

Why non-blocking: the sidecars retry with backoff, so failing fast is both what the spec asks (ABORTED, "operation
pending for volume") and what keeps worker threads from piling up behind one slow backend call.

Why claims on *every* object, not only the new one: an operation that reads a volume (a snapshot of it, a clone
from it) must not meet that volume half-deleted, and a delete must not remove what a create of the same name is
still writing. Each key is held shared (the operation reads it) or exclusive (it creates, changes or removes it);
shared claims coexist, an exclusive claim excludes every other claim on its key.

Keys (IDs are full CSI IDs, `<backend>:<local id>`):
    name/<N>            a CreateVolume request name (one namespace across backends: a name has one volume)
    snapshot-name/<N>   a CreateSnapshot request name
    volume/<ID>         a volume, including the one a create of N will make (`Backend.local_id_for_name`)
    snapshot/<ID>       a snapshot, likewise
    publish/<ID>        the volume's access list (ControllerPublish/Unpublish)
    group-name/<N>      a CreateVolumeGroupSnapshot request name
    group/<ID>          a group snapshot, including the one a create of N will make (`Backend.group_local_id_for_name`)

Claims per operation (X exclusive, S shared):
    CreateVolume N              X name/N, X volume/<id of N>
      ... from volume V         + S volume/V
      ... from snapshot P       + S snapshot/P
    DeleteVolume V              X volume/V
    ControllerExpandVolume V    X volume/V
    ControllerModifyVolume V    X volume/V   (checks its keys first, claim-free: a refused request claims nothing)
    ControllerPublish/Unpublish X publish/V, S volume/V
    CreateSnapshot N of V       X snapshot-name/N, X snapshot/<id of N>, S volume/V
    DeleteSnapshot P            X snapshot/P
    CreateVolumeGroupSnapshot N of V1..Vn
                                X group-name/N, X group/<id of N>, S volume/V1 .. S volume/Vn
    DeleteVolumeGroupSnapshot G X group/G, X snapshot/M for each member snapshot M of G
    Node calls on V (nodeops)   X volume/V   (`hold`, the table shared with the node service in one process)

The resulting conflict matrix (✓ may run together, ✗ the later one is ABORTED):
                                 snap of V  clone of V  delete V  expand V  publish V  restore P  delete P  create N
    CreateSnapshot of V             ✓          ✓           ✗         ✗         ✓          ✓         ✓         ✓
    CreateVolume clone of V         ✓          ✓           ✗         ✗         ✓          ✓         ✓         ✓
    DeleteVolume V                  ✗          ✗           ✗         ✗         ✗          ✓         ✓      ✗ if N→V
    ControllerExpandVolume V        ✗          ✗           ✗         ✗         ✗          ✓         ✓      ✗ if N→V
    ControllerPublish V             ✓          ✓           ✗         ✗      ✗ (same V)    ✓         ✓         ✓
    CreateVolume from P             ✓          ✓           ✓         ✓         ✓          ✓         ✗         ✓
    DeleteSnapshot P                ✓          ✓           ✓         ✓         ✓          ✗         ✗         ✓
    CreateVolume N                  ✓          ✓        ✗ if N→V  ✗ if N→V     ✓          ✓         ✓         ✗
    CreateVolumeGroupSnapshot ∋ V   ✓          ✓           ✗         ✗         ✓          ✓         ✓         ✓
    DeleteVolumeGroupSnapshot ∋ P   ✓          ✓           ✓         ✓         ✓       ✗ (P member) ✗ (P member) ✓
A group create is a CreateSnapshot of each member at once (same column as "snap of V"); two group creates of one
name exclude each other on group-name/N, two deletes of one group on group/G. A group being deleted and a restore
from one of its members exclude each other like DeleteSnapshot and a restore.
    ControllerModifyVolume V: the same row and column as ControllerExpandVolume V (both hold volume/V exclusively):
    it meets every operation on V — snapshot, clone, delete, expand, publish, another modify, a node call — and the
    later one is ABORTED; it never meets an operation on another volume or on a snapshot.
Operations on different objects never conflict. "N→V": V is the volume a create of N makes (same for snapshots).

Across processes: the table holds within this process only. A backend whose storage several controller replicas
share supplies a `LockProvider` (`Backend.operation_lock_provider()`); the table then takes the same claims through
it after its own (all or none), so a conflict with another replica is ABORTED the same way.

Metrics (per replica): `tessera_csi_lock_conflicts_total{operation,against}` counts ABORTED answers by the operation
that lost and the one it met; `tessera_csi_operations_in_progress{operation}` shows what holds locks now. Locks
never wait, so there is no wait time to measure: a conflict *is* the wait, handed back to the sidecar's backoff.
"""
from __future__ import annotations

import contextlib
import itertools
import threading
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

from prometheus_client import Counter, Gauge

from backends.locking import Claim, LockConflict, LockProvider, Operation

LOCK_CONFLICTS = Counter("tessera_csi_lock_conflicts_total",
                         "Operations answered ABORTED because another operation held a conflicting lock",
                         ["operation", "against"])
IN_PROGRESS = Gauge("tessera_csi_operations_in_progress", "Operations holding locks in this process", ["operation"])

# The RPC name recorded for `hold` callers that do not say which operation they are.
UNNAMED = "another call"


def name_key(name: str) -> str:
    return "name/" + name


def snapshot_name_key(name: str) -> str:
    return "snapshot-name/" + name


def volume_key(volume_id: str) -> str:
    return "volume/" + volume_id


def snapshot_key(snapshot_id: str) -> str:
    return "snapshot/" + snapshot_id


def publish_key(volume_id: str) -> str:
    return "publish/" + volume_id


def group_name_key(name: str) -> str:
    return "group-name/" + name


def group_key(group_snapshot_id: str) -> str:
    return "group/" + group_snapshot_id


@dataclass
class _Entry:
    writer: Optional[Operation] = None
    readers: dict[int, Operation] = field(default_factory=dict)


def claims_of(exclusive: Iterable[str] = (), shared: Iterable[str] = ()) -> list[Claim]:
    """Claims in key order; a key named both ways is exclusive; empty keys are dropped."""
    ex = {k for k in exclusive if k}
    sh = {k for k in shared if k} - ex
    return sorted([Claim(k, True) for k in ex] + [Claim(k, False) for k in sh], key=lambda c: c.key)


class KeyedLocks:
    """The in-process table (one per server process, shared by the controller and node services)."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._table: dict[str, _Entry] = {}
        self._tokens = itertools.count(1)

    def _conflict(self, claim: Claim) -> Optional[Operation]:
        e = self._table.get(claim.key)
        if e is None:
            return None
        if e.writer is not None:
            return e.writer
        if claim.exclusive and e.readers:
            return next(iter(e.readers.values()))
        return None

    def _take(self, op: Operation, claims: list[Claim]) -> int:
        with self._mutex:
            for c in claims:
                holder = self._conflict(c)
                if holder is not None:
                    LOCK_CONFLICTS.labels(op.rpc, holder.rpc).inc()
                    raise LockConflict(str(holder), holder.rpc, c.key)
            token = next(self._tokens)
            for c in claims:
                e = self._table.setdefault(c.key, _Entry())
                if c.exclusive:
                    e.writer = op
                else:
                    e.readers[token] = op
            return token

    def _give_back(self, op: Operation, token: int, claims: list[Claim]) -> None:
        with self._mutex:
            for c in claims:
                e = self._table.get(c.key)
                if e is None:
                    continue
                if c.exclusive and e.writer is op:
                    e.writer = None
                e.readers.pop(token, None)
                if e.writer is None and not e.readers:
                    del self._table[c.key]

    @contextlib.contextmanager
    def operation(self, op: Operation, exclusive: Iterable[str] = (), shared: Iterable[str] = (),
                  provider: Optional[LockProvider] = None) -> Iterator[None]:
        """Hold every claim (all or none) for the `with` block; raise LockConflict (Aborted) naming the operation
        met. With a provider, the same claims are then taken across processes too."""
        claims = claims_of(exclusive, shared)
        token = self._take(op, claims)
        IN_PROGRESS.labels(op.rpc).inc()
        try:
            with contextlib.ExitStack() as across:
                if provider is not None:
                    try:
                        across.enter_context(provider.hold(op, claims))
                    except LockConflict as c:
                        LOCK_CONFLICTS.labels(op.rpc, c.holder_rpc).inc()
                        raise
                yield
        finally:
            IN_PROGRESS.labels(op.rpc).dec()
            self._give_back(op, token, claims)

    @contextlib.contextmanager
    def hold(self, *keys: str, operation: Optional[Operation] = None) -> Iterator[None]:
        """Hold every key exclusively (all or none); raise Aborted naming the operation that holds one of them."""
        wanted = [k for k in keys if k]
        op = operation or Operation(UNNAMED, wanted[0] if wanted else "?", "on")
        with self.operation(op, exclusive=wanted):
            yield

    def busy(self, key: str) -> bool:
        with self._mutex:
            return key in self._table

    def holder(self, key: str) -> Optional[str]:
        """Who holds `key` (the exclusive holder, else one reader), for messages and tests."""
        with self._mutex:
            e = self._table.get(key)
            if e is None:
                return None
            op = e.writer or next(iter(e.readers.values()), None)
            return str(op) if op else None


# The table's name in the design: operations claim objects through it.
OperationLocks = KeyedLocks
