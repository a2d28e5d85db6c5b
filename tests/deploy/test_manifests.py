"""deploy/kubernetes: every object valid for a current Kubernetes release, and in step with the code."""
from __future__ import annotations

import copy
import re

import pytest
import yaml

from backends import backend_types
from csi import constants

from . import checks
from .k8s import KUBE_DIR, REPO, Doc, is_kustomization, manifest_docs, manifest_files, of_kind, validate

ALL_DOCS = manifest_docs()
OBJECTS = [d for d in ALL_DOCS if not is_kustomization(d)]
COMMON = manifest_docs(KUBE_DIR / "common")
STORAGECLASSES = manifest_docs(KUBE_DIR / "storageclasses")
OWN_DIRS = ("common", "shared", "iscsi-target", "node-local", "storageclasses")


def test_manifests_found() -> None:
    kinds = {d.kind for d in OBJECTS}
    assert {"CSIDriver", "DaemonSet", "Deployment", "StorageClass", "VolumeSnapshotClass", "ConfigMap", "Secret",
            "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount", "Service"} <= kinds


@pytest.mark.parametrize("doc", OBJECTS, ids=repr)
def test_object_validates_against_kubernetes_schema(doc: Doc) -> None:
    validate(doc)


def test_strict_validation_catches_a_misspelled_field() -> None:
    """The validator really is strict: one wrong key in a built-in and in a CRD object fails."""
    ds = next(d for d in of_kind(COMMON, "DaemonSet"))
    bad = copy.deepcopy(ds.obj)
    mount = bad["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][1]
    mount["mountPropogation"] = mount.pop("mountPropagation")
    with pytest.raises(AssertionError, match="mountPropogation"):
        validate(Doc("mutated", bad))
    vsc = copy.deepcopy(of_kind(STORAGECLASSES, "VolumeSnapshotClass")[0].obj)
    vsc["deletionPolicyy"] = vsc.pop("deletionPolicy")
    with pytest.raises(AssertionError, match="deletionPolicy"):
        validate(Doc("mutated", vsc))


@pytest.mark.parametrize("kfile", sorted(KUBE_DIR.rglob("kustomization.yaml")), ids=lambda p: str(p.relative_to(REPO)))
def test_kustomization_lists_every_file_of_its_directory(kfile) -> None:
    k = yaml.safe_load(kfile.read_text())
    listed = list(k.get("resources", [])) + [p["path"] for p in k.get("patches", [])]
    for entry in listed:
        assert (kfile.parent / entry).exists(), f"{kfile}: {entry} does not exist"
    if kfile.parent.name not in OWN_DIRS:  # flex/ lists alternatives on purpose (its own tests cover it)
        return
    own = {p.name for p in kfile.parent.glob("*.yaml")} - {"kustomization.yaml"}
    assert own <= set(listed), f"{kfile}: files not in the kustomization: {sorted(own - set(listed))}"


def _node_local_install() -> list[Doc]:
    """common + node-local, with the kustomize patch applied (a merge of the CSIDriver spec)."""
    docs = [Doc(d.source, copy.deepcopy(d.obj)) for d in COMMON] + manifest_docs(KUBE_DIR / "node-local")
    patch = next(d for d in docs if d.source.endswith("csidriver-patch.yaml"))
    docs.remove(patch)
    drv = next(d for d in docs if d.kind == "CSIDriver")
    assert drv.name == patch.name
    drv.obj["spec"].update(patch.obj["spec"])
    return [d for d in docs if not is_kustomization(d)]


@pytest.mark.parametrize("variant", ["shared", "iscsi-target"])
def test_shared_install_is_consistent_with_the_code(variant: str) -> None:
    docs = [d for d in COMMON + manifest_docs(KUBE_DIR / variant) if not is_kustomization(d)]
    checks.check_install(docs, attach_required=True)
    assert of_kind(docs, "CSIDriver")[0].name == constants.DRIVER_NAME


def test_iscsi_target_controller_reads_the_chap_key_the_config_names() -> None:
    """The config's chapKeyFile is the Secret-mounted key: a rescheduled controller derives the same CHAP secrets."""
    cfg = checks.parse_config(yaml.safe_load(checks.configmaps_of(COMMON)["tessera-csi-config"]), "config")
    iscsi = [b for b in cfg.backends.values() if b.type == "iscsi"]
    assert iscsi, "the example config has an iscsi backend"
    ctrl = next(d for d in manifest_docs(KUBE_DIR / "iscsi-target") if d.kind == "Deployment")
    plugin = checks.container(ctrl, "tessera-csi")
    assert plugin["securityContext"]["privileged"] is True and checks.pod_spec(ctrl)["hostNetwork"] is True
    for b in iscsi:
        key = b.options.chapKeyFile
        vol = checks.volume_for_mount(ctrl, plugin, key)
        assert vol and "secret" in vol, f"{key} is not mounted from a Secret"
        secret = next(d for d in COMMON if d.kind == "Secret" and d.name == vol["secret"]["secretName"])
        assert checks.posixpath.basename(key) in secret.obj["stringData"]
        assert checks.volume_for_mount(ctrl, plugin, "/sys/kernel/config")["hostPath"]["path"] == "/sys"


def test_node_local_install_is_consistent_with_the_code() -> None:
    docs = _node_local_install()
    assert of_kind(docs, "CSIDriver")[0].obj["spec"]["attachRequired"] is False
    checks.check_install(docs)


def test_storage_classes_use_what_the_code_reads() -> None:
    docs = [d for d in COMMON + STORAGECLASSES if not is_kustomization(d)]
    checks.check_storage_classes(docs, checks.configmaps_of(COMMON))
    checks.check_snapshot_classes(docs)


def test_every_backend_type_has_an_example_storage_class() -> None:
    types = checks.storage_class_types(of_kind(STORAGECLASSES, "StorageClass"), checks.configmaps_of(COMMON))
    assert types == set(backend_types())
    for t in backend_types():
        assert (KUBE_DIR / "storageclasses" / f"storageclass-{t}.yaml").exists()


def _deploy_texts() -> dict[str, str]:
    return {str(p.relative_to(REPO)): p.read_text() for p in sorted((REPO / "deploy").rglob("*"))
            if p.is_file() and p.suffix in (".yaml", ".tpl", ".json", "") and p.name != "Dockerfile"}


def test_topology_key_and_flex_names_match_the_code() -> None:
    """Any topology key, FlexVolume driver directory or plugin socket path written anywhere in deploy/ is the one
    the code uses (a driver name different from the default is allowed only where it is a Helm value)."""
    texts = _deploy_texts()
    topo = {m for t in texts.values() for m in re.findall(r"topology\.[a-z0-9.-]+/[a-z0-9-]+", t)}
    assert topo == {constants.TOPOLOGY_NODE_KEY}, topo
    flex = {(f, m) for f, t in texts.items() for m in re.findall(r"\b[a-z0-9.-]+~[a-z0-9.-]+\b", t)}
    assert flex and {m for _, m in flex} == {constants.FLEX_DRIVER_DIR}, flex
    socks = {m for f, t in texts.items() if "/helm/" not in f
             for m in re.findall(r"/var/lib/kubelet/plugins/[^\s\"']+\.sock", t)}
    assert socks == {constants.NODE_SOCKET_PATH}, socks


def test_manifests_load_in_the_file_list() -> None:
    assert all(p.suffix == ".yaml" for p in manifest_files())
