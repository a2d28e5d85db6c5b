"""What an operator tunes in the chart: labels, priority, extra arguments, resources of every container, the
CSIDriver's SELinux and fsGroup settings, and how shared controller replicas survive drains and node loss."""
from __future__ import annotations

import copy
import os
from typing import Any

import pytest
import yaml

from . import checks
from .k8s import CHART_DIR, containers, helm_python, of_kind, pod_spec, render_chart, validate

SHARED_HA = {"controllerMode": "shared", "controller": {"replicas": 2}}


def _controller(docs):
    return next(d for d in checks.plugin_workloads(docs) if checks.role(d) == "controller")


def _node(docs):
    return next(d for d in checks.plugin_workloads(docs) if checks.role(d) == "node")


def _validated(values: dict[str, Any]):
    docs = render_chart(values)
    for d in docs:
        validate(d)
    return docs


def test_common_labels_on_every_object():
    docs = _validated({"commonLabels": {"team": "storage", "cost-center": "c42"}})
    for d in docs:
        labels = d.obj["metadata"].get("labels", {})
        assert labels.get("team") == "storage" and labels.get("cost-center") == "c42", f"{d!r} lacks commonLabels"


def test_replicated_shared_controller_gets_a_pdb_and_spreads_over_nodes():
    docs = _validated(SHARED_HA)
    ctrl = _controller(docs)
    pdb = of_kind(docs, "PodDisruptionBudget")
    assert len(pdb) == 1 and pdb[0].obj["spec"]["maxUnavailable"] == 1
    pod_labels = ctrl.obj["spec"]["template"]["metadata"]["labels"]
    assert pdb[0].obj["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    terms = pod_spec(ctrl)["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    term = terms[0]["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"].items() <= pod_labels.items()


def test_required_anti_affinity_and_own_affinity():
    docs = _validated({**SHARED_HA, "controller": {"replicas": 3, "antiAffinity": "required"}})
    assert "requiredDuringSchedulingIgnoredDuringExecution" in pod_spec(_controller(docs))["affinity"]["podAntiAffinity"]
    own = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "storage", "operator": "In", "values": ["yes"]}]}]}}}
    docs = _validated({**SHARED_HA, "controller": {"replicas": 2, "affinity": own}})
    assert pod_spec(_controller(docs))["affinity"] == own


@pytest.mark.parametrize("values", [{"controllerMode": "shared"}, {"controllerMode": "nodeLocal"},
                                    {**SHARED_HA, "controller": {"replicas": 2,
                                                                 "podDisruptionBudget": {"enabled": False}}}],
                         ids=["one-replica", "node-local", "disabled"])
def test_no_pdb_where_it_cannot_help(values):
    assert of_kind(render_chart(values), "PodDisruptionBudget") == []


def test_priority_classes_and_extra_args():
    docs = _validated({"controllerMode": "shared",
                       "controller": {"priorityClassName": "storage-critical", "extraArgs": ["--log-level=debug"]},
                       "node": {"priorityClassName": "node-storage", "extraArgs": ["--log-level=warning"]}})
    ctrl, node = _controller(docs), _node(docs)
    assert pod_spec(ctrl)["priorityClassName"] == "storage-critical"
    assert pod_spec(node)["priorityClassName"] == "node-storage"
    assert checks.plugin_args(next(c for c in containers(ctrl) if c["name"] == "tessera-csi")).log_level == "debug"
    assert checks.plugin_args(next(c for c in containers(node) if c["name"] == "tessera-csi")).log_level == "warning"


def _resizer_args(docs) -> list[str]:
    return next(c for c in containers(_controller(docs)) if c["name"] == "csi-resizer")["args"]


def test_volume_attributes_class_gate_is_the_operators_choice():
    # ControllerModifyVolume is reached only through a resizer started with the VolumeAttributesClass gate; the
    # gate needs the cluster's VolumeAttributesClass API, so it is off unless the operator turns it on
    gate = "--feature-gates=VolumeAttributesClass=true"
    assert gate not in _resizer_args(_validated({"controllerMode": "shared"}))
    on = _validated({"controllerMode": "shared", "sidecars": {"resizer": {"volumeAttributesClass": True}}})
    assert gate in _resizer_args(on)
    for d in on:
        if d.kind == "Deployment":
            checks.check_sidecar_flags(d)
    with helm_python.Chart.load(str(CHART_DIR)) as chart:
        with pytest.raises(helm_python.HelmValuesError):
            chart.validate_schema({"sidecars": {"resizer": {"volumeAttributesClas": True}}})  # a typo
        with pytest.raises(helm_python.HelmValuesError):
            chart.validate_schema({"sidecars": {"resizer": {"volumeAttributesClass": "yes"}}})


SNAPSHOT_METADATA = {"controllerMode": "shared",
                     "snapshotMetadata": {"enabled": True, "tlsSecretName": "sm-tls", "caCert": "UEVNIGJ1bmRsZQ=="}}


def test_snapshot_metadata_sidecar_service_and_advertisement():
    """KEP-3314's wiring: a backup client finds the SnapshotMetadataService named after the driver, dials its
    address, which is the Service in front of the sidecar's port in the controller pod, and the sidecar reaches the
    plugin on its socket with the TLS pair from the named Secret."""
    docs = _validated(SNAPSHOT_METADATA)
    ctrl = _controller(docs)
    side = next(c for c in containers(ctrl) if c["name"] == "csi-snapshot-metadata")
    checks.check_sidecar_flags(ctrl)
    args = dict(a.split("=", 1) for a in side["args"])
    assert args["--csi-address"] == checks.CSI_ADDRESS
    mounts = {m["mountPath"]: m["name"] for m in side["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(ctrl)["volumes"]}
    tls_dir = os.path.dirname(args["--tls-cert"])
    assert os.path.dirname(args["--tls-key"]) == tls_dir and volumes[mounts[tls_dir]]["secret"]["secretName"] == "sm-tls"
    assert {os.path.basename(args["--tls-cert"]), os.path.basename(args["--tls-key"])} == {"tls.crt", "tls.key"}
    sms = of_kind(docs, "SnapshotMetadataService")
    assert len(sms) == 1 and sms[0].obj["metadata"]["name"] == "tessera.csi.dev"
    spec = sms[0].obj["spec"]
    assert spec["caCert"] == "UEVNIGJ1bmRsZQ==" and spec["audience"] == "tessera.csi.dev"
    host, _, port = spec["address"].rpartition(":")
    name, _, namespace = host.partition(".")
    svc = next(d for d in of_kind(docs, "Service") if d.obj["metadata"]["name"] == name)
    assert svc.obj["metadata"]["namespace"] == namespace
    svc_port = next(p for p in svc.obj["spec"]["ports"] if p["port"] == int(port))
    labels = pod_spec_labels(ctrl)
    assert all(labels.get(k) == v for k, v in svc.obj["spec"]["selector"].items())
    assert any(p.get("name") == svc_port["targetPort"] for p in side.get("ports", []))
    # the sidecar authenticates clients (TokenReview), authorizes them (SubjectAccessReview) and reads snapshots
    rules = [r for d in of_kind(docs, "ClusterRole") if d.obj["metadata"]["name"].endswith("snapshot-metadata")
             for r in d.obj["rules"]]
    granted = {(g, res) for r in rules for g in r["apiGroups"] for res in r["resources"]}
    assert {("authentication.k8s.io", "tokenreviews"), ("authorization.k8s.io", "subjectaccessreviews"),
            ("snapshot.storage.k8s.io", "volumesnapshotcontents"),
            ("cbt.storage.k8s.io", "snapshotmetadataservices")} <= granted


def pod_spec_labels(doc) -> dict:
    return doc.obj["spec"]["template"]["metadata"]["labels"]


@pytest.mark.parametrize("values, message", [
    ({"controllerMode": "nodeLocal", "snapshotMetadata": {"enabled": True, "tlsSecretName": "t", "caCert": "QUJD"}},
     "controllerMode shared"),
    ({"controllerMode": "shared", "snapshotMetadata": {"enabled": True, "caCert": "QUJD"}}, "tlsSecretName"),
    ({"controllerMode": "shared", "snapshotMetadata": {"enabled": True, "tlsSecretName": "t"}}, "caCert"),
], ids=["node-local", "no-tls-secret", "no-ca"])
def test_snapshot_metadata_refuses_what_cannot_work(values, message):
    with pytest.raises(Exception) as err:
        render_chart(values)
    assert message in str(err.value)


def test_snapshot_metadata_off_by_default():
    docs = render_chart({"controllerMode": "shared"})
    assert not of_kind(docs, "SnapshotMetadataService")
    assert all(c["name"] != "csi-snapshot-metadata" for c in containers(_controller(docs)))


def test_resources_reach_every_container():
    res = {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}}
    sidecars = {k: {"resources": res} for k in ("provisioner", "attacher", "resizer", "snapshotter",
                                                 "nodeDriverRegistrar", "livenessProbe")}
    defaults = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    for k, v in sidecars.items():
        v["image"] = defaults["sidecars"][k]["image"]
    docs = _validated({"controllerMode": "shared", "sidecars": copy.deepcopy(sidecars),
                       "controller": {"resources": res}, "node": {"resources": res}})
    for wl in checks.workloads(docs):
        for c in containers(wl):
            assert c.get("resources") == res, f"{wl!r} container {c['name']} has no resources"


@pytest.mark.parametrize("policy,selinux", [("File", False), ("None", True), ("ReadWriteOnceWithFSType", True)])
def test_csidriver_fsgroup_policy_and_selinux_mount(policy, selinux):
    docs = _validated({"csiDriver": {"fsGroupPolicy": policy, "seLinuxMount": selinux}})
    spec = of_kind(docs, "CSIDriver")[0].obj["spec"]
    assert spec["fsGroupPolicy"] == policy and spec["seLinuxMount"] is selinux


@pytest.mark.parametrize("bad", [{"controller": {"extraArgs": ["; rm -rf /"]}},
                                 {"controller": {"antiAffinity": "sometimes"}},
                                 {"csiDriver": {"fsGroupPolicy": "Always"}},
                                 {"sidecars": {"provisioner": {"image": "x:v1", "resources": {"request": {}}}}}],
                         ids=["extraArgs", "antiAffinity", "fsGroupPolicy", "resources-typo"])
def test_schema_refuses_operator_mistakes(bad):
    with helm_python.Chart.load(str(CHART_DIR)) as chart:
        with pytest.raises(helm_python.HelmValuesError):
            chart.validate_schema(bad)


def test_chart_readme_is_generated_from_values_comments():
    import subprocess
    import sys
    script = CHART_DIR.parent / "chart_readme.py"
    r = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    readme = (CHART_DIR / "README.md").read_text()
    for key in ("controller.podDisruptionBudget.maxUnavailable", "csiDriver.seLinuxMount", "commonLabels"):
        assert f"| `{key}` |" in readme


def test_notes_and_changelog_ship_with_the_chart():
    with helm_python.Chart.load(str(CHART_DIR)) as chart:
        out = chart.render({}, name="tessera", namespace="tessera-csi", is_install=True)
    notes = next(text for path, text in out.items() if path.endswith("NOTES.txt"))
    assert "tessera.csi.dev" in notes and "kubectl -n tessera-csi get pods" in notes
    assert (CHART_DIR / "CHANGELOG.md").read_text().startswith("# tessera-csi chart")


def test_plugins_log_json_by_default_and_text_on_request():
    docs = _validated({"controllerMode": "shared", "node": {"logFormat": "text"}})
    plugin = lambda wl: checks.plugin_args(next(c for c in containers(wl) if c["name"] == "tessera-csi"))
    assert plugin(_controller(docs)).log_format == "json"
    assert plugin(_node(docs)).log_format == "text"
