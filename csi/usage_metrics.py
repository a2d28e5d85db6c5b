"""Gauges of how full each backend is, and how many volumes a node has staged, for Prometheus.

Why a background refresher: the figures come from the storage (a VG report, a pool's usage from the ceph-mgr, a
directory listing), which may be slow or hang while the storage is in trouble — exactly when someone is looking.
A scrape therefore only reads the last figures; one thread refreshes them every `interval` seconds, and each
backend's refresh time and success are exported too, so a stale figure is visible as such.

Exported (one series per backend unless said otherwise):
- tessera_backend_capacity_bytes{backend,kind="total|free"}
- tessera_backend_volumes{backend}, tessera_backend_snapshots{backend}
- tessera_backend_gauge{backend,name}: the storage's own figures (LVM thin pool: thin_data_percent,
  thin_metadata_percent; RBD: pool_used_percent when a ceph-mgr answers)
- tessera_backend_usage_up{backend}: 1 when the last refresh read every figure, 0 when some failed
- tessera_backend_usage_age_seconds{backend}: seconds since that refresh
- tessera_node_staged_volumes: stage records of this node plugin (node mode)
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Iterable, Optional

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from backends.base import Usage

from .registry import Backends

log = logging.getLogger(__name__)


class UsageCollector(Collector):
    def __init__(self, backends: Backends, stage_record_dir: Optional[str] = None, interval: float = 30.0,
                 controller: bool = True) -> None:
        self.backends = backends
        self.stage_record_dir = stage_record_dir
        self.interval = interval
        self.controller = controller
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, Usage]] = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # ---- refreshing ---------------------------------------------------------------------------------------
    def refresh_once(self) -> None:
        if not self.controller:
            return
        for b in self.backends:
            try:
                usage = b.usage()
            except Exception as e:  # noqa: BLE001 - a backend bug must not end the metrics thread
                usage = Usage(problems=[f"usage: {type(e).__name__}: {e}"])
            if usage.problems:
                log.warning('{"event": "usage", "backend": "%s", "problems": %d, "first": "%s"}', b.name,
                            len(usage.problems), usage.problems[0][:200].replace('"', "'"))
            with self._lock:
                self._last[b.name] = (time.monotonic(), usage)

    def start(self) -> "UsageCollector":
        def loop() -> None:
            while not self._stop.is_set():
                self.refresh_once()
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=loop, name="usage-metrics", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    # ---- scraping -----------------------------------------------------------------------------------------
    def _staged_count(self) -> Optional[int]:
        if not self.stage_record_dir:
            return None
        try:
            return sum(1 for n in os.listdir(self.stage_record_dir) if n.endswith(".json"))
        except FileNotFoundError:
            return 0

    def collect(self) -> Iterable[GaugeMetricFamily]:
        capacity = GaugeMetricFamily("tessera_backend_capacity_bytes", "Backend capacity in bytes",
                                     labels=["backend", "kind"])
        volumes = GaugeMetricFamily("tessera_backend_volumes", "Volumes the backend holds", labels=["backend"])
        snapshots = GaugeMetricFamily("tessera_backend_snapshots", "Snapshots the backend holds", labels=["backend"])
        gauges = GaugeMetricFamily("tessera_backend_gauge", "The storage's own figures (thin pool use, ...)",
                                   labels=["backend", "name"])
        up = GaugeMetricFamily("tessera_backend_usage_up", "1 when the last usage refresh read every figure",
                               labels=["backend"])
        age = GaugeMetricFamily("tessera_backend_usage_age_seconds", "Seconds since the last usage refresh",
                                labels=["backend"])
        now = time.monotonic()
        with self._lock:
            last = dict(self._last)
        for name, (at, u) in sorted(last.items()):
            if u.total_bytes is not None:
                capacity.add_metric([name, "total"], u.total_bytes)
            if u.free_bytes is not None:
                capacity.add_metric([name, "free"], u.free_bytes)
            if u.volumes is not None:
                volumes.add_metric([name], u.volumes)
            if u.snapshots is not None:
                snapshots.add_metric([name], u.snapshots)
            for g, v in sorted(u.gauges.items()):
                gauges.add_metric([name, g], v)
            up.add_metric([name], 0 if u.problems else 1)
            age.add_metric([name], now - at)
        yield from (capacity, volumes, snapshots, gauges, up, age)
        staged = self._staged_count()
        if staged is not None:
            g = GaugeMetricFamily("tessera_node_staged_volumes", "Volumes staged on this node (stage records)")
            g.add_metric([], staged)
            yield g


def register(collector: UsageCollector) -> UsageCollector:
    REGISTRY.register(collector)
    return collector
