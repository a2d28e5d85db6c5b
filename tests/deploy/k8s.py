"""Load, render and validate the deploy/ files offline: the helpers every tests/deploy test shares.

Why these tools: `kubernetes-validate` carries the OpenAPI-derived JSON schemas of real Kubernetes releases, and its
strict variant rejects unknown fields, so a misspelled key fails instead of being silently dropped by the API
server. The chart is rendered by Helm's own Go template engine (the `helm-python-sdk` wheel bundles Helm's Go SDK as
a shared library), so `include`, `toYaml`, `required` and friends behave exactly as `helm template` does.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBE_DIR = DEPLOY / "kubernetes"
CHART_DIR = DEPLOY / "helm" / "tessera-csi"
VALUES_DIR = DEPLOY / "helm"
RELEASE = "tessera"
NAMESPACE = "tessera-csi"

try:
    import kubernetes_validate
    from kubernetes_validate import utils as kv_utils
except ImportError:  # pragma: no cover - reported loudly, fails under CI
    pytest.skip("MISSING: python package kubernetes-validate (pip install kubernetes-validate)",
                allow_module_level=True)
try:
    import helm_python
except ImportError:  # pragma: no cover
    pytest.skip("MISSING: python package helm-python-sdk (Helm's Go template engine)", allow_module_level=True)

from . import crd_schemas

# The newest Kubernetes release whose schemas the installed kubernetes-validate ships.
KUBE_VERSION = kv_utils.latest_version()


@dataclass
class Doc:
    """One Kubernetes object and where it came from (for readable failures)."""
    source: str
    obj: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.obj.get("kind", "")

    @property
    def name(self) -> str:
        return (self.obj.get("metadata") or {}).get("name", "")

    def __repr__(self) -> str:
        return f"{self.source}:{self.kind}/{self.name}"


def load_yaml_docs(text: str, source: str) -> list[Doc]:
    return [Doc(source, d) for d in yaml.safe_load_all(text) if d]


def manifest_files(under: Path = KUBE_DIR) -> list[Path]:
    return sorted(p for p in under.rglob("*.yaml") if p.is_file())


def manifest_docs(under: Path = KUBE_DIR) -> list[Doc]:
    docs: list[Doc] = []
    for p in manifest_files(under):
        docs.extend(load_yaml_docs(p.read_text(), str(p.relative_to(REPO))))
    return docs


def values_files() -> dict[str, Path]:
    """backend type → deploy/helm/values-<type>.yaml"""
    out = {}
    for p in sorted(VALUES_DIR.glob("values-*.yaml")):
        out[p.stem.removeprefix("values-")] = p
    return out


def render_chart(values: Optional[dict[str, Any]] = None) -> list[Doc]:
    """Render the chart with Helm's engine, after checking the values against values.schema.json."""
    with helm_python.Chart.load(str(CHART_DIR)) as chart:
        chart.validate_schema(values or {})
        rendered = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs: list[Doc] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt") or not text.strip():
            continue
        docs.extend(load_yaml_docs(text, path))
    return docs


def is_kustomization(doc: Doc) -> bool:
    return doc.obj.get("apiVersion", "").startswith("kustomize.config.k8s.io/")


def validate(doc: Doc) -> None:
    """Validate one object: Kubernetes built-ins against the release's strict schemas, our CRD kinds against the
    schemas in crd_schemas. Raises AssertionError naming the object and the failing path."""
    obj = doc.obj
    schema = crd_schemas.schema_for(obj.get("apiVersion", ""), obj.get("kind", ""))
    if schema is not None:
        problems = crd_schemas.errors(schema, obj)
        assert not problems, f"{doc!r} does not match its CRD schema: " + "; ".join(problems)
        return
    try:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        raise AssertionError(f"{doc!r} is invalid for Kubernetes {KUBE_VERSION}: {path}: {e.message}") from None
    except kubernetes_validate.SchemaNotFoundError as e:
        raise AssertionError(f"{doc!r}: no schema for {obj.get('apiVersion')}/{obj.get('kind')} "
                             f"(a misspelled apiVersion or kind?): {e}") from None


# ---- views on objects ------------------------------------------------------------------------------------------
def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d.kind == kind]


def pod_spec(doc: Doc) -> dict[str, Any]:
    return doc.obj["spec"]["template"]["spec"]


def containers(doc: Doc) -> Iterator[dict[str, Any]]:
    yield from pod_spec(doc).get("containers", [])


def container(doc: Doc, name: str) -> Optional[dict[str, Any]]:
    return next((c for c in containers(doc) if c["name"] == name), None)


def flag(args: list[str], name: str) -> Optional[str]:
    """Value of `--name=value` or `--name value` in an argument list; '' for a bare `--name`."""
    for i, a in enumerate(args):
        if a == name:
            nxt = args[i + 1] if i + 1 < len(args) else ""
            return "" if nxt.startswith("--") else nxt
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def volume_for_mount(doc: Doc, c: dict[str, Any], mount_path: str) -> Optional[dict[str, Any]]:
    """The pod volume mounted at mount_path (or an ancestor of it) in container c."""
    best = None
    for m in c.get("volumeMounts", []):
        mp = m["mountPath"].rstrip("/") or "/"
        if mount_path == mp or mount_path.startswith(mp + "/"):
            if best is None or len(mp) > len(best["mountPath"]):
                best = m
    if best is None:
        return None
    return next(v for v in pod_spec(doc)["volumes"] if v["name"] == best["name"])


def port_of(c: dict[str, Any], name: str) -> Optional[int]:
    return next((p["containerPort"] for p in c.get("ports", []) if p.get("name") == name), None)


def address_port(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


def substitute_env(arg: str) -> str:
    """Kubernetes expands $(VAR) in args from the container env; tests use a stand-in node name."""
    return re.sub(r"\$\((\w+)\)", lambda m: {"NODE_NAME": "node-a", "NAMESPACE": NAMESPACE}.get(m.group(1), "x"),
                  arg)


def config_from_configmap(doc: Doc) -> str:
    return doc.obj["data"][os.path.basename("config.yaml")]
