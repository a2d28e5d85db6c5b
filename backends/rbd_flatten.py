"""Slow RBD work done outside any RPC: flattening deep clone chains and purging deleted parents.

Why: a flatten is a full copy of the image. Inside CreateVolume, CreateSnapshot or DeleteVolume it outlives any
sidecar timeout, and the retry then meets a half-flattened image. Instead the RPC queues a job here and answers at
once (a deep snapshot reports ready_to_use=false, a create past the hard depth limit answers ABORTED, a delete of a
volume with dependants moves it to the RBD trash), and one daemon thread per backend does the copies.

Jobs are keyed (one queued or running job per key), may ask to be retried later (the object was busy), and are
bounded in attempts; a job that gives up is queued again by the next RPC that needs it. Nothing here is needed for
correctness after a crash: the RPCs and the backend's resume scan re-queue what is still to do.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import Callable, Optional

from prometheus_client import Gauge

log = logging.getLogger(__name__)

FLATTENS_IN_PROGRESS = Gauge("tessera_rbd_flattens_in_progress",
                             "RBD flattens (full copies) running in the background right now", ["backend"])
JOBS_QUEUED = Gauge("tessera_rbd_background_jobs_queued",
                    "RBD background jobs (flattens, purges of deleted parents) waiting to run", ["backend"])

RETRY = object()  # a job returns this to run again later
MAX_ATTEMPTS = 80  # about six minutes of retries


class BackgroundJobs:
    """A keyed, deduplicated job queue with one worker thread, started on first use."""

    def __init__(self, backend: str, retry_delay: float = 0.2) -> None:
        self.backend = backend
        self.retry_delay = retry_delay
        self._cv = threading.Condition()
        self._heap: list[tuple[float, int, str]] = []
        self._jobs: dict[str, tuple[Callable[[], object], str, int]] = {}
        self._running: Optional[str] = None
        self._seq = itertools.count()
        self._thread: Optional[threading.Thread] = None
        self._closed = False

    def submit(self, key: str, fn: Callable[[], object], kind: str = "flatten") -> None:
        """Queue `fn` under `key` unless a job with that key is already queued or running."""
        with self._cv:
            if self._closed or key in self._jobs or key == self._running:
                return
            self._jobs[key] = (fn, kind, 0)
            heapq.heappush(self._heap, (time.monotonic(), next(self._seq), key))
            JOBS_QUEUED.labels(self.backend).set(len(self._jobs))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"rbd-jobs-{self.backend}", daemon=True)
                self._thread.start()
            self._cv.notify()

    def pending(self, key: str) -> bool:
        with self._cv:
            return key in self._jobs or key == self._running

    def close(self, timeout: float = 15.0) -> bool:
        """Drop queued jobs and wait (bounded) for the running one; False if it still runs (then the caller must
        not shut down what the job uses)."""
        with self._cv:
            self._closed = True
            self._jobs.clear()
            self._heap.clear()
            JOBS_QUEUED.labels(self.backend).set(0)
            self._cv.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def _next(self) -> Optional[tuple[str, Callable[[], object], str, int]]:
        with self._cv:
            while not self._closed:
                if self._heap:
                    due, _, key = self._heap[0]
                    wait = due - time.monotonic()
                    if wait <= 0:
                        heapq.heappop(self._heap)
                        if key not in self._jobs:
                            continue
                        fn, kind, attempts = self._jobs.pop(key)
                        self._running = key
                        JOBS_QUEUED.labels(self.backend).set(len(self._jobs))
                        return key, fn, kind, attempts
                    self._cv.wait(wait)
                else:
                    self._cv.wait()
            return None

    def _loop(self) -> None:
        while True:
            item = self._next()
            if item is None:
                return
            key, fn, kind, attempts = item
            gauge = FLATTENS_IN_PROGRESS.labels(self.backend) if kind == "flatten" else None
            if gauge:
                gauge.inc()
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - a background job must not end the worker
                log.warning("background %s %s failed (attempt %d): %s", kind, key, attempts + 1, e)
                result = RETRY
            finally:
                if gauge:
                    gauge.dec()
            with self._cv:
                self._running = None
                if result is RETRY and not self._closed:
                    if attempts + 1 >= MAX_ATTEMPTS:
                        log.error("background %s %s gave up after %d attempts; the next request needing it "
                                  "queues it again", kind, key, attempts + 1)
                    elif key not in self._jobs:
                        self._jobs[key] = (fn, kind, attempts + 1)
                        # short at first: the usual wait is for the RPC that queued the job to release its lock
                        delay = min(5.0, self.retry_delay * (1 + attempts))
                        heapq.heappush(self._heap, (time.monotonic() + delay, next(self._seq), key))
                        JOBS_QUEUED.labels(self.backend).set(len(self._jobs))
