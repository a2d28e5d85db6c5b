"""The vocabulary of operation locks, shared by the controller's lock table (`csi/locks.py`) and by backends that
hold locks across processes.

Why it lives under `backends/`: a backend whose storage is shared by several controller replicas (RBD) supplies a
`LockProvider` (see `Backend.operation_lock_provider`) that keeps the same claims in the storage itself, and backends
never import `csi`. The in-process table alone decides nothing about other processes; a provider makes a claim hold
across every process that talks to the same storage.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ContextManager, Sequence

from .errors import Aborted


@dataclass(frozen=True)
class Operation:
    """What holds (or wants) a lock, as a person reads it: `DeleteVolume of local:vol-…`."""
    rpc: str  # the CSI method name, also the metric label
    subject: str  # the ID or name the operation acts on
    preposition: str = "of"

    def __str__(self) -> str:
        return f"{self.rpc} {self.preposition} {self.subject}"


@dataclass(frozen=True)
class Claim:
    """One key an operation reads (shared) or writes (exclusive). Shared claims coexist; an exclusive claim excludes
    every other claim on its key. Keys are opaque strings (`volume/<id>`, `name/<name>`, ...; see csi/locks.py)."""
    key: str
    exclusive: bool


class LockConflict(Aborted):
    """A claim met a conflicting claim: the caller answers ABORTED, naming the operation it met."""

    def __init__(self, holder: str, holder_rpc: str, key: str) -> None:
        super().__init__(f"{holder} is in progress; retry later")
        self.holder = holder
        self.holder_rpc = holder_rpc
        self.key = key


class LockProvider(abc.ABC):
    """Holds claims across processes (e.g. a lease in the storage). Contract:

    - `hold` takes every claim or none, and never waits for another holder: a conflict raises `LockConflict` at once
      (naming the holder's operation when the storage can tell it, else a description of the lock).
    - A holder that dies loses its claims after a bounded time (a lease), so a crash never wedges an object; a live
      holder keeps them for as long as the `with` block runs (renewing where needed) and is never robbed of them.
    - It may be stricter than the in-process rules (treat shared as exclusive), never looser.
    """

    @abc.abstractmethod
    def hold(self, operation: Operation, claims: Sequence[Claim]) -> ContextManager[None]:
        """Context manager holding `claims` for `operation` until it exits."""
