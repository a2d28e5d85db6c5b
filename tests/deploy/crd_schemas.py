"""JSON schemas for the custom resources the deploy files use, written from the CRD definitions' facts.

kubernetes-validate only knows built-in kinds. VolumeSnapshotClass (snapshot.storage.k8s.io/v1, from the
external-snapshotter CRDs), ServiceMonitor (monitoring.coreos.com/v1, Prometheus Operator) and
SnapshotMetadataService (cbt.storage.k8s.io/v1alpha1, external-snapshot-metadata) are checked here,
with additionalProperties false at every level we describe, so a misspelled field fails as it would for the
built-ins. The ServiceMonitor schema covers the fields our chart may emit plus the common ones; anything else is
an error, which is the point.
"""
from __future__ import annotations

from typing import Any, Optional

import jsonschema

_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_DNS_SUBDOMAIN = {"type": "string", "maxLength": 253, "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"}

_METADATA_CLUSTER = {
    "type": "object", "additionalProperties": False, "required": ["name"],
    "properties": {"name": _DNS_SUBDOMAIN, "labels": _STR_MAP, "annotations": _STR_MAP},
}
_METADATA_NAMESPACED = {
    "type": "object", "additionalProperties": False, "required": ["name"],
    "properties": {"name": _DNS_SUBDOMAIN, "namespace": _DNS_SUBDOMAIN, "labels": _STR_MAP,
                   "annotations": _STR_MAP},
}

VOLUME_SNAPSHOT_CLASS = {
    "type": "object", "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "driver", "deletionPolicy"],
    "properties": {
        "apiVersion": {"const": "snapshot.storage.k8s.io/v1"},
        "kind": {"const": "VolumeSnapshotClass"},
        "metadata": _METADATA_CLUSTER,
        "driver": {"type": "string", "minLength": 1},
        "deletionPolicy": {"enum": ["Delete", "Retain"]},
        "parameters": _STR_MAP,
    },
}

_LABEL_SELECTOR = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "matchLabels": _STR_MAP,
        "matchExpressions": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["key", "operator"],
            "properties": {"key": {"type": "string"}, "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                           "values": {"type": "array", "items": {"type": "string"}}}}},
    },
}
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
                                         r"(([0-9]+)s)?(([0-9]+)ms)?)$"}
_ENDPOINT = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "port": {"type": "string"},
        "targetPort": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
        "path": {"type": "string"},
        "scheme": {"enum": ["http", "https"]},
        "params": {"type": "object"},
        "interval": _DURATION,
        "scrapeTimeout": _DURATION,
        "honorLabels": {"type": "boolean"},
        "honorTimestamps": {"type": "boolean"},
        "relabelings": {"type": "array", "items": {"type": "object"}},
        "metricRelabelings": {"type": "array", "items": {"type": "object"}},
        "tlsConfig": {"type": "object"},
        "bearerTokenSecret": {"type": "object"},
        "authorization": {"type": "object"},
    },
}
SERVICE_MONITOR = {
    "type": "object", "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": _METADATA_NAMESPACED,
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
            "properties": {
                "selector": _LABEL_SELECTOR,
                "namespaceSelector": {"type": "object", "additionalProperties": False,
                                      "properties": {"any": {"type": "boolean"},
                                                     "matchNames": {"type": "array", "items": {"type": "string"}}}},
                "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
                "jobLabel": {"type": "string"},
                "targetLabels": {"type": "array", "items": {"type": "string"}},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "sampleLimit": {"type": "integer", "minimum": 0},
            },
        },
    },
}

# cbt.storage.k8s.io/v1alpha1 SnapshotMetadataService (external-snapshot-metadata's CRD): cluster-scoped, spec with
# the three required strings address, audience and caCert (format byte: base64).
SNAPSHOT_METADATA_SERVICE = {
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "cbt.storage.k8s.io/v1alpha1"},
        "kind": {"const": "SnapshotMetadataService"},
        "metadata": _METADATA_CLUSTER,
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["address", "audience", "caCert"],
            "properties": {
                "address": {"type": "string", "minLength": 1},
                "audience": {"type": "string", "minLength": 1},
                "caCert": {"type": "string", "minLength": 1,
                           "pattern": r"^([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"},
            },
        },
    },
}

_SCHEMAS = {
    ("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass"): VOLUME_SNAPSHOT_CLASS,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("cbt.storage.k8s.io/v1alpha1", "SnapshotMetadataService"): SNAPSHOT_METADATA_SERVICE,
}
CRD_GROUPS = {"snapshot.storage.k8s.io", "monitoring.coreos.com", "cbt.storage.k8s.io"}


def schema_for(api_version: str, kind: str) -> Optional[dict[str, Any]]:
    """The schema for a CRD kind we know; for any other kind of a CRD group, a schema that always fails (so an
    unknown apiVersion/kind pair of those groups is an error, not a silent pass); None for built-ins."""
    if (api_version, kind) in _SCHEMAS:
        return _SCHEMAS[(api_version, kind)]
    if api_version.split("/")[0] in CRD_GROUPS:
        return {"not": {}, "description": f"unknown kind {api_version}/{kind}"}
    return None


def errors(schema: dict[str, Any], obj: dict[str, Any]) -> list[str]:
    v = jsonschema.Draft202012Validator(schema)
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}" for e in v.iter_errors(obj)]
