"""The few Kubernetes API calls the provisioner makes, through the official `kubernetes` client, returning plain
dicts (raw JSON) so that decide.py works on exactly what the API server sent."""
from __future__ import annotations

import datetime
import json
from typing import Any, Optional

from kubernetes import client
from kubernetes.client.rest import ApiException


class Conflict(Exception):
    """409: someone else created or changed the object first."""


class Kube:
    def __init__(self, api_client: client.ApiClient) -> None:
        self.api = api_client
        self.core = client.CoreV1Api(api_client)
        self.storage = client.StorageV1Api(api_client)
        self.coord = client.CoordinationV1Api(api_client)

    @staticmethod
    def _json(resp: Any) -> Any:
        return json.loads(resp.data)

    def _call(self, fn, *args: Any, **kw: Any) -> Any:
        try:
            return self._json(fn(*args, _preload_content=False, **kw))
        except ApiException as e:
            if e.status == 409:
                raise Conflict(str(e.reason)) from None
            raise

    # ---- reads --------------------------------------------------------------------------------------------
    def list_pvcs(self) -> list[dict]:
        return self._call(self.core.list_persistent_volume_claim_for_all_namespaces)["items"]

    def list_pvs(self) -> list[dict]:
        return self._call(self.core.list_persistent_volume)["items"]

    def list_storage_classes(self) -> list[dict]:
        return self._call(self.storage.list_storage_class)["items"]

    def get_secret(self, namespace: str, name: str) -> Optional[dict]:
        """A Secret as the API serves it (data base64-encoded), None if it does not exist. Errors name the Secret and
        the HTTP status only: the client's exception text carries the response, which must never reach a log."""
        try:
            return self._call(self.core.read_namespaced_secret, name, namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            hint = "; grant the provisioner's service account `get` on secrets" if e.status == 403 else ""
            raise RuntimeError(f"cannot read Secret {namespace}/{name}: HTTP {e.status} {e.reason}{hint}") from None

    def watch_pvcs(self, resource_version: str, timeout_seconds: int) -> list[dict]:
        """Wait (at most timeout_seconds) for PVC changes after resource_version; the events seen."""
        resp = self.core.list_persistent_volume_claim_for_all_namespaces(
            watch=True, resource_version=resource_version, timeout_seconds=timeout_seconds, _preload_content=False,
            _request_timeout=timeout_seconds + 5)
        events = []
        for line in resp.data.decode().splitlines():
            if line.strip():
                events.append(json.loads(line))
        return events

    # ---- writes -------------------------------------------------------------------------------------------
    def create_pv(self, pv: dict) -> dict:
        return self._call(self.core.create_persistent_volume, body=pv)

    def delete_pv(self, name: str) -> None:
        try:
            self._call(self.core.delete_persistent_volume, name)
        except ApiException as e:
            if e.status != 404:
                raise

    def event(self, obj: dict, name: str, event_type: str, reason: str, message: str, component: str) -> None:
        """Record an Event on `obj` (kubectl describe shows it). Events are best effort: a failure here never
        stops provisioning."""
        m = obj["metadata"]
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {"apiVersion": "v1", "kind": "Event",
                "metadata": {"name": name, "namespace": m.get("namespace", "default")},
                "involvedObject": {"apiVersion": obj.get("apiVersion", "v1"), "kind": obj.get("kind"),
                                   "name": m.get("name"), "namespace": m.get("namespace"), "uid": m.get("uid"),
                                   "resourceVersion": m.get("resourceVersion")},
                "type": event_type, "reason": reason, "message": message[:1024],
                "source": {"component": component}, "firstTimestamp": now, "lastTimestamp": now, "count": 1}
        try:
            self._call(self.core.create_namespaced_event, m.get("namespace", "default"), body=body)
        except Conflict:
            pass

    # ---- leases -------------------------------------------------------------------------------------------
    def get_lease(self, namespace: str, name: str) -> Optional[dict]:
        try:
            return self._call(self.coord.read_namespaced_lease, name, namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def create_lease(self, namespace: str, lease: dict) -> dict:
        return self._call(self.coord.create_namespaced_lease, namespace, body=lease)

    def replace_lease(self, namespace: str, name: str, lease: dict) -> dict:
        return self._call(self.coord.replace_namespaced_lease, name, namespace, body=lease)
