"""Operation locks that hold across controller replicas: RADOS object locks with a lease.

Why: the chart runs the shared controller with two replicas, and the sidecars' leaders can sit in different pods, so
an in-process lock table cannot stop two processes from creating, cloning or deleting the same image at once. The
RBD backend's own state lives in the pool, so its locks live there too: one small RADOS object per image name
(`tessera-lock.<image>`) in the backend's default pool, locked with the `lock` object class.

- A lock is exclusive (the operation writes the image: create, delete, expand) or shared (it reads it as a clone
  or snapshot source; several snapshots of one volume may run together).
- Every lock carries a lease (`duration`). One background thread per backend renews each operation's leases every
  third of the lease, with cls_lock's MUST_RENEW flag, so a live holder's lock never lapses while a crashed
  holder's lock expires by itself after one lease (plus the OSD's second granularity). A renewal that finds the lock gone logs
  an error: the operation outlived its lease (a stalled process) and may have raced.
- Taking locks never waits: the first busy key raises `Aborted` naming the holder (the operation and its process,
  stored as the lock description and in an xattr on the lock object, which plain `rados` tools can read). The lock
  and the xattr are one OSD operation: a lock costs one round trip to take; giving it back is sent without waiting
  for the answer (`Lease.release`).
- Cookies are unique per acquisition (process id + counter), so two threads of one process also exclude each other.

`RadosLockProvider` plugs this into the controller's operation lock table (`csi/locks.py`, `backends/locking.py`):
the table's claim keys become lock objects. A key naming an image (`volume/<backend>:<pool>.<image>`) maps to the
image name alone, so a claim made before the pool is known (a planned snapshot) and one made with it meet on the same
object; other keys (request names) map to a hash, as names may hold any character.
"""
from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import itertools
import json
import logging
import os
import socket
import struct
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Sequence

from prometheus_client import Counter

from .locking import Claim, LockConflict, LockProvider, Operation

log = logging.getLogger(__name__)

LOCK_NAME = "tessera-op"
SHARED_TAG = "tessera"
OBJECT_PREFIX = "tessera-lock."
HOLDER_XATTR = "tessera.holder"
FLAG_MUST_RENEW = 0x2  # cls_lock: renew only a lock this cookie still holds; ENOENT once it has been lost

PROCESS = f"{socket.gethostname()} pid {os.getpid()}"
_PROCESS_TAG = uuid.uuid4().hex[:12]
_seq = itertools.count(1)

LOCK_ABORTS = Counter("tessera_rbd_lease_lock_aborted_total",
                      "RBD operations refused (ABORTED) because another operation, in any replica, held a lock",
                      ["backend"])
LEASES_LOST = Counter("tessera_rbd_lease_lost_total",
                      "RBD operation locks found lost at renewal (the holder stalled for longer than the lease)",
                      ["backend"])


@dataclass(frozen=True)
class LockKey:
    """One object an operation touches: `key` names the lock object, `label` says what it is to a person."""
    key: str
    label: str
    shared: bool = False


def renewal_interval(duration: int) -> float:
    """How long after its last renewal a lease of `duration` seconds is renewed again: a third of its term."""
    return max(0.5, duration / 3)


def _string(value: str) -> bytes:
    raw = value.encode()
    return struct.pack("<I", len(raw)) + raw


def lock_request(name: str, cookie: str, description: str, duration: int, shared: bool, flags: int = 0) -> bytes:
    """The input of cls_lock's `lock` method (cls_lock_lock_op, encoding version 1): lock name, type (1 exclusive,
    2 shared), cookie, tag, description, duration (utime_t: seconds, nanoseconds), flags. Encoded here so that the
    lock and the holder's record go to the OSD as one operation (librados' lock call cannot carry a second step)."""
    body = (_string(name) + struct.pack("<B", 2 if shared else 1) + _string(cookie)
            + _string(SHARED_TAG if shared else "") + _string(description) + struct.pack("<IIB", duration, 0, flags))
    return struct.pack("<BBI", 1, 1, len(body)) + body


def unlock_request(name: str, cookie: str) -> bytes:
    """The input of cls_lock's `unlock` method (cls_lock_unlock_op, encoding version 1): lock name, cookie."""
    body = _string(name) + _string(cookie)
    return struct.pack("<BBI", 1, 1, len(body)) + body


class Lease:
    """The locks of one running operation; renewed by its factory's renewer thread until `release`."""

    def __init__(self, io: Any, keys: Sequence[LockKey], operation: Operation, duration: int, backend: str,
                 releases: "_Releases | None" = None) -> None:
        self.io = io
        self.releases = releases if releases is not None else _Releases()
        self.keys = list(keys)
        self.description = f"{operation} ({PROCESS})"
        self.record = json.dumps({"operation": str(operation), "rpc": operation.rpc, "process": PROCESS}).encode()
        self.duration = duration
        self.backend = backend
        self.cookie = f"{_PROCESS_TAG}-{next(_seq)}"
        self.held: list[LockKey] = []
        self.lost = False
        self.renewed_at = 0.0
        self.released = False
        self._forget: set[str] = set()
        self._mutex = threading.Lock()  # a renewal and the release never overlap

    # ---- one lock ---------------------------------------------------------------------------------------
    def _lock(self, k: LockKey, flags: int = 0, record: bool = False) -> None:
        """Lock `k` with this lease's cookie in one OSD operation; with `record`, the same operation stores the
        holder's record (an xattr that plain `rados` tools can read), so a busy lock writes nothing."""
        import rados
        with rados.WriteOpCtx() as op:
            op.execute("lock", "lock", lock_request(LOCK_NAME, self.cookie, self.description, self.duration,
                                                    k.shared, flags))
            if record:
                op.set_xattr(HOLDER_XATTR, self.record)
            self.io.operate_write_op(op, OBJECT_PREFIX + k.key)

    def _holder(self, k: LockKey) -> tuple[str, str]:
        """(the holding operation with its process, its RPC name) as the holder recorded them."""
        try:
            rec = json.loads(self.io.get_xattr(OBJECT_PREFIX + k.key, HOLDER_XATTR))
            return f"{rec['operation']} ({rec['process']})", str(rec["rpc"])
        except Exception:  # noqa: BLE001 - the name of the holder is a courtesy; the refusal stands without it
            return f"another operation on {k.label}", "unknown"

    def acquire(self) -> None:
        import rados
        started = time.monotonic()
        for k in sorted(self.keys, key=lambda k: k.key):
            try:
                self._lock(k, record=True)
            except (rados.ObjectBusy, rados.ObjectExists):
                holder, rpc = self._holder(k)
                self.release()
                LOCK_ABORTS.labels(self.backend).inc()
                raise LockConflict(holder, rpc, k.label) from None
            except BaseException:
                self.release()
                raise
            self.held.append(k)
        self.renewed_at = started

    def due(self, now: float) -> bool:
        return now - self.renewed_at >= renewal_interval(self.duration)

    def renew(self) -> None:
        """Renew every held lock (cls_lock MUST_RENEW: only while this cookie still holds it)."""
        import rados
        with self._mutex:
            if self.released:
                return
            started = time.monotonic()
            ok = True
            for k in list(self.held):
                try:
                    self._lock(k, FLAG_MUST_RENEW)
                except rados.ObjectNotFound:
                    ok = False
                    if not self.lost:
                        self.lost = True
                        LEASES_LOST.labels(self.backend).inc()
                        log.error("the lock on %s for %s lapsed before it was renewed (stalled longer than the "
                                  "%d s lease); another replica may have taken it", k.label, self.description,
                                  self.duration)
                except Exception as e:  # noqa: BLE001 - a slow cluster: try again at the next tick
                    ok = False
                    log.warning("renewing the lock on %s for %s failed: %s", k.label, self.description, e)
            if ok:
                self.renewed_at = started

    def forget(self, key: str) -> None:
        """The operation removed what `key` names (a delete): remove the lock object at release instead of
        unlocking, so lock objects do not pile up with deleted volumes."""
        self._forget.add(key)

    def release(self) -> None:
        """Give every lock back without waiting for the OSD's answer: the RPC's reply does not wait one more round
        trip. This process's next operation on the same lock object is ordered after the release (RADOS orders
        one client's operations on one object); another replica that comes within that round trip meets the lock
        still held (ABORTED, retry), and a release that fails or never leaves (a crash) lapses with the lease.
        No completion callback: a Python callback run by librados while the interpreter exits aborts the process;
        the answers are read by the next release instead (`_Releases`)."""
        with self._mutex:
            self.released = True
        # Removing the object also drops our lock; only safe while the lease is certainly ours (fresh renewal).
        fresh = not self.lost and time.monotonic() - self.renewed_at < self.duration / 2
        for k in reversed(self.held):
            obj = OBJECT_PREFIX + k.key
            try:
                if k.key in self._forget and not k.shared and fresh:
                    sent = self.io.aio_remove(obj)
                else:
                    sent = self.io.aio_execute(obj, "lock", "unlock", unlock_request(LOCK_NAME, self.cookie))
            except Exception as e:  # noqa: BLE001 - the lease runs out by itself
                log.warning("releasing the lock on %s failed (it lapses after %d s): %s", k.label, self.duration, e)
                continue
            self.releases.add(k.label, sent, self.duration)
        self.held = []


class _Releases:
    """Releases sent and not yet answered. Each new release first reads the answers that have come (a failed one
    is logged: its lock lapses with its lease), so the list holds only what is in flight."""

    def __init__(self) -> None:
        self.sent: collections.deque[tuple[str, Any, int]] = collections.deque()
        self.mutex = threading.Lock()

    def add(self, label: str, completion: Any, duration: int) -> None:
        with self.mutex:
            while self.sent and self.sent[0][1].is_complete():
                what, done, term = self.sent.popleft()
                rc = done.get_return_value()
                if rc < 0 and rc != -errno.ENOENT:
                    log.warning("releasing the lock on %s failed (it lapses after %d s): %s", what, term,
                                os.strerror(-rc))
            self.sent.append((label, completion, duration))


class _Renewer:
    """One thread per backend that renews every live lease when it falls due. Why not a thread per operation:
    starting it and joining it at release cost more than the lock itself on a busy controller (a wake-up of the
    joined thread per RPC); one sleeper serves them all."""

    def __init__(self, name: str, interval: float) -> None:
        self.name = name
        self.interval = interval  # every lease of a backend has the same term: due `interval` after its last renewal
        self.leases: set[Lease] = set()
        self.mutex = threading.Lock()
        self.thread: threading.Thread | None = None

    def add(self, lease: Lease) -> None:
        with self.mutex:
            self.leases.add(lease)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name=f"lease-renewer-{self.name}", daemon=True)
                self.thread.start()

    def discard(self, lease: Lease) -> None:
        with self.mutex:
            self.leases.discard(lease)

    def _run(self) -> None:
        while True:
            with self.mutex:
                now = time.monotonic()
                due = [x for x in self.leases if x.due(now)]
                wait = min((self.interval - (now - x.renewed_at) for x in self.leases), default=self.interval)
            if not due:
                # Nobody is woken when a lease is added (no wake-up per RPC): a lease added during this sleep
                # falls due at the earliest `interval` after it began, so the next look is soon enough.
                time.sleep(max(0.05, wait))
                continue
            for lease in due:
                lease.renew()


class LeaseLocks:
    """Factory of leases for one backend."""

    def __init__(self, backend: str, duration: int) -> None:
        self.backend = backend
        self.duration = max(1, int(duration))
        self.renewer = _Renewer(backend, renewal_interval(self.duration))
        self.releases = _Releases()

    @contextlib.contextmanager
    def hold(self, io: Any, keys: Sequence[LockKey], operation: Operation) -> Iterator[Lease]:
        """Lock every key (all or none; LockConflict (Aborted) naming the holder of the first busy one) for the
        duration of the block, renewing the leases meanwhile."""
        lease = Lease(io, keys, operation, self.duration, self.backend, self.releases)
        lease.acquire()
        self.renewer.add(lease)
        try:
            yield lease
        finally:
            self.renewer.discard(lease)
            lease.release()


def object_key(claim_key: str, image_for_name: Callable[[str, str], str | None] = lambda kind, name: None) -> str:
    """The lock object (after OBJECT_PREFIX) for a claim key of csi/locks.py. `image_for_name(kind, name)` gives
    the image a create request name makes ("volume" or "snapshot"), so a request name and the volume it makes share
    one object (and DeleteVolume, which removes that object with the volume, leaves nothing behind)."""
    kind, _, rest = claim_key.partition("/")
    image: str | None = None
    if kind in ("volume", "snapshot"):
        image = rest.rpartition(".")[2]
    elif kind == "name":
        image = image_for_name("volume", rest)
    elif kind == "snapshot-name":
        image = image_for_name("snapshot", rest)
    if image and image.startswith("tessera-") and all(c.isalnum() or c == "-" for c in image):
        return "img." + image
    return "key." + hashlib.sha256(claim_key.encode()).hexdigest()[:40]


class RadosLockProvider(LockProvider):
    """The controller's claims, held as RADOS lease locks in one pool (`io_factory` gives its ioctx; `guard`
    translates storage errors to the driver's typed errors)."""

    REMOVES = ("DeleteVolume", "DeleteSnapshot")  # operations after which their objects' locks are not needed

    def __init__(self, locks: LeaseLocks, io_factory: Callable[[], Any],
                 guard: Callable[[str], ContextManager[None]],
                 image_for_name: Callable[[str, str], str | None] = lambda kind, name: None) -> None:
        self.locks = locks
        self.io_factory = io_factory
        self.guard = guard
        self.image_for_name = image_for_name

    @contextlib.contextmanager
    def hold(self, operation: Operation, claims: Sequence[Claim]) -> Iterator[None]:
        keys: dict[str, LockKey] = {}
        for c in claims:  # two claims may meet on one object (see object_key): exclusive wins
            k = object_key(c.key, self.image_for_name)
            if k not in keys or c.exclusive:
                keys[k] = LockKey(k, c.key, shared=not c.exclusive)
        stack = contextlib.ExitStack()
        with self.guard(f"lock for {operation}"):  # only the taking: the operation's own errors pass untouched
            lease = stack.enter_context(self.locks.hold(self.io_factory(), list(keys.values()), operation))
        with stack:
            yield
            if operation.rpc in self.REMOVES:
                for k in keys.values():
                    if not k.shared:
                        lease.forget(k.key)
