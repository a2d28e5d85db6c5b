"""The provisioner loop: while leader, list claims/PVs/classes, plan (decide.py), act, record failures as Events and
retry them with exponential backoff. Level-triggered: every pass starts from the API's current state, so a crash or
a lost leadership at any point is repaired by the next pass of whichever replica leads."""
from __future__ import annotations

import logging
import time
from typing import Callable

from backends.base import CapabilitySpec

from . import decide
from .kube import Conflict, Kube
from .leader import LeaderElector

log = logging.getLogger(__name__)
COMPONENT = "tessera-flex-provisioner"


class Provisioner:
    def __init__(self, kube: Kube, controller_ops, elector: LeaderElector, my_node: str,
                 name: str = decide.PROVISIONER_NAME, clock: Callable[[], float] = time.time) -> None:
        self.kube = kube
        self.ops = controller_ops
        self.elector = elector
        self.my_node = my_node
        self.name = name
        self.clock = clock
        self.failures: dict[str, int] = {}       # object uid -> consecutive failures
        self.not_before: dict[str, float] = {}   # object uid -> earliest retry time

    def _node_local_backends(self) -> frozenset[str]:
        return frozenset(b.name for b in self.ops.backends if b.features().node_local)

    def _access_modes(self) -> dict[str, frozenset[str]]:
        return {b.name: frozenset(b.features().access_modes) for b in self.ops.backends}

    def _secret(self, ref: decide.SecretRef) -> dict[str, str]:
        """A Secret's data for a backend call; the values go nowhere else (no log, no event, no PV)."""
        secret = self.kube.get_secret(ref.namespace, ref.name)
        if secret is None:
            raise decide.Unprovisionable(f"Secret {ref} (StorageClass provisioner secret) does not exist")
        return decide.secret_data(secret, ref)

    def reconcile_once(self) -> list[str]:
        """One pass. Returns what was done ("provisioned <pv>", "deleted <pv>", "failed <pvc>: ...") for logs/tests."""
        if not self.elector.try_acquire():
            return []
        actions = decide.plan(self.kube.list_pvcs(), self.kube.list_pvs(), self.kube.list_storage_classes(),
                              self.my_node, self._node_local_backends(), self.ops.backends.config.default_backend,
                              self.name, self._access_modes())
        done: list[str] = []
        for action in actions:
            obj = action.pv if isinstance(action, decide.Delete) else action.pvc
            uid = decide.meta(obj).get("uid") or decide.meta(obj).get("name")
            if self.clock() < self.not_before.get(uid, 0.0):
                continue
            if not self.elector.is_leader() and not self.elector.try_acquire():
                break  # lost the lease mid-pass: stop acting at once
            try:
                done.append(self._act(action))
                self.failures.pop(uid, None)
                self.not_before.pop(uid, None)
            except Exception as e:  # noqa: BLE001 - any failure is reported on the object and retried later
                n = self.failures.get(uid, 0) + 1
                self.failures[uid] = n
                delay = decide.backoff_delay(n)
                self.not_before[uid] = self.clock() + delay
                reason = "VolumeFailedDelete" if isinstance(action, decide.Delete) else "ProvisioningFailed"
                msg = f"{e} (attempt {n}; retrying in {delay:.0f}s)"
                log.warning("%s %s: %s", reason, decide.meta(obj).get("name"), msg)
                self.kube.event(obj, decide.event_name(obj, reason), "Warning", reason, msg, COMPONENT)
                done.append(f"failed {decide.meta(obj).get('name')}: {e}")
        return done

    def _act(self, action: decide.Action) -> str:
        if isinstance(action, decide.Reject):
            raise decide.Unprovisionable(action.reason)
        if isinstance(action, decide.Delete):
            self.ops.delete_volume(action.volume_id, self._secret(action.secret) if action.secret else {})
            self.kube.delete_pv(decide.meta(action.pv)["name"])
            return f"deleted {decide.meta(action.pv)['name']}"
        req = action.request
        secrets = self._secret(req.provisioner_secret) if req.provisioner_secret else {}
        if req.stage_secret:  # checked before anything is made: a wrong one would fail every mount later
            decide.check_stage_secret(self.kube.get_secret(req.stage_secret.namespace, req.stage_secret.name),
                                      req.stage_secret)
        caps = [CapabilitySpec("mount", mode, req.fs_type, tuple(req.mount_options)) for mode in req.access_modes]
        volume_id, vol = self.ops.create_volume(req.name, req.required_bytes, req.limit_bytes, caps, req.parameters,
                                                secrets, None, req.requisite, ())
        pv = decide.build_pv(action.pvc, action.storage_class, req, volume_id, vol.capacity_bytes, vol.context,
                             vol.topology, self.name)
        try:
            self.kube.create_pv(pv)
        except Conflict:
            pass  # an earlier pass (ours or another leader's) made it: same name, same volume
        name = decide.meta(pv)["name"]
        self.kube.event(action.pvc, decide.event_name(action.pvc, "ProvisioningSucceeded"), "Normal",
                        "ProvisioningSucceeded", f"Successfully provisioned volume {name} ({volume_id})", COMPONENT)
        return f"provisioned {name}"

    def run(self, stop: Callable[[], bool], resync: float = 30.0, watch_timeout: int = 10) -> None:
        """Reconcile, then wait for a PVC change (watch) or the resync period, until stop()."""
        rv = ""
        while not stop():
            try:
                self.reconcile_once()
                if not self.elector.is_leader():
                    time.sleep(min(resync, self.elector.duration / 3))
                    continue
                rv = rv or self._current_rv()
                events = self.kube.watch_pvcs(rv, int(min(watch_timeout, resync)))
                for ev in events:
                    rv = decide.meta(ev.get("object") or {}).get("resourceVersion") or rv
            except Exception:  # noqa: BLE001 - the API server may be away for a while; keep trying
                log.exception("provisioner pass failed; retrying")
                rv = ""
                time.sleep(2)
        self.elector.release()

    def _current_rv(self) -> str:
        pvcs = self.kube.list_pvcs()
        return max((decide.meta(p).get("resourceVersion") or "0" for p in pvcs), key=int, default="0")
