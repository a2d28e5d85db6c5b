"""The provisioner's decisions as pure functions of Kubernetes objects (plain dicts as the API serves them).

Nothing here talks to a cluster or a backend, so every rule is tested with literal objects: which claims are ours,
what volume to ask for, what PV to write, which released PVs to delete.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Mapping, Optional, Sequence, Union

from csi import constants

PROVISIONER_NAME = "tessera.csi.dev/flex"
FLEX_DRIVER = "tessera/block"
ANN_PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"
ANN_STORAGE_PROVISIONER = "volume.kubernetes.io/storage-provisioner"
ANN_BETA_STORAGE_PROVISIONER = "volume.beta.kubernetes.io/storage-provisioner"
ANN_SELECTED_NODE = "volume.kubernetes.io/selected-node"
ANN_VOLUME_ID = "tessera.csi.dev/volume-id"
PARAM_FS_TYPE = "fsType"

ACCESS_MODES = {
    "ReadWriteOnce": "SINGLE_NODE_WRITER",
    "ReadWriteOncePod": "SINGLE_NODE_SINGLE_WRITER",
    "ReadOnlyMany": "MULTI_NODE_READER_ONLY",
    "ReadWriteMany": "MULTI_NODE_MULTI_WRITER",
}

_SUFFIX = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_QTY = re.compile(r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:e([+-]?[0-9]+))?([kMGTPE]i?|)$")


class Unprovisionable(ValueError):
    """The claim cannot be served as asked; the message goes into a Warning event on the PVC."""


def parse_quantity(q: Union[str, int]) -> int:
    """A Kubernetes resource quantity in bytes, rounded up ("1Gi", "500M", "1.5Gi", "1e9")."""
    if isinstance(q, int):
        return q
    m = _QTY.match(str(q).strip())
    if not m:
        raise Unprovisionable(f"storage size {q!r} is not a Kubernetes quantity (e.g. 10Gi)")
    try:
        n = Decimal(m.group(1)) * (Decimal(10) ** int(m.group(2) or 0)) * _SUFFIX[m.group(3)]
    except InvalidOperation:
        raise Unprovisionable(f"storage size {q!r} is not a Kubernetes quantity (e.g. 10Gi)") from None
    return int(n.to_integral_value(rounding="ROUND_CEILING"))


def meta(obj: Mapping) -> Mapping:
    return obj.get("metadata") or {}


def pv_name(pvc: Mapping) -> str:
    """Deterministic, so a re-run after a crash finds the PV it already made (as external-provisioner does)."""
    return f"pvc-{meta(pvc)['uid']}"


def volume_name(pvc: Mapping) -> str:
    """The CreateVolume name: one per claim, stable across retries and replicas, so creation is idempotent."""
    return pv_name(pvc)


@dataclass
class VolumeRequest:
    name: str
    required_bytes: int
    limit_bytes: int
    access_modes: list[str]
    fs_type: str
    parameters: dict[str, str]
    mount_options: list[str]
    requisite: list[dict[str, str]] = field(default_factory=list)


@dataclass
class Provision:
    pvc: Mapping
    storage_class: Mapping
    request: VolumeRequest


@dataclass
class Delete:
    pv: Mapping
    volume_id: str


@dataclass
class Reject:
    """A claim of ours that cannot be provisioned as written: report it (event), do not retry in a tight loop."""
    pvc: Mapping
    reason: str


Action = Union[Provision, Delete, Reject]


def is_ours(sc: Optional[Mapping], name: str = PROVISIONER_NAME) -> bool:
    return bool(sc) and sc.get("provisioner") == name


def volume_request(pvc: Mapping, sc: Mapping, my_node: str) -> VolumeRequest:
    spec = pvc.get("spec") or {}
    if spec.get("volumeMode") == "Block":
        raise Unprovisionable("FlexVolume cannot provide raw block volumes (volumeMode: Block); use the CSI driver "
                              f"{constants.DRIVER_NAME} for block volumes")
    res = spec.get("resources") or {}
    req = (res.get("requests") or {}).get("storage")
    if req is None:
        raise Unprovisionable("the claim has no spec.resources.requests.storage")
    required = parse_quantity(req)
    lim = (res.get("limits") or {}).get("storage")
    limit = parse_quantity(lim) if lim is not None else 0
    modes = spec.get("accessModes") or ["ReadWriteOnce"]
    unknown = [m for m in modes if m not in ACCESS_MODES]
    if unknown:
        raise Unprovisionable(f"access mode(s) {', '.join(unknown)} unknown (one of {', '.join(ACCESS_MODES)})")
    params = dict(sc.get("parameters") or {})
    fs_type = params.pop(PARAM_FS_TYPE, "") or constants.DEFAULT_FS_TYPE
    if fs_type not in constants.SUPPORTED_FS_TYPES:
        raise Unprovisionable(f"StorageClass {meta(sc).get('name')} parameter fsType={fs_type!r} is not supported "
                              f"(one of {', '.join(constants.SUPPORTED_FS_TYPES)})")
    selected = meta(pvc).get("annotations", {}).get(ANN_SELECTED_NODE, "")
    requisite = [{constants.TOPOLOGY_NODE_KEY: selected}] if selected else []
    return VolumeRequest(volume_name(pvc), required, limit, [ACCESS_MODES[m] for m in modes], fs_type, params,
                         list(sc.get("mountOptions") or []), requisite)


def plan(pvcs: Sequence[Mapping], pvs: Sequence[Mapping], storage_classes: Sequence[Mapping], my_node: str,
         node_local_backends: frozenset[str] = frozenset(), default_backend: str = "",
         name: str = PROVISIONER_NAME) -> list[Action]:
    """Everything to do now. Claims: Pending, unbound, of one of our StorageClasses, with no PV made yet; claims of
    WaitForFirstConsumer classes wait for the scheduler's selected-node; claims for a node-local backend are left to
    the provisioner on the selected node. PVs: ours, Released, reclaim policy Delete."""
    classes = {meta(sc).get("name"): sc for sc in storage_classes}
    existing = {meta(pv).get("name") for pv in pvs}
    actions: list[Action] = []
    for pvc in pvcs:
        spec = pvc.get("spec") or {}
        sc = classes.get(spec.get("storageClassName") or "")
        if not is_ours(sc, name) or spec.get("volumeName"):
            continue
        if (pvc.get("status") or {}).get("phase", "Pending") != "Pending" or meta(pvc).get("deletionTimestamp"):
            continue
        if pv_name(pvc) in existing:
            continue  # made by an earlier run; the PV controller binds it
        ann = meta(pvc).get("annotations") or {}
        selected = ann.get(ANN_SELECTED_NODE, "")
        if sc.get("volumeBindingMode") == "WaitForFirstConsumer" and not selected:
            continue
        backend = (sc.get("parameters") or {}).get(constants.PARAM_BACKEND) or default_backend
        if backend in node_local_backends and selected and selected != my_node:
            continue
        try:
            actions.append(Provision(pvc, sc, volume_request(pvc, sc, my_node)))
        except Unprovisionable as e:
            actions.append(Reject(pvc, str(e)))
    for pv in pvs:
        ann = meta(pv).get("annotations") or {}
        spec = pv.get("spec") or {}
        if ann.get(ANN_PROVISIONED_BY) != name or (pv.get("status") or {}).get("phase") != "Released":
            continue
        if spec.get("persistentVolumeReclaimPolicy", "Delete") != "Delete" or meta(pv).get("deletionTimestamp"):
            continue
        vid = ((spec.get("flexVolume") or {}).get("options") or {}).get("volumeID") or ann.get(ANN_VOLUME_ID)
        if vid:
            actions.append(Delete(pv, vid))
    return actions


def build_pv(pvc: Mapping, sc: Mapping, req: VolumeRequest, volume_id: str, capacity_bytes: int,
             context: Mapping[str, str], topology: Sequence[Mapping[str, str]], name: str = PROVISIONER_NAME) -> dict:
    """The PV for a provisioned volume: a flexVolume source for `tessera/block` whose options carry the volume ID and
    the volume context (what a node needs to attach it), pre-bound to the claim through claimRef."""
    m = meta(pvc)
    options = {"volumeID": volume_id, **{k: str(v) for k, v in context.items()}}
    if req.mount_options:
        options["mountOptions"] = ",".join(req.mount_options)
    pv: dict = {
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": pv_name(pvc),
                     "annotations": {ANN_PROVISIONED_BY: name, ANN_VOLUME_ID: volume_id},
                     "labels": {"app.kubernetes.io/managed-by": "tessera-flex-provisioner"}},
        "spec": {
            "capacity": {"storage": str(capacity_bytes)},
            "accessModes": list((pvc.get("spec") or {}).get("accessModes") or ["ReadWriteOnce"]),
            "persistentVolumeReclaimPolicy": sc.get("reclaimPolicy") or "Delete",
            "storageClassName": meta(sc).get("name"),
            "volumeMode": "Filesystem",
            "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": m.get("namespace"),
                         "name": m.get("name"), "uid": m.get("uid")},
            "flexVolume": {"driver": FLEX_DRIVER, "fsType": req.fs_type, "options": options},
        },
    }
    terms = [{"matchExpressions": [{"key": k, "operator": "In", "values": [v]} for k, v in sorted(t.items())]}
             for t in topology if t]
    if terms:
        pv["spec"]["nodeAffinity"] = {"required": {"nodeSelectorTerms": terms}}
    return pv


def backoff_delay(failures: int, base: float = 1.0, cap: float = 300.0) -> float:
    """Seconds to wait before retrying a claim that failed `failures` times in a row (exponential, capped)."""
    if failures <= 0:
        return 0.0
    return min(cap, base * (2 ** (failures - 1)))


def event_name(obj: Mapping, reason: str) -> str:
    m = meta(obj)
    digest = hashlib.sha256(f"{m.get('uid')}/{reason}".encode()).hexdigest()[:10]
    return f"{m.get('name')}.{digest}"
