"""deploy/kubernetes: every object valid for a current Kubernetes release, and every flavour in step with the code.

A flavour is a kustomization an operator applies (`kubectl apply -k deploy/kubernetes/<flavour>`). Its
kustomization.yaml comments are its install instructions: the Secrets to create (`kubectl create secret ...`), the
node labels, and the StorageClass / VolumeSnapshotClass files to apply (`kubectl apply -f ...`). The tests build each
flavour and check it together with exactly what those instructions add, so the instructions cannot drift.
"""
from __future__ import annotations

import copy
import re
import shutil
import subprocess

import pytest
import yaml

from backends import backend_types
from csi import constants

from . import checks
from .k8s import (KUBE_DIR, REPO, Doc, documented_commands, documented_secrets, is_kustomization, kustomize_build,
                  load_yaml_docs, manifest_docs, manifest_files, of_kind, patch_files, validate)

ALL_DOCS = manifest_docs()
PATCHES = patch_files()
OBJECTS = [d for d in ALL_DOCS if not is_kustomization(d) and (REPO / d.source).resolve() not in PATCHES]
COMMON = manifest_docs(KUBE_DIR / "common")
CLASSES_DIR = KUBE_DIR / "storageclasses"
EXAMPLE_SECRETS = manifest_docs(KUBE_DIR / "examples")
OWN_DIRS = ("common", "shared", "iscsi-target", "node-local", "node-local-lvm", "storageclasses", "examples")
# The flavours and the backend types each one's config serves (one config per flavour: the plugin's Probe checks
# every configured backend, so each install configures only what it serves).
FLAVOURS = {"shared": {"rbd"}, "iscsi-target": {"iscsi"}, "node-local": {"file"}, "node-local-lvm": {"file", "lvm"}}
BUILDS = {f: kustomize_build(KUBE_DIR / f) for f in FLAVOURS}


def instructions(flavour: str) -> list[list[str]]:
    return documented_commands(KUBE_DIR / flavour / "kustomization.yaml")


def operator_secrets(flavour: str) -> list[Doc]:
    return documented_secrets(KUBE_DIR / flavour / "kustomization.yaml")


def class_files(flavour: str) -> list[str]:
    """The storageclasses/ files the flavour's instructions apply."""
    out = []
    for argv in instructions(flavour):
        if argv[:2] == ["kubectl", "apply"] and "-f" in argv:
            path = argv[argv.index("-f") + 1]
            assert (REPO / path).is_file(), f"{flavour}'s instructions apply {path}, which does not exist"
            if path.startswith("deploy/kubernetes/storageclasses/"):
                out.append(path.rsplit("/", 1)[1])
            else:  # the namespace, before the Secrets are made in it
                assert path == "deploy/kubernetes/common/namespace.yaml", f"{flavour}: kubectl apply -f {path}"
    return out


def class_docs(flavour: str) -> list[Doc]:
    docs: list[Doc] = []
    for name in class_files(flavour):
        assert (CLASSES_DIR / name).is_file(), f"{flavour}'s instructions apply {name}, which does not exist"
        docs.extend(load_yaml_docs((CLASSES_DIR / name).read_text(), f"deploy/kubernetes/storageclasses/{name}"))
    return docs


def installed(flavour: str) -> list[Doc]:
    """Everything in the cluster once the instructions are followed: secrets, the build, the classes."""
    return operator_secrets(flavour) + [copy.deepcopy(d) for d in BUILDS[flavour]] + class_docs(flavour)


def test_manifests_found() -> None:
    kinds = {d.kind for d in OBJECTS}
    assert {"CSIDriver", "DaemonSet", "Deployment", "StorageClass", "VolumeSnapshotClass", "ConfigMap", "Secret",
            "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount", "Service"} <= kinds


@pytest.mark.parametrize("doc", OBJECTS, ids=repr)
def test_object_validates_against_kubernetes_schema(doc: Doc) -> None:
    validate(doc)


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_flavour_build_validates_against_kubernetes_schema(flavour: str) -> None:
    """Patched objects are whole again after the build: the result, not the partial patch, must be valid."""
    for d in BUILDS[flavour]:
        validate(d)


def test_strict_validation_catches_a_misspelled_field() -> None:
    """The validator really is strict: one wrong key in a built-in and in a CRD object fails."""
    ds = next(d for d in of_kind(COMMON, "DaemonSet"))
    bad = copy.deepcopy(ds.obj)
    mount = bad["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][1]
    mount["mountPropogation"] = mount.pop("mountPropagation")
    with pytest.raises(AssertionError, match="mountPropogation"):
        validate(Doc("mutated", bad))
    vsc = copy.deepcopy(of_kind(OBJECTS, "VolumeSnapshotClass")[0].obj)
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


def test_every_directory_is_a_flavour_a_base_or_single_files() -> None:
    """storageclasses/ and examples/ have no kustomization: classes are applied one by one per flavour (a
    kustomization there would apply every backend's class, and the snapshot classes fail without their CRDs), and
    the example Secrets are applied by no kustomization."""
    dirs = {p.parent.relative_to(KUBE_DIR).as_posix() for p in KUBE_DIR.rglob("kustomization.yaml")}
    assert dirs == set(FLAVOURS) | {"common", "flex"}, dirs
    assert {p.parent.name for p in KUBE_DIR.rglob("*.yaml")} <= set(OWN_DIRS) | {"flex"}


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_flavour_install_is_consistent_with_the_code(flavour: str) -> None:
    docs = [d for d in installed(flavour) if d.kind != "Secret"]
    checks.check_install(docs)
    drv = of_kind(docs, "CSIDriver")[0]
    assert drv.name == constants.DRIVER_NAME
    assert drv.obj["spec"]["attachRequired"] is (not flavour.startswith("node-local"))
    assert [d.name for d in of_kind(docs, "ConfigMap")] == ["tessera-csi-config"]


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_flavour_configures_only_the_backends_it_serves(flavour: str) -> None:
    types = {b.type for b in checks.configured_backends(BUILDS[flavour]).values()}
    assert types == FLAVOURS[flavour]


def test_every_backend_type_has_a_flavour_and_an_example_storage_class() -> None:
    assert set().union(*FLAVOURS.values()) == set(backend_types())
    for t in backend_types():
        assert (CLASSES_DIR / f"storageclass-{t}.yaml").exists()
    types = set().union(*(checks.storage_class_types(class_docs(f), checks.configmaps_of(BUILDS[f])) for f in FLAVOURS))
    assert types == set(backend_types())


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_flavour_classes_name_backends_its_config_has(flavour: str) -> None:
    """The StorageClasses the flavour's instructions apply name backends of its config (and only parameters and
    secrets their backends read); its snapshot classes name installed secrets."""
    docs = installed(flavour)
    assert of_kind(docs, "StorageClass"), f"{flavour}: its instructions apply no StorageClass"
    checks.check_storage_classes(docs, checks.configmaps_of(docs))
    checks.check_snapshot_classes(docs)
    for name in class_files(flavour):
        head = (CLASSES_DIR / name).read_text().split("\napiVersion:", 1)[0]
        assert re.search(rf"deploy/kubernetes/{re.escape(flavour)}\b(?!-)", head), \
            f"{name}: its header comment does not name the flavour {flavour} whose instructions apply it"


def test_every_class_file_is_applied_by_some_flavour() -> None:
    applied = set().union(*(class_files(f) for f in FLAVOURS))
    assert applied == {p.name for p in CLASSES_DIR.glob("*.yaml")}


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_flavour_applies_no_secret_and_no_placeholder(flavour: str) -> None:
    """`apply -k` must never create or overwrite a Secret: they are made by hand (instructions) or from examples/."""
    assert not of_kind(BUILDS[flavour], "Secret")
    text = yaml.safe_dump_all([d.obj for d in BUILDS[flavour]])
    assert "REPLACE-WITH" not in text


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_flavour_instructions_make_the_secrets_it_uses(flavour: str) -> None:
    """The Secrets the instructions create are exactly those the build mounts and the classes name; every
    credential file the config names is mounted from one, with the key, readable by the plugin."""
    docs = installed(flavour)
    made = {(d.obj["metadata"]["namespace"], d.name) for d in operator_secrets(flavour)}
    used = set()
    for w in checks.workloads(docs):
        ns = w.obj["metadata"]["namespace"]
        used |= {(ns, v["secret"]["secretName"]) for v in checks.pod_spec(w).get("volumes", []) if "secret" in v}
    for c in of_kind(docs, "StorageClass") + of_kind(docs, "VolumeSnapshotClass"):
        params = c.obj.get("parameters", {})
        used |= {(params[k.replace("-name", "-namespace")], v) for k, v in params.items() if k.endswith("-secret-name")}
    assert made == used, f"{flavour}: instructions make {sorted(made)}, the install uses {sorted(used)}"
    checks.check_secret_files(docs, operator_secrets(flavour))


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_example_secrets_match_the_instructions(flavour: str) -> None:
    """examples/secrets-example.yaml holds the same Secrets (names, keys) as the commands, for YAML-minded operators."""
    examples = {(d.obj["metadata"]["namespace"], d.name): d for d in EXAMPLE_SECRETS}
    for s in operator_secrets(flavour):
        ref = (s.obj["metadata"]["namespace"], s.name)
        assert ref in examples, f"{flavour}: Secret {ref} has no example"
        assert checks.secret_keys_of(examples[ref]) == checks.secret_keys_of(s), f"{ref}: example and command differ"
    assert all(d.kind == "Secret" for d in EXAMPLE_SECRETS)


def test_rbd_keyring_is_the_configured_users() -> None:
    """The keyring the rbd backend reads is the cephx keyring of the config's user, in the example and in the
    command that makes it."""
    docs = installed("shared")
    rbd = [b for b in checks.configured_backends(docs).values() if b.type == "rbd"]
    assert rbd and all(b.options.keyringPath for b in rbd)
    examples = {d.name: d for d in EXAMPLE_SECRETS}
    cmds = [" ".join(a) for a in documented_commands(KUBE_DIR / "shared" / "kustomization.yaml", ("ceph",))]
    for _, path, secret, key in checks.check_secret_files(docs, operator_secrets("shared")):
        user = next(b.options.user for b in rbd if b.options.keyringPath == path)
        text = examples[secret.name].obj["stringData"][key]
        assert re.fullmatch(rf"\[client\.{re.escape(user)}\]\n\tkey = \S+\n", text), text
        assert examples[secret.name].obj["stringData"]["userID"] == user
        assert any(f"ceph auth get client.{user} -o" in c for c in cmds), cmds


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_node_labels_the_flavour_selects_are_documented(flavour: str) -> None:
    labels = {" ".join(a[a.index("node") + 2:]) for a in instructions(flavour) if a[:3] == ["kubectl", "label", "node"]}
    for w in checks.workloads(BUILDS[flavour]):
        for k, v in (checks.pod_spec(w).get("nodeSelector") or {}).items():
            assert f"{k}={v}" in labels, f"{w!r} selects {k}={v}, which the instructions never label"


def test_node_local_lvm_runs_only_on_labelled_nodes() -> None:
    """The lvm backend's volume group exists only where the operator made it: both DaemonSets select those nodes."""
    for w in checks.plugin_workloads(BUILDS["node-local-lvm"]):
        assert checks.pod_spec(w).get("nodeSelector") == {"tessera.csi.dev/lvm": "true"}, f"{w!r}"
    for w in checks.plugin_workloads(BUILDS["node-local"]):
        assert not checks.pod_spec(w).get("nodeSelector"), f"{w!r}"


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_builder_agrees_with_kubectl_kustomize(flavour: str) -> None:
    """The test builder produces what kustomize itself does (wherever kubectl is installed)."""
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("MISSING: kubectl (the builder is compared with `kubectl kustomize`)")
    out = subprocess.run([kubectl, "kustomize", str(KUBE_DIR / flavour)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    real = sorted((d for d in yaml.safe_load_all(out.stdout) if d), key=lambda o: (o["kind"], o["metadata"]["name"]))
    ours = sorted((d.obj for d in BUILDS[flavour]), key=lambda o: (o["kind"], o["metadata"]["name"]))
    assert real == ours


def test_resizer_flags_agree_across_flavours() -> None:
    args = [a for f in FLAVOURS for a in checks.resizer_args(BUILDS[f])]
    assert args and all(a == args[0] for a in args), args
    assert "--handle-volume-inuse-error=false" in args[0]


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
