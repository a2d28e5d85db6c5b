"""deploy/helm/tessera-csi rendered by Helm's own engine, for the defaults and every values-<backend>.yaml."""
from __future__ import annotations

import copy
from typing import Any, Optional

import pytest
import yaml

from backends import backend_types
from csi import constants

from . import checks
from .k8s import CHART_DIR, Doc, container, helm_python, of_kind, render_chart, validate, values_files

CASES: dict[str, Optional[dict[str, Any]]] = {"default": None}
CASES.update({f"values-{t}": yaml.safe_load(p.read_text()) for t, p in values_files().items()})
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


def test_helm_lint_is_clean() -> None:
    for case, values in CASES.items():
        report = helm_python.lint(str(CHART_DIR), copy.deepcopy(values), strict=True, namespace="tessera-csi")
        problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2] + report.get("errors", [])
        assert not problems, f"{case}: {problems}"


def test_iscsi_values_mount_the_chap_key_the_config_names() -> None:
    docs = rendered("values-iscsi")
    cfg = checks.parse_config(yaml.safe_load(checks.configmaps_of(docs)["tessera-config"]), "config")
    ctrl = next(d for d in checks.plugin_workloads(docs) if checks.role(d) == "controller")
    plugin = container(ctrl, "tessera-csi")
    assert plugin["securityContext"]["privileged"] is True and ctrl.obj["spec"]["template"]["spec"]["hostNetwork"]
    assert ctrl.obj["spec"]["strategy"]["type"] == "Recreate"
    key = cfg.backends["iscsi"].options.chapKeyFile
    vol = checks.volume_for_mount(ctrl, plugin, key)
    secret = next(d for d in of_kind(docs, "Secret") if d.name == vol["secret"]["secretName"])
    assert checks.posixpath.basename(key) in secret.obj["stringData"]
    assert checks.volume_for_mount(ctrl, plugin, "/sys/kernel/config")["hostPath"]["path"] == "/sys"
