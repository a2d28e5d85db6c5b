"""Load, render and validate the deploy/ files offline: the helpers every tests/deploy test shares.

Why these tools: `kubernetes-validate` carries the OpenAPI-derived JSON schemas of real Kubernetes releases, and its
strict variant rejects unknown fields, so a misspelled key fails instead of being silently dropped by the API
server. The chart is rendered by Helm's own Go template engine (the `helm-python-sdk` wheel bundles Helm's Go SDK as
a shared library), so `include`, `toYaml`, `required` and friends behave exactly as `helm template` does.

The kustomize flavours are built here by a small builder (`kustomize_build`) that knows only what deploy/kubernetes
uses: `resources` (files and directories) and `patches` (strategic-merge patch files, merged on the Kubernetes
patch-merge keys). Any other kustomization field fails the build, so a new feature cannot be silently ignored;
test_manifests compares the builder's output with `kubectl kustomize` wherever kubectl is installed.
"""
from __future__ import annotations

import copy
import os
import re
import shlex
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


# ---- kustomize ---------------------------------------------------------------------------------------------------
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "patches"}
# x-kubernetes-patch-merge-key of the lists deploy/kubernetes patches (the rest are replaced, as kustomize does).
PATCH_MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name", "volumeMounts": "mountPath",
                    "env": "name", "ports": "containerPort", "imagePullSecrets": "name", "items": "key"}


def kustomization(directory: Path) -> dict[str, Any]:
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(k) - KUSTOMIZATION_FIELDS
    assert not unknown, f"{directory}: kustomization fields {sorted(unknown)} are unknown to the test builder"
    for p in k.get("patches", []):
        assert set(p) == {"path"}, f"{directory}: only `patches: - path:` is supported by the test builder, got {p}"
    return k


def patch_files(under: Path = KUBE_DIR) -> set[Path]:
    """Files used as patches by some kustomization (partial objects: validated only as part of a build)."""
    out: set[Path] = set()
    for kfile in under.rglob("kustomization.yaml"):
        k = yaml.safe_load(kfile.read_text())
        out.update((kfile.parent / p["path"]).resolve() for p in k.get("patches", []) if "path" in p)
    return out


def _key(obj: dict[str, Any]) -> tuple[str, str, str]:
    md = obj.get("metadata") or {}
    return obj.get("kind", ""), md.get("namespace", ""), md.get("name", "")


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    """A strategic-merge patch as kustomize applies it, for maps and the merge-keyed lists in PATCH_MERGE_KEYS."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            assert not str(k).startswith("$"), f"patch directive {k} is unknown to the test builder"
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = strategic_merge(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and field in PATCH_MERGE_KEYS:
        key = PATCH_MERGE_KEYS[field]
        out, new = list(base), []
        for item in patch:
            i = next((n for n, b in enumerate(out) if isinstance(b, dict) and b.get(key) == item.get(key)), None)
            if i is None:
                new.append(copy.deepcopy(item))
            else:
                out[i] = strategic_merge(out[i], item)
        return new + out  # kustomize puts the patch's new items first
    return copy.deepcopy(patch)


def kustomize_build(directory: Path) -> list[Doc]:
    """The objects `kubectl apply -k directory` would send (see the module doc for what is supported)."""
    k = kustomization(directory)
    docs: list[Doc] = []
    for entry in k.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            docs.extend(kustomize_build(path))
        else:
            assert path.is_relative_to(directory.resolve()), f"{directory}: kustomize refuses the file {entry}"
            docs.extend(load_yaml_docs(path.read_text(), str(path.relative_to(REPO))))
    seen: set[tuple[str, str, str]] = set()
    for d in docs:
        assert _key(d.obj) not in seen, f"{directory}: {d!r} is defined twice"
        seen.add(_key(d.obj))
    for p in k.get("patches", []):
        for patch in load_yaml_docs((directory / p["path"]).read_text(), p["path"]):
            pk = _key(patch.obj)
            target = [d for d in docs if d.kind == pk[0] and d.name == pk[2] and (not pk[1] or _key(d.obj)[1] == pk[1])]
            assert len(target) == 1, f"{directory}: patch {patch!r} matches {target}"
            target[0].obj = strategic_merge(target[0].obj, patch.obj)
    return docs


# ---- commands written in comments -------------------------------------------------------------------------------
def documented_commands(path: Path, programs: tuple[str, ...] = ("kubectl", "helm")) -> list[list[str]]:
    """The shell commands a file's comments tell the operator to run (lines starting with one of `programs`,
    backslash continuations joined), split as the shell would."""
    cmds: list[list[str]] = []
    buf = ""
    for line in path.read_text().splitlines():
        s = line.strip()
        if not s.startswith("#"):
            buf = ""
            continue
        s = s[1:].strip()
        if buf:
            buf += " " + s
        elif s.split(" ", 1)[0] in programs:
            buf = s
        else:
            continue
        if buf.endswith("\\"):
            buf = buf[:-1].rstrip()
            continue
        cmds.append(shlex.split(buf))
        buf = ""
    return cmds


def documented_secrets(path: Path) -> list[Doc]:
    """The Secrets made by the `kubectl create secret generic` commands in a file's comments, as stand-in objects
    whose stringData has the keys the command sets."""
    out = []
    for argv in documented_commands(path):
        if argv[:1] != ["kubectl"] or "secret" not in argv or "generic" not in argv:
            continue
        ns = flag(argv, "-n") or flag(argv, "--namespace")
        name = argv[argv.index("generic") + 1]
        keys = {}
        for a in argv:
            for opt in ("--from-literal=", "--from-file="):
                if a.startswith(opt):
                    spec = a[len(opt):]
                    key = spec.split("=", 1)[0] if "=" in spec else os.path.basename(spec)
                    keys[key] = "<set by the operator>"
        out.append(Doc(f"{path.relative_to(REPO)} (command)", {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": ns}, "stringData": keys}))
    return out


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


def mount_for(doc: Doc, c: dict[str, Any], mount_path: str) -> Optional[tuple[dict[str, Any], dict[str, Any]]]:
    """(volumeMount, pod volume) of container c that holds mount_path (the mount at it or at its nearest ancestor)."""
    best = None
    for m in c.get("volumeMounts", []):
        mp = m["mountPath"].rstrip("/") or "/"
        if mount_path == mp or mount_path.startswith(mp + "/"):
            if best is None or len(mp) > len(best["mountPath"].rstrip("/") or "/"):
                best = m
    if best is None:
        return None
    return best, next(v for v in pod_spec(doc)["volumes"] if v["name"] == best["name"])


def volume_for_mount(doc: Doc, c: dict[str, Any], mount_path: str) -> Optional[dict[str, Any]]:
    """The pod volume mounted at mount_path (or an ancestor of it) in container c."""
    found = mount_for(doc, c, mount_path)
    return found[1] if found else None


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
