"""Leader election on a coordination.k8s.io/v1 Lease, so two replicas never provision the same claim twice.

The API server's optimistic concurrency does the hard part: a Lease is taken or renewed only by a create (409 if
another replica created it first) or a replace carrying the resourceVersion we read (409 if anyone wrote in
between). A holder that stops renewing loses the Lease after leaseDurationSeconds.
"""
from __future__ import annotations

import datetime
import logging
import time
from typing import Callable, Optional

from .kube import Conflict, Kube

log = logging.getLogger(__name__)


def _fmt(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(s: Optional[str]) -> float:
    """An RFC 3339 time as the API server (or another client) wrote it: 'Z' or '+00:00', with or without micros."""
    if not s:
        return 0.0
    t = datetime.datetime.fromisoformat(s.replace("Z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.timezone.utc)
    return t.timestamp()


class LeaderElector:
    def __init__(self, kube: Kube, namespace: str, name: str, identity: str, duration: int = 15,
                 clock: Callable[[], float] = time.time) -> None:
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.duration = duration
        self.clock = clock
        self._valid_until = 0.0

    def is_leader(self) -> bool:
        """True while our last successful renewal is younger than the lease duration (minus a safety margin)."""
        return self.clock() < self._valid_until

    def try_acquire(self) -> bool:
        """Take or renew the Lease; True if we hold it now."""
        now = self.clock()
        lease = self.kube.get_lease(self.namespace, self.name)
        spec_new = {"holderIdentity": self.identity, "leaseDurationSeconds": self.duration,
                    "renewTime": _fmt(now)}
        try:
            if lease is None:
                body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                        "metadata": {"name": self.name, "namespace": self.namespace},
                        "spec": {**spec_new, "acquireTime": _fmt(now), "leaseTransitions": 0}}
                self.kube.create_lease(self.namespace, body)
            else:
                spec = lease.get("spec") or {}
                holder = spec.get("holderIdentity") or ""
                expires = _parse(spec.get("renewTime")) + float(spec.get("leaseDurationSeconds") or self.duration)
                if holder and holder != self.identity and now < expires:
                    self._valid_until = 0.0
                    return False
                new_spec = dict(spec, **spec_new)
                if holder != self.identity:
                    new_spec["acquireTime"] = _fmt(now)
                    new_spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
                    log.info("taking over lease %s/%s from %r", self.namespace, self.name, holder)
                body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": lease["metadata"],
                        "spec": new_spec}
                self.kube.replace_lease(self.namespace, self.name, body)
        except Conflict:
            self._valid_until = 0.0
            return False
        self._valid_until = now + self.duration * 2 / 3
        return True

    def release(self) -> None:
        """Give the Lease up on shutdown so another replica takes over at once."""
        if not self.is_leader():
            return
        lease = self.kube.get_lease(self.namespace, self.name)
        if lease and (lease.get("spec") or {}).get("holderIdentity") == self.identity:
            body = dict(lease, spec=dict(lease["spec"], holderIdentity="", renewTime=None))
            try:
                self.kube.replace_lease(self.namespace, self.name, body)
            except Conflict:
                pass
        self._valid_until = 0.0
