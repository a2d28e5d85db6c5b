"""Per-key non-blocking locks: a second concurrent operation on the same volume or name gets ABORTED at once.

The sidecars retry with backoff, so failing fast is both what the spec asks (ABORTED, "operation pending") and what
keeps worker threads from piling up behind one slow backend call.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

from backends.errors import Aborted


class KeyedLocks:
    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._held: set[str] = set()

    @contextlib.contextmanager
    def hold(self, *keys: str) -> Iterator[None]:
        """Hold every key (all or none); raise Aborted naming the busy key."""
        wanted = sorted({k for k in keys if k})
        with self._mutex:
            busy = [k for k in wanted if k in self._held]
            if busy:
                raise Aborted(f"an operation on {busy[0]!r} is already in progress; retry later")
            self._held.update(wanted)
        try:
            yield
        finally:
            with self._mutex:
                self._held.difference_update(wanted)

    def busy(self, key: str) -> bool:
        with self._mutex:
            return key in self._held
