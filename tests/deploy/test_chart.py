"""deploy/helm/tessera-csi rendered by Helm's own engine, for the defaults and every values-<backend>.yaml."""
from __future__ import annotations

import copy
from typing import Any, Optional

import pytest
import yaml

from backends import backend_types
from csi import constants

from . import checks
from .k8s import (CHART_DIR, KUBE_DIR, Doc, container, documented_commands, helm_python, kustomize_build, of_kind,
                  render_chart, validate, values_files)

# Stand-ins for the keys the operator passes with --set-string (a values file never holds a credential).
OPERATOR_VALUES = {"secrets.ceph.userKey": "AQDsomeCephxKeyForTheTestsOnly0000000000==",
                   "secrets.chap.key": "dGVzdC1vbmx5LWNoYXAta2V5LW9mLTMyLWJ5dGVzISE="}


def set_strings(case: str) -> list[str]:
    """The value paths the values file's `helm install` command passes with --set-string."""
    if case == "default":
        return []
    out = []
    for argv in documented_commands(values_files()[case.removeprefix("values-")]):
        if argv[:2] == ["helm", "install"]:
            out += [a.split("=", 1)[0] for prev, a in zip(argv, argv[1:]) if prev == "--set-string"]
    return out


def with_operator_values(case: str, values: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    values = copy.deepcopy(values)
    for path in set_strings(case):
        node = values
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = OPERATOR_VALUES[path]
    return values


SHIPPED: dict[str, Optional[dict[str, Any]]] = {"default": None}
SHIPPED.update({f"values-{t}": yaml.safe_load(p.read_text()) for t, p in values_files().items()})
# What `helm install` gets when the values file's documented command is run.
CASES = {case: with_operator_values(case, v) for case, v in SHIPPED.items()}
_RENDERS: dict[str, list[Doc]] = {}


def rendered(case: str) -> list[Doc]:
    if case not in _RENDERS:
        _RENDERS[case] = render_chart(copy.deepcopy(CASES[case]))
    return _RENDERS[case]


@pytest.mark.parametrize("case", sorted(CASES))
def test_render_validates_against_kubernetes_schemas(case: str) -> None:
    docs = rendered(case)
    assert docs, "the chart rendered nothing"
    for d in docs:
        validate(d)


@pytest.mark.parametrize("case", sorted(CASES))
def test_render_is_consistent_with_the_code(case: str) -> None:
    docs = rendered(case)
    checks.check_install(docs)
    assert of_kind(docs, "CSIDriver")[0].name == constants.DRIVER_NAME
    checks.check_storage_classes(docs, checks.configmaps_of(docs))
    checks.check_snapshot_classes(docs)


def test_a_values_file_per_backend_type() -> None:
    assert set(values_files()) == set(backend_types())
    for t in backend_types():
        docs = rendered(f"values-{t}")
        assert checks.storage_class_types(docs, checks.configmaps_of(docs)) == {t}


@pytest.mark.parametrize("mode,kind,attach", [("shared", "Deployment", True), ("nodeLocal", "DaemonSet", False)])
def test_controller_mode_chooses_workload_and_attach(mode: str, kind: str, attach: bool) -> None:
    docs = render_chart({"controllerMode": mode})
    ctrl = [d for d in checks.plugin_workloads(docs) if checks.role(d) == "controller"]
    assert [d.kind for d in ctrl] == [kind]
    assert of_kind(docs, "CSIDriver")[0].obj["spec"]["attachRequired"] is attach
    roles = {d.name.rsplit("-", 1)[-1] for d in of_kind(docs, "ClusterRole")}
    assert roles == ({"provisioner", "snapshotter", "attacher", "resizer"} if attach else {"provisioner", "snapshotter"})


@pytest.mark.parametrize("bad", [
    {"controllerMode": "central"},
    {"driverName": "Tessera_CSI"},
    {"sidecars": {"provisioner": {"image": "registry.k8s.io/sig-storage/csi-provisioner:latest"}}},
    {"config": {"stateDir": "/var/lib/tessera", "backends": {"x": {"type": "nfs"}}}},
    {"storageClasses": [{"name": "a", "backend": "local", "fsType": "btrfs"}]},
    {"storageClasses": [{"name": "a", "backend": "local", "secrets": {"provisoner": "s"}}]},
    {"node": {"kubletDir": "/var/lib/kubelet"}},
], ids=lambda v: next(iter(v)))
def test_values_schema_rejects_mistakes(bad: dict[str, Any]) -> None:
    with helm_python.Chart.load(str(CHART_DIR)) as chart:
        with pytest.raises(helm_python.HelmValuesError):
            chart.validate_schema(bad)


def test_metrics_services_and_service_monitor_select_the_plugin_pods() -> None:
    docs = render_chart({"metrics": {"service": True, "serviceMonitor": {"enabled": True, "labels": {"release": "p"}}}})
    for d in docs:
        validate(d)
    services = of_kind(docs, "Service")
    pods = {d.name: d.obj["spec"]["template"]["metadata"]["labels"] for d in checks.plugin_workloads(docs)}
    assert len(services) == 2
    for svc in services:
        sel = svc.obj["spec"]["selector"]
        matched = [n for n, labels in pods.items() if sel.items() <= labels.items()]
        assert len(matched) == 1, f"{svc!r} selects {matched}"
        wl = next(d for d in docs if d.name == matched[0] and d.kind in ("Deployment", "DaemonSet"))
        port = svc.obj["spec"]["ports"][0]
        assert port["targetPort"] == "metrics"
        assert port["port"] == next(p["containerPort"] for p in container(wl, "tessera-csi")["ports"]
                                    if p["name"] == "metrics")
    sm = of_kind(docs, "ServiceMonitor")[0].obj
    assert sm["metadata"]["labels"]["release"] == "p"
    for svc in services:
        assert sm["spec"]["selector"]["matchLabels"].items() <= svc.obj["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"


def test_allowed_nodes_use_the_code_topology_key() -> None:
    docs = render_chart({"storageClasses": [{"name": "pinned", "backend": "local", "fsType": "ext4",
                                             "volumeBindingMode": "WaitForFirstConsumer",
                                             "allowedNodes": ["node-a", "node-b"]}]})
    sc = of_kind(docs, "StorageClass")[0]
    validate(sc)
    expr = sc.obj["allowedTopologies"][0]["matchLabelExpressions"][0]
    assert expr == {"key": constants.TOPOLOGY_NODE_KEY, "values": ["node-a", "node-b"]}


def test_driver_name_override_reaches_every_object() -> None:
    docs = render_chart({"driverName": "fast.tessera.example.com",
                         "storageClasses": [{"name": "x", "backend": "local", "volumeBindingMode": "WaitForFirstConsumer"}]})
    for d in docs:
        validate(d)
    assert of_kind(docs, "CSIDriver")[0].name == "fast.tessera.example.com"
    assert of_kind(docs, "StorageClass")[0].obj["provisioner"] == "fast.tessera.example.com"
    cm = yaml.safe_load(of_kind(docs, "ConfigMap")[0].obj["data"]["config.yaml"])
    assert cm["driverName"] == "fast.tessera.example.com"
    node = next(d for d in checks.plugin_workloads(docs) if checks.role(d) == "node")
    reg = container(node, "node-driver-registrar")
    assert "--kubelet-registration-path=/var/lib/kubelet/plugins/fast.tessera.example.com/csi.sock" in reg["args"]


def test_secrets_are_created_only_with_their_values() -> None:
    with pytest.raises(helm_python.HelmRenderError, match="userKey is required"):
        render_chart({"secrets": {"ceph": {"create": True, "name": "c", "userID": "u"}}})
    with pytest.raises(helm_python.HelmRenderError, match="chap.key is required"):
        render_chart({"secrets": {"chap": {"create": True, "name": "c"}}})


@pytest.mark.parametrize("case", sorted(SHIPPED))
def test_values_files_hold_no_credential(case: str) -> None:
    """A values file leaves every credential empty (no placeholder to forget): its documented `helm install`
    passes each with --set-string, and without them the install fails."""
    if case == "default":
        return
    text = values_files()[case.removeprefix("values-")].read_text()
    assert "REPLACE-WITH" not in text
    if not set_strings(case):
        return
    with pytest.raises(helm_python.HelmRenderError, match="is required"):
        render_chart(copy.deepcopy(SHIPPED[case]))


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_backends_are_exactly_those_of_the_values(case: str) -> None:
    """Helm merges maps: the chart's defaults must not add a backend to a values file's (each extra backend would
    be probed by every plugin). With no backends given, the config is the plugin's embedded default."""
    docs = rendered(case)
    cfg = yaml.safe_load(checks.configmaps_of(docs)["tessera-config"])
    if CASES[case] is None:
        embedded = checks.parse_config({"stateDir": cfg["stateDir"]}, "embedded")
        assert cfg["backends"] == {n: {"type": b.type, "directory": b.options.directory}
                                   for n, b in embedded.backends.items()}
        assert cfg["defaultBackend"] == embedded.default_backend
    else:
        assert cfg["backends"] == CASES[case]["config"]["backends"]
        assert cfg.get("defaultBackend") == CASES[case]["config"].get("defaultBackend")


def test_a_storage_class_naming_an_unconfigured_backend_fails() -> None:
    values = copy.deepcopy(CASES["values-rbd"])
    values["storageClasses"].append({"name": "tessera-file", "backend": "local"})
    with pytest.raises(helm_python.HelmRenderError, match='backend "local" is not configured'):
        render_chart(values)


@pytest.mark.parametrize("case", sorted(CASES))
def test_credential_files_are_mounted_from_secrets(case: str) -> None:
    """Every credential file a config names (rbd keyringPath, iscsi chapKeyFile) is mounted, readable, in the
    plugins that read it, from a Secret holding that key (made by the chart from the operator's value)."""
    docs = rendered(case)
    for _, path, secret, key in checks.check_secret_files(docs, of_kind(docs, "Secret")):
        content = secret.obj["stringData"][key]
        if key == "keyring":
            user = secret.obj["stringData"]["userID"]
            assert content == f"[client.{user}]\n\tkey = {OPERATOR_VALUES['secrets.ceph.userKey']}\n"
        else:
            assert content == OPERATOR_VALUES["secrets.chap.key"]


def test_rbd_values_mount_the_keyring_in_controller_and_node() -> None:
    docs = rendered("values-rbd")
    mounted = {checks.role(d) for d, *_ in checks.check_secret_files(docs, of_kind(docs, "Secret"))}
    assert mounted == {"controller", "node"}


def test_resizer_flags_agree_with_kustomize() -> None:
    helm = [a for case in CASES for a in checks.resizer_args(rendered(case))]
    kustomize = checks.resizer_args(kustomize_build(KUBE_DIR / "shared"))
    assert helm and kustomize
    assert all(a == kustomize[0] for a in helm + kustomize), (helm, kustomize)


def test_helm_lint_is_clean() -> None:
    for case, values in CASES.items():
        report = helm_python.lint(str(CHART_DIR), copy.deepcopy(values), strict=True, namespace="tessera-csi")
        problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2] + report.get("errors", [])
        assert not problems, f"{case}: {problems}"


def test_iscsi_values_mount_the_chap_key_the_config_names() -> None:
    docs = rendered("values-iscsi")
    ctrl = next(d for d in checks.plugin_workloads(docs) if checks.role(d) == "controller")
    plugin = container(ctrl, "tessera-csi")
    assert plugin["securityContext"]["privileged"] is True and ctrl.obj["spec"]["template"]["spec"]["hostNetwork"]
    assert ctrl.obj["spec"]["strategy"]["type"] == "Recreate"
    files = checks.check_secret_files(docs, of_kind(docs, "Secret"))
    assert [(checks.role(d), key) for d, _, _, key in files] == [("controller", "chap.key")]
    assert checks.volume_for_mount(ctrl, plugin, "/sys/kernel/config")["hostPath"]["path"] == "/sys"
