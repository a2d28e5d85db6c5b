"""deploy/kubernetes/flex: every manifest is valid against the Kubernetes schema, and the names in it agree with the
code (driver directory, provisioner name, the RBAC the provisioner's API calls need)."""
from __future__ import annotations

import glob
import os

import pytest
import yaml

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
DEPLOY = os.path.join(_REPO, "deploy", "kubernetes", "flex")


def _docs():
    for path in sorted(glob.glob(os.path.join(DEPLOY, "*.yaml"))):
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    yield os.path.basename(path), doc


def test_manifests_validate_against_the_kubernetes_schema():
    kv = pytest.importorskip("kubernetes_validate", reason="MISSING: kubernetes-validate (pip, test extra)")
    version = kv.utils.latest_version()
    checked = 0
    for name, doc in _docs():
        if doc["kind"] == "Kustomization":
            continue
        kv.validate(doc, version, strict=True)
        checked += 1
    assert checked >= 10


def test_kustomization_lists_existing_files():
    with open(os.path.join(DEPLOY, "kustomization.yaml")) as f:
        k = yaml.safe_load(f)
    for r in k["resources"]:
        assert os.path.exists(os.path.join(DEPLOY, r)), r


def test_names_agree_with_the_code():
    from csi import constants
    from flex.provisioner import decide
    docs = dict((d["kind"] + "/" + d["metadata"]["name"], d) for _, d in _docs() if d["kind"] != "Kustomization")
    assert docs["StorageClass/tessera-flex"]["provisioner"] == decide.PROVISIONER_NAME
    assert constants.FLEX_DRIVER_DIR == "tessera~block" and decide.FLEX_DRIVER == "tessera/block"
    rules = docs["ClusterRole/tessera-flex-provisioner"]["rules"]
    verbs = {(r["apiGroups"][0], res): set(r["verbs"]) for r in rules for res in r["resources"]}
    assert {"list", "watch"} <= verbs[("", "persistentvolumeclaims")]
    assert {"list", "create", "delete"} <= verbs[("", "persistentvolumes")]
    assert "list" in verbs[("storage.k8s.io", "storageclasses")] and "create" in verbs[("", "events")]
    lease = docs["Role/tessera-flex-provisioner-leases"]["rules"][0]
    assert set(lease["verbs"]) >= {"get", "create", "update"}
    installer = docs["DaemonSet/tessera-flex-installer"]["spec"]["template"]["spec"]["containers"][0]
    assert installer["command"][-1] == "flex.install" and "--agent-socket" in installer["args"]
    agent = docs["DaemonSet/tessera-flex-agent"]["spec"]["template"]["spec"]["containers"][0]
    sock = installer["args"][installer["args"].index("--agent-socket") + 1]
    assert agent["args"][agent["args"].index("--socket") + 1] == sock
