"""Cross-checks applied to one install (a set of objects): the raw manifests and every chart render.

Each check raises AssertionError with the object it is about. They compare the deploy files with the code's own
names (csi.constants), the real CLI parser (csi.cli.parser), the real config parser (csi.config.parse_config) and
the backends' own parameter validation.
"""
from __future__ import annotations

import os
import posixpath
from typing import Any, Optional

import yaml

from csi import constants
from csi.cli import parser as cli_parser
from csi.config import Config, parse_config

from . import backend_facts as bf
from .k8s import (Doc, address_port, container, containers, flag, mount_for, of_kind, pod_spec,  # noqa: F401
                  port_of, substitute_env, volume_for_mount)

PLUGIN = "tessera-csi"
SOCKET_MOUNT = posixpath.dirname(constants.CONTROLLER_SOCKET_PATH)  # /csi in every pod
CSI_ADDRESS = constants.CONTROLLER_SOCKET_PATH                      # what every sidecar dials
NODE_HOST_PATHS = ("/dev", "/sys", "/run/udev", "/lib/modules", "/etc/iscsi", "/var/lib/iscsi", "/run/lock/lvm")
# Backend types whose volumes live on one node (Features.node_local in backends/file.py and backends/lvm.py).
NODE_LOCAL_TYPES = frozenset({"file", "lvm"})
# Backend options naming a file with a credential, and the plugin modes that read it: the rbd backend reads its
# keyring in the controller (connections without CSI secrets: Probe, ListVolumes, GetCapacity) and on the node
# (Probe, `rbd map --keyring`); the iscsi backend reads its CHAP key only in ControllerPublish.
SECRET_FILE_OPTIONS = {("rbd", "keyringPath"): ("controller", "node"), ("iscsi", "chapKeyFile"): ("controller",)}


# The flags of the pinned sidecar releases that the deploy files may use (from each sidecar's documented flags).
# A flag outside this list is a typo or a flag of another release: the sidecar would exit at start.
_COMMON = {"--csi-address", "--v", "--timeout", "--leader-election", "--leader-election-namespace"}
SIDECAR_FLAGS = {
    "csi-provisioner": _COMMON | {"--feature-gates", "--extra-create-metadata", "--default-fstype", "--node-deployment",
                                  "--strict-topology", "--immediate-topology"},
    "csi-attacher": _COMMON,
    "csi-resizer": _COMMON | {"--handle-volume-inuse-error", "--feature-gates"},
    "csi-snapshotter": _COMMON | {"--extra-create-metadata", "--node-deployment"},
    "node-driver-registrar": {"--v", "--csi-address", "--kubelet-registration-path", "--http-endpoint"},
    "liveness-probe": {"--csi-address", "--http-endpoint"},
    "csi-snapshot-metadata": {"--csi-address", "--tls-cert", "--tls-key", "--audience"},
}
SIDECAR_IMAGES = {"csi-provisioner": "csi-provisioner", "csi-attacher": "csi-attacher", "csi-resizer": "csi-resizer",
                  "csi-snapshotter": "csi-snapshotter", "node-driver-registrar": "csi-node-driver-registrar",
                  "liveness-probe": "livenessprobe", "csi-snapshot-metadata": "csi-snapshot-metadata"}


def check_sidecar_flags(doc: Doc) -> None:
    for c in containers(doc):
        if c["name"] == PLUGIN:
            continue
        assert c["name"] in SIDECAR_FLAGS, f"{doc!r}: unknown sidecar {c['name']}"
        image = c["image"].rsplit("/", 1)[-1].split(":")[0].split("@")[0]
        assert image == SIDECAR_IMAGES[c["name"]], f"{doc!r}: container {c['name']} runs {c['image']}"
        for a in c.get("args", []):
            name = a.split("=", 1)[0]
            assert name in SIDECAR_FLAGS[c["name"]], f"{doc!r} {c['name']}: unknown flag {a}"


def workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d.kind in ("Deployment", "DaemonSet", "StatefulSet")]


def plugin_workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in workloads(docs) if container(d, PLUGIN) is not None]


def plugin_args(c: dict[str, Any]):  # -> argparse.Namespace
    args = [substitute_env(a) for a in c.get("args", [])]
    return cli_parser().parse_args(args)


def role(doc: Doc) -> str:
    """'node' or 'controller' from the plugin's --mode flag."""
    mode = plugin_args(container(doc, PLUGIN)).mode
    assert mode in ("node", "controller"), f"{doc!r}: plugin --mode {mode!r}; deploy uses node or controller"
    return mode


def image_pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest", "canary")


def check_images(docs: list[Doc]) -> None:
    for d in workloads(docs):
        for c in containers(d):
            assert image_pinned(c["image"]), f"{d!r} container {c['name']}: image {c['image']!r} is not pinned"


def plugin_config(doc: Doc, configmaps: dict[str, str]) -> Config:
    """The config the plugin container of a workload reads: --config, mounted from a ConfigMap of the install."""
    c = container(doc, PLUGIN)
    a = plugin_args(c)
    assert a.config == constants.DEFAULT_CONFIG_PATH, f"{doc!r}: --config {a.config}"
    vol = volume_for_mount(doc, c, a.config)
    assert vol and "configMap" in vol, f"{doc!r}: {a.config} is not mounted from a ConfigMap"
    assert vol["configMap"]["name"] in configmaps, f"{doc!r}: ConfigMap {vol['configMap']['name']} is not installed"
    return parse_config(yaml.safe_load(configmaps[vol["configMap"]["name"]]), vol["configMap"]["name"])


def check_plugin_container(doc: Doc, configmaps: dict[str, str]) -> None:
    c = container(doc, PLUGIN)
    a = plugin_args(c)
    assert c["args"][0] == "serve", f"{doc!r}: the plugin must run `tessera-csi serve`"
    assert a.endpoint == f"unix://{CSI_ADDRESS}", f"{doc!r}: --endpoint {a.endpoint}"
    assert any(m["mountPath"] == SOCKET_MOUNT for m in c["volumeMounts"]), f"{doc!r}: no socket dir at {SOCKET_MOUNT}"
    # config: the default path, mounted from a ConfigMap of this install whose content the code accepts
    config = plugin_config(doc, configmaps)
    state_dir = a.state_dir or config.state_dir
    assert state_dir == constants.DEFAULT_STATE_DIR, f"{doc!r}: state dir {state_dir}"
    # node id from the downward API
    env = {e["name"]: e for e in c.get("env", [])}
    assert env.get("NODE_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName", \
        f"{doc!r}: NODE_NAME must come from spec.nodeName"
    # metrics and health ports agree with the flags
    assert a.metrics_address, f"{doc!r}: --metrics-address missing"
    assert port_of(c, "metrics") == address_port(a.metrics_address), f"{doc!r}: metrics port != --metrics-address"
    probe = container(doc, "liveness-probe")
    assert probe is not None, f"{doc!r}: no livenessprobe sidecar"
    health = flag(probe["args"], "--http-endpoint")
    assert health and port_of(c, "healthz") == address_port(health), f"{doc!r}: healthz port != livenessprobe"
    assert c["livenessProbe"]["httpGet"]["port"] == "healthz", f"{doc!r}: plugin livenessProbe must use healthz"
    ports = [p["containerPort"] for cc in containers(doc) for p in cc.get("ports", [])]
    assert len(ports) == len(set(ports)), f"{doc!r}: two containers use one port {ports}"


def check_sidecars_dial_plugin(doc: Doc) -> None:
    for c in containers(doc):
        if c["name"] == PLUGIN:
            continue
        assert flag(c.get("args", []), "--csi-address") == CSI_ADDRESS, f"{doc!r} {c['name']}: --csi-address"
        assert any(m["mountPath"] == SOCKET_MOUNT and m["name"] == "socket-dir" for m in c["volumeMounts"]), \
            f"{doc!r} {c['name']}: socket dir not mounted at {SOCKET_MOUNT}"


def check_node_plugin(doc: Doc) -> None:
    c = container(doc, PLUGIN)
    assert doc.kind == "DaemonSet", f"{doc!r}: the node plugin must be a DaemonSet"
    assert c["securityContext"].get("privileged") is True, f"{doc!r}: node plugin must be privileged"
    kubelet = [m for m in c["volumeMounts"] if m["mountPath"] == constants.KUBELET_DIR]
    assert kubelet and kubelet[0].get("mountPropagation") == "Bidirectional", \
        f"{doc!r}: {constants.KUBELET_DIR} must be mounted with Bidirectional propagation"
    for path in NODE_HOST_PATHS + (constants.KUBELET_DIR,):
        vol = volume_for_mount(doc, c, path)
        assert vol and vol.get("hostPath", {}).get("path") == path, f"{doc!r}: host {path} not mounted at {path}"
    sock = next(v for v in pod_spec(doc)["volumes"] if v["name"] == "socket-dir")
    assert sock["hostPath"]["path"] == posixpath.dirname(constants.NODE_SOCKET_PATH), f"{doc!r}: socket host dir"
    reg = container(doc, "node-driver-registrar")
    assert reg is not None, f"{doc!r}: no node-driver-registrar"
    assert flag(reg["args"], "--kubelet-registration-path") == constants.NODE_SOCKET_PATH, f"{doc!r}: registration"
    regdir = volume_for_mount(doc, reg, "/registration")
    assert regdir["hostPath"]["path"] == constants.REGISTRATION_SOCKET_DIR, f"{doc!r}: plugins_registry path"


def check_controller(doc: Doc, attach_required: bool) -> None:
    prov = container(doc, "csi-provisioner")
    assert prov is not None, f"{doc!r}: no csi-provisioner"
    pa = prov["args"]
    assert flag(pa, "--feature-gates") == "Topology=true", f"{doc!r}: provisioner needs --feature-gates=Topology=true"
    assert flag(pa, "--extra-create-metadata") is not None, f"{doc!r}: provisioner needs --extra-create-metadata"
    names = {c["name"] for c in containers(doc)}
    if doc.kind == "Deployment":
        assert {"csi-attacher", "csi-resizer", "csi-snapshotter", "liveness-probe"} <= names, f"{doc!r}: {names}"
        for c in containers(doc):
            if c["name"].startswith("csi-"):
                assert flag(c["args"], "--leader-election") == "true", f"{doc!r} {c['name']}: leader election"
    else:  # the node-local variant
        assert doc.kind == "DaemonSet", f"{doc!r}: controller is a Deployment or a per-node DaemonSet"
        assert flag(pa, "--node-deployment") == "true", f"{doc!r}: per-node provisioner needs --node-deployment=true"
        env = {e["name"]: e for e in prov.get("env", [])}
        assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName", f"{doc!r}: NODE_NAME"
        assert "csi-attacher" not in names and "csi-resizer" not in names, \
            f"{doc!r}: attacher/resizer have no per-node mode and must not run on every node"
        snap = container(doc, "csi-snapshotter")
        if snap is not None:
            assert flag(snap["args"], "--node-deployment") == "true", f"{doc!r}: snapshotter --node-deployment"
    # attachRequired true needs someone to handle VolumeAttachments
    assert attach_required == ("csi-attacher" in names), \
        f"{doc!r}: CSIDriver attachRequired={attach_required} but csi-attacher {'absent' if attach_required else 'present'}"


def configmaps_of(docs: list[Doc]) -> dict[str, str]:
    return {d.name: d.obj["data"]["config.yaml"] for d in of_kind(docs, "ConfigMap") if "config.yaml" in d.obj.get("data", {})}


def check_install(docs: list[Doc], attach_required: Optional[bool] = None) -> None:
    """The workload checks for one install (CSIDriver + controller + node plugin + config)."""
    drivers = of_kind(docs, "CSIDriver")
    assert len(drivers) == 1, f"one CSIDriver per install, got {drivers}"
    drv = drivers[0]
    if attach_required is None:
        attach_required = drv.obj["spec"]["attachRequired"]
    spec = drv.obj["spec"]
    assert spec["podInfoOnMount"] is True and spec["fsGroupPolicy"] == "File" \
        and spec["volumeLifecycleModes"] == ["Persistent"], f"{drv!r}: {spec}"
    cms = configmaps_of(docs)
    for cm_name, text in cms.items():
        cfg = parse_config(yaml.safe_load(text), cm_name)
        assert cfg.driver_name == drv.name, f"ConfigMap {cm_name}: driverName {cfg.driver_name} != CSIDriver {drv.name}"
    check_images(docs)
    roles = {}
    for d in plugin_workloads(docs):
        check_plugin_container(d, cms)
        check_sidecars_dial_plugin(d)
        check_sidecar_flags(d)
        roles.setdefault(role(d), []).append(d)
        if role(d) == "node":
            check_node_plugin(d)
        else:
            check_controller(d, attach_required)
    assert set(roles) == {"node", "controller"} and all(len(v) == 1 for v in roles.values()), \
        f"one node plugin and one controller per install: {roles}"
    for sa in {pod_spec(d).get("serviceAccountName") for d in workloads(docs)}:
        assert sa in {d.name for d in of_kind(docs, "ServiceAccount")}, f"ServiceAccount {sa} is not installed"
    check_backends_fit_the_install(docs)


def check_backends_fit_the_install(docs: list[Doc]) -> None:
    """The backends each plugin is configured with can be served by this install's shape: ControllerPublish needs
    attachRequired (csi-attacher), and a per-node controller serves exactly the node-local backends (CreateVolume
    must run where the volume will live), a central one none of them."""
    attach = of_kind(docs, "CSIDriver")[0].obj["spec"]["attachRequired"]
    cms = configmaps_of(docs)
    for d in plugin_workloads(docs):
        feats = {n: bf.backend_features(b) for n, b in plugin_config(d, cms).backends.items()}
        if not attach:
            publish = sorted(n for n, f in feats.items() if f.publish_needed)
            assert not publish, f"{d!r}: attachRequired is false, but backends {publish} need ControllerPublish"
        if role(d) == "controller":
            local = sorted(n for n, f in feats.items() if f.node_local)
            if d.kind == "DaemonSet":
                assert local == sorted(feats), f"{d!r}: a per-node controller serves shared backends {sorted(feats)}"
            else:
                assert not local, f"{d!r}: a central controller serves node-local backends {local}"


def secret_keys_of(secret: Doc) -> set[str]:
    return set(secret.obj.get("stringData") or {}) | set(secret.obj.get("data") or {})


def check_secret_files(docs: list[Doc], secrets: list[Doc]) -> list[tuple[Doc, str, Doc, str]]:
    """Every credential file a plugin's config names (SECRET_FILE_OPTIONS) is mounted in that plugin from a Secret
    (one of `secrets`: installed, or made by the documented commands) holding the key, and is readable by the
    plugin's user. Returns (workload, file, Secret, key) for each, for further checks of the content."""
    cms = configmaps_of(docs)
    available = {(d.obj["metadata"].get("namespace"), d.name): d for d in secrets}
    found = []
    for d in plugin_workloads(docs):
        c = container(d, PLUGIN)
        mode_of = role(d)
        for b in plugin_config(d, cms).backends.values():
            for (type_name, option), modes in SECRET_FILE_OPTIONS.items():
                path = getattr(b.options, option, None) if b.type == type_name else None
                if not path or mode_of not in modes:
                    continue
                where = f"{d!r}: backends.{b.name}.{option} {path}"
                mv = mount_for(d, c, path)
                assert mv and "secret" in mv[1], f"{where} is not mounted from a Secret"
                mount, vol = mv
                rel = posixpath.relpath(path, mount["mountPath"])
                items = vol["secret"].get("items")
                key = next((i["key"] for i in items if i["path"] == rel), None) if items else rel
                assert key, f"{where}: the Secret volume {vol['name']} has no item at {rel}"
                ref = (d.obj["metadata"].get("namespace"), vol["secret"]["secretName"])
                assert ref in available, f"{where}: Secret {ref[1]} is neither installed nor made by the instructions"
                assert key in secret_keys_of(available[ref]), f"{where}: Secret {ref[1]} has no key {key}"
                pod_sc = pod_spec(d).get("securityContext", {})
                uid = c.get("securityContext", {}).get("runAsUser", pod_sc.get("runAsUser"))
                if uid != 0:
                    mode = vol["secret"].get("defaultMode", 0o644)
                    fs_group = pod_sc.get("fsGroup")
                    assert mode & 0o004 or (fs_group is not None and mode & 0o040), \
                        f"{where}: uid {uid} cannot read it (defaultMode {mode:o}, fsGroup {fs_group})"
                found.append((d, path, available[ref], key))
    return found


def check_expansion(docs: list[Doc]) -> None:
    """A class that allows expansion needs a csi-resizer in the install (without one a resize stays pending)."""
    resizer = any(container(d, "csi-resizer") is not None for d in workloads(docs))
    for sc in of_kind(docs, "StorageClass"):
        if sc.obj.get("allowVolumeExpansion"):
            assert resizer, f"{sc!r}: allowVolumeExpansion is true but the install runs no csi-resizer"


def resizer_args(docs: list[Doc]) -> list[list[str]]:
    return [container(d, "csi-resizer")["args"] for d in workloads(docs) if container(d, "csi-resizer") is not None]


def check_storage_classes(docs: list[Doc], configs: dict[str, str]) -> None:
    """Every StorageClass names a configured backend and only parameters and secrets its backend reads."""
    backends: dict[str, str] = {}
    for name, text in configs.items():
        cfg = parse_config(yaml.safe_load(text), name)
        backends.update({n: b.type for n, b in cfg.backends.items()})
    secrets = {(d.obj["metadata"].get("namespace"), d.name): d for d in of_kind(docs, "Secret")}
    drivers = {d.name for d in of_kind(docs, "CSIDriver")}
    if plugin_workloads(docs):
        check_expansion(docs)
    for sc in of_kind(docs, "StorageClass"):
        o = sc.obj
        assert o["provisioner"] in drivers, f"{sc!r}: provisioner {o['provisioner']} is not this install's CSIDriver"
        params = o.get("parameters", {})
        backend = params.get(constants.PARAM_BACKEND)
        assert backend in backends, f"{sc!r}: backend {backend!r} is not configured ({sorted(backends)})"
        type_name = backends[backend]
        reserved = {k for k in params if k.startswith(bf.RESERVED_PREFIX)}
        assert reserved <= bf.RESERVED_SC_KEYS, f"{sc!r}: unknown reserved keys {sorted(reserved - bf.RESERVED_SC_KEYS)}"
        fs = params.get(f"{bf.RESERVED_PREFIX}fstype")
        assert fs in constants.SUPPORTED_FS_TYPES, f"{sc!r}: fstype {fs!r} (supported {constants.SUPPORTED_FS_TYPES})"
        bf.validate_sc_parameters(type_name, params)  # raises InvalidArgument for a parameter the backend refuses
        if type_name in NODE_LOCAL_TYPES:
            assert o.get("volumeBindingMode") == "WaitForFirstConsumer", f"{sc!r}: node-local needs WaitForFirstConsumer"
        wanted = bf.secret_keys(type_name)
        refs = {k.rsplit("-secret-", 1)[0]: (params.get(k.replace("-name", "-namespace")), v)
                for k, v in params.items() if k.endswith("-secret-name")}
        for kind, ref in refs.items():
            assert ref[0], f"{sc!r}: {kind} secret without a namespace"
            assert ref in secrets, f"{sc!r}: {kind} secret {ref[1]} in {ref[0]} is not installed"
            keys = set(secrets[ref].obj.get("stringData", {})) | set(secrets[ref].obj.get("data", {}))
            assert wanted <= keys, f"{sc!r}: secret {ref[1]} lacks keys {sorted(wanted - keys)} the {type_name} backend reads"
        if wanted:
            assert refs, f"{sc!r}: the {type_name} backend reads secrets {sorted(wanted)} but the class names none"


def check_snapshot_classes(docs: list[Doc]) -> None:
    """Snapshot classes name this driver, only snapshotter-secret parameters (the backends take no snapshot
    parameters), and secrets that are installed and hold the keys some backend reads."""
    drivers = {d.name for d in of_kind(docs, "CSIDriver")}
    secrets = {(d.obj["metadata"].get("namespace"), d.name): d for d in of_kind(docs, "Secret")}
    readable = set().union(*(bf.secret_keys(t) for t in bf.backend_types()))
    for vsc in of_kind(docs, "VolumeSnapshotClass"):
        assert vsc.obj["driver"] in drivers, f"{vsc!r}: driver {vsc.obj['driver']} is not this install's"
        params = vsc.obj.get("parameters", {})
        keys = set(params)
        assert keys <= bf.RESERVED_SNAPSHOT_KEYS, f"{vsc!r}: parameters {sorted(keys - bf.RESERVED_SNAPSHOT_KEYS)}"
        name = params.get(f"{bf.RESERVED_PREFIX}snapshotter-secret-name")
        if name:
            ref = (params.get(f"{bf.RESERVED_PREFIX}snapshotter-secret-namespace"), name)
            assert ref in secrets, f"{vsc!r}: snapshotter secret {ref} is not installed"
            held = set(secrets[ref].obj.get("stringData", {})) | set(secrets[ref].obj.get("data", {}))
            assert held & readable, f"{vsc!r}: secret {name} holds none of the keys a backend reads"


def storage_class_types(docs: list[Doc], configs: dict[str, str]) -> set[str]:
    backends: dict[str, str] = {}
    for name, text in configs.items():
        backends.update({n: b.type for n, b in parse_config(yaml.safe_load(text), name).backends.items()})
    return {backends[sc.obj["parameters"][constants.PARAM_BACKEND]] for sc in of_kind(docs, "StorageClass")}


def configured_backends(docs: list[Doc]) -> dict[str, Any]:
    """name → BackendConfig of every ConfigMap config of an install."""
    out: dict[str, Any] = {}
    for name, text in configmaps_of(docs).items():
        out.update(parse_config(yaml.safe_load(text), name).backends)
    return out


__all__ = ["check_backends_fit_the_install", "check_expansion", "check_install", "check_secret_files",
           "check_snapshot_classes", "check_storage_classes", "configmaps_of", "configured_backends", "container",
           "parse_config", "plugin_config", "pod_spec", "posixpath", "resizer_args", "secret_keys_of",
           "storage_class_types", "volume_for_mount", "os"]
