"""The provisioner's decisions as pure functions of Kubernetes objects (plain dicts as the API serves them).

Nothing here talks to a cluster or a backend, so every rule is tested with literal objects: which claims are ours,
what volume to ask for, what PV to write, which released PVs to delete.

Rules worth knowing:
- Node-local backends (file, lvm: `Features.node_local`). Every node runs its own provisioner (a DaemonSet, one
  Lease per node), and a volume can only be made, and only be deleted, on its node. So a provisioner acts only for
  its own node: a claim when its `volume.kubernetes.io/selected-node` is this node, a Released PV when its
  nodeAffinity names this node (another node's provisioner would find no such file/LV, count the delete as done
  and drop the PV: the data would leak). A claim of an Immediate-binding class has no node yet; rather than let
  every node make a volume (all but one leaked) or guess a node the pod may never fit on, it is refused with an
  event asking for `volumeBindingMode: WaitForFirstConsumer` (the scheduler then picks the node and annotates the
  claim). A Released PV whose node cannot be read from it is left alone: nobody can delete it safely.
- Access modes. The PV lists the claim's modes; the shim gets one CSI mode in flexVolume.options `accessMode`: the
  narrowest one that allows every mode the claim asked for (RWX → MULTI_NODE_MULTI_WRITER, ROX alone →
  MULTI_NODE_READER_ONLY, RWO or RWOP with ROX → MULTI_NODE_SINGLE_WRITER, RWO → SINGLE_NODE_WRITER, RWOP alone →
  SINGLE_NODE_SINGLE_WRITER). A claim whose modes (or that combined mode) the backend does not support is refused
  with an event.
- Secrets, with the StorageClass parameters CSI uses. `csi.storage.k8s.io/provisioner-secret-name`/`-namespace`:
  the Secret's data goes to CreateVolume and DeleteVolume (the resolved name is kept in the PV's
  `volume.kubernetes.io/provisioner-deletion-secret-*` annotations, as external-provisioner does, so deletion does
  not depend on the class). `csi.storage.k8s.io/node-stage-secret-name`/`-namespace` (or node-publish-secret: a Flex
  volume has one secret) becomes the PV's flexVolume.secretRef; kubelet reads that Secret and passes it to the
  shim's `mount` as kubernetes.io/secret/<key>, and only when the Secret's type is `tessera/block`, which is checked
  here before anything is created. Templates ${pv.name}, ${pvc.name}, ${pvc.namespace} work as in CSI (the
  namespace takes ${pv.name} and ${pvc.namespace}). FlexVolume passes no secret to attach or expandvolume, so the
  controller-publish/-expand and node-expand secret parameters are accepted and ignored: those calls use the
  backend's configured credentials (so does `mountdevice`, which stages the volume when the driver reports
  attach: true, i.e. an iscsi backend is configured). Every csi.storage.k8s.io/ parameter is stripped before the
  backend sees the parameters; an unknown one is refused (as external-provisioner does). Secret values are never
  logged, put in events or written to the PV.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Mapping, Optional, Sequence, Union

from backends.errors import NotFound
from csi import constants
from csi.ids import parse_id

PROVISIONER_NAME = "tessera.csi.dev/flex"
FLEX_DRIVER = "tessera/block"
ANN_PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"
ANN_STORAGE_PROVISIONER = "volume.kubernetes.io/storage-provisioner"
ANN_BETA_STORAGE_PROVISIONER = "volume.beta.kubernetes.io/storage-provisioner"
ANN_SELECTED_NODE = "volume.kubernetes.io/selected-node"
ANN_VOLUME_ID = "tessera.csi.dev/volume-id"
ANN_DELETION_SECRET_NAME = "volume.kubernetes.io/provisioner-deletion-secret-name"
ANN_DELETION_SECRET_NAMESPACE = "volume.kubernetes.io/provisioner-deletion-secret-namespace"
PARAM_FS_TYPE = "fsType"

CSI_PARAM_PREFIX = "csi.storage.k8s.io/"
PARAM_CSI_FS_TYPE = CSI_PARAM_PREFIX + "fstype"
PARAM_PROVISIONER_SECRET = CSI_PARAM_PREFIX + "provisioner-secret"      # + "-name" / "-namespace"
PARAM_NODE_STAGE_SECRET = CSI_PARAM_PREFIX + "node-stage-secret"
PARAM_NODE_PUBLISH_SECRET = CSI_PARAM_PREFIX + "node-publish-secret"
# no FlexVolume call made with these gets secrets (attach, expandvolume); accepted so CSI classes carry over
IGNORED_SECRET_PARAMS = tuple(CSI_PARAM_PREFIX + p + s
                              for p in ("controller-publish-secret", "controller-expand-secret", "node-expand-secret")
                              for s in ("-name", "-namespace"))

ACCESS_MODES = {
    "ReadWriteOnce": "SINGLE_NODE_WRITER",
    "ReadWriteOncePod": "SINGLE_NODE_SINGLE_WRITER",
    "ReadOnlyMany": "MULTI_NODE_READER_ONLY",
    "ReadWriteMany": "MULTI_NODE_MULTI_WRITER",
}

# the one CSI mode the shim publishes with, for a set of claim modes (see the module doc)
RWO, RWOP, ROX, RWX = "ReadWriteOnce", "ReadWriteOncePod", "ReadOnlyMany", "ReadWriteMany"

_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")  # RFC 1123 subdomain
_NAMESPACE_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")                             # RFC 1123 label
_TEMPLATE_RE = re.compile(r"\$\{([^}]*)\}")

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


@dataclass(frozen=True)
class SecretRef:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


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
    publish_mode: str = "SINGLE_NODE_WRITER"          # flexVolume.options accessMode
    provisioner_secret: Optional[SecretRef] = None    # data → CreateVolume/DeleteVolume
    stage_secret: Optional[SecretRef] = None          # → flexVolume.secretRef (kubelet → mount)


@dataclass
class Provision:
    pvc: Mapping
    storage_class: Mapping
    request: VolumeRequest


@dataclass
class Delete:
    pv: Mapping
    volume_id: str
    secret: Optional[SecretRef] = None


@dataclass
class Reject:
    """A claim of ours that cannot be provisioned as written: report it (event), do not retry in a tight loop."""
    pvc: Mapping
    reason: str


Action = Union[Provision, Delete, Reject]


def is_ours(sc: Optional[Mapping], name: str = PROVISIONER_NAME) -> bool:
    return bool(sc) and sc.get("provisioner") == name


def backend_of_class(sc: Mapping, default_backend: str = "") -> str:
    return (sc.get("parameters") or {}).get(constants.PARAM_BACKEND) or default_backend


def publish_mode(modes: Sequence[str]) -> str:
    """The one CSI access mode that allows every Kubernetes access mode the claim lists (see the module doc)."""
    m = set(modes)
    if RWX in m:
        return "MULTI_NODE_MULTI_WRITER"
    if ROX in m:
        return "MULTI_NODE_SINGLE_WRITER" if m & {RWO, RWOP} else "MULTI_NODE_READER_ONLY"
    if RWO in m:
        return "SINGLE_NODE_WRITER"
    return "SINGLE_NODE_SINGLE_WRITER"


def _check_modes(modes: Sequence[str], mode: str, backend: str, supported: Optional[frozenset[str]]) -> None:
    if supported is None:
        return  # unknown backend: CreateVolume names the configured ones
    missing = [m for m in modes if ACCESS_MODES[m] not in supported]
    if missing:
        raise Unprovisionable(f"access mode(s) {', '.join(missing)} are not supported by backend {backend!r} "
                              f"(it supports {', '.join(_k8s_names(supported)) or 'none'})")
    if mode not in supported:
        raise Unprovisionable(f"access modes {' + '.join(modes)} together need one writer node and many reader "
                              f"nodes ({mode}), which backend {backend!r} does not support; ask for one of them")


def _k8s_names(csi_modes: frozenset[str]) -> list[str]:
    return [k for k, v in ACCESS_MODES.items() if v in csi_modes]


def _resolve(template: str, param: str, allowed: Mapping[str, str]) -> str:
    def sub(m: "re.Match[str]") -> str:
        if m.group(1) not in allowed:
            raise Unprovisionable(f"StorageClass parameter {param}: ${{{m.group(1)}}} is not supported here (use "
                                  f"{', '.join('${' + k + '}' for k in allowed)})")
        return allowed[m.group(1)]
    return _TEMPLATE_RE.sub(sub, template)


def secret_ref(params: Mapping[str, str], prefix: str, pvc_namespace: str, pvc_name: str,
               pv: str) -> Optional[SecretRef]:
    """The Secret that `<prefix>-name`/`<prefix>-namespace` name, templates resolved; None when neither is set."""
    name_t, ns_t = params.get(prefix + "-name"), params.get(prefix + "-namespace")
    if name_t is None and ns_t is None:
        return None
    if not name_t or not ns_t:
        raise Unprovisionable(f"StorageClass parameters {prefix}-name and {prefix}-namespace must be set together")
    name = _resolve(name_t, prefix + "-name", {"pv.name": pv, "pvc.name": pvc_name, "pvc.namespace": pvc_namespace})
    ns = _resolve(ns_t, prefix + "-namespace", {"pv.name": pv, "pvc.namespace": pvc_namespace})
    if not _NAME_RE.match(name) or len(name) > 253:
        raise Unprovisionable(f"StorageClass parameter {prefix}-name gives {name!r}, not a valid Secret name")
    if not _NAMESPACE_RE.match(ns) or len(ns) > 63:
        raise Unprovisionable(f"StorageClass parameter {prefix}-namespace gives {ns!r}, not a valid namespace")
    return SecretRef(ns, name)


# the csi.storage.k8s.io/ StorageClass parameters this provisioner reads or accepts
KNOWN_CSI_PARAMS = frozenset({PARAM_CSI_FS_TYPE, *IGNORED_SECRET_PARAMS} | {
    p + s for p in (PARAM_PROVISIONER_SECRET, PARAM_NODE_STAGE_SECRET, PARAM_NODE_PUBLISH_SECRET)
    for s in ("-name", "-namespace")})


def split_parameters(params: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(the backend's parameters, the csi.storage.k8s.io/ ones); an unknown reserved key is refused."""
    backend, reserved = {}, {}
    for k, v in params.items():
        if k.startswith(CSI_PARAM_PREFIX) and k not in constants.EXTRA_METADATA_PARAMS:
            if k not in KNOWN_CSI_PARAMS:
                raise Unprovisionable(f"StorageClass parameter {k!r} uses the reserved {CSI_PARAM_PREFIX} prefix but "
                                      f"is not one this provisioner knows ({', '.join(sorted(KNOWN_CSI_PARAMS))})")
            reserved[k] = v
        else:
            backend[k] = v
    return backend, reserved


def volume_request(pvc: Mapping, sc: Mapping, my_node: str,
                   access_modes: Optional[Mapping[str, frozenset[str]]] = None,
                   default_backend: str = "") -> VolumeRequest:
    """What to create for a claim. `access_modes`: backend name -> the CSI modes it supports (None: unchecked)."""
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
    modes = list(spec.get("accessModes") or [RWO])
    unknown = [m for m in modes if m not in ACCESS_MODES]
    if unknown:
        raise Unprovisionable(f"access mode(s) {', '.join(unknown)} unknown (one of {', '.join(ACCESS_MODES)})")
    mode = publish_mode(modes)
    backend = backend_of_class(sc, default_backend)
    if access_modes is not None:
        _check_modes(modes, mode, backend, access_modes.get(backend))
    params, reserved = split_parameters(sc.get("parameters") or {})
    fs_type = params.pop(PARAM_FS_TYPE, "") or reserved.get(PARAM_CSI_FS_TYPE, "") or constants.DEFAULT_FS_TYPE
    if fs_type not in constants.SUPPORTED_FS_TYPES:
        raise Unprovisionable(f"StorageClass {meta(sc).get('name')} parameter fsType={fs_type!r} is not supported "
                              f"(one of {', '.join(constants.SUPPORTED_FS_TYPES)})")
    m = meta(pvc)
    ns, claim, pv = m.get("namespace") or "default", m.get("name") or "", pv_name(pvc)
    prov_secret = secret_ref(reserved, PARAM_PROVISIONER_SECRET, ns, claim, pv)
    stage = secret_ref(reserved, PARAM_NODE_STAGE_SECRET, ns, claim, pv)
    publish = secret_ref(reserved, PARAM_NODE_PUBLISH_SECRET, ns, claim, pv)
    if stage and publish and stage != publish:
        raise Unprovisionable(f"node-stage secret {stage} and node-publish secret {publish} differ, but a FlexVolume "
                              "PV has one secretRef (its `mount` does both); name one Secret")
    selected = (m.get("annotations") or {}).get(ANN_SELECTED_NODE, "")
    requisite = [{constants.TOPOLOGY_NODE_KEY: selected}] if selected else []
    return VolumeRequest(volume_name(pvc), required, limit, [ACCESS_MODES[x] for x in modes], fs_type, params,
                         list(sc.get("mountOptions") or []), requisite, mode, prov_secret, stage or publish)


def _backend_of_id(volume_id: str) -> str:
    """The backend a volume ID names ("" for a string that is no Tessera ID: DeleteVolume treats it as gone)."""
    try:
        return parse_id(volume_id).backend
    except NotFound:
        return ""


def pv_node(pv: Mapping) -> Optional[str]:
    """The one node a PV's required nodeAffinity pins it to (the node of a node-local volume), else None."""
    terms = ((((pv.get("spec") or {}).get("nodeAffinity") or {}).get("required") or {})
             .get("nodeSelectorTerms") or [])
    nodes: set[str] = set()
    for t in terms:
        values = [v for e in (t.get("matchExpressions") or []) if e.get("key") == constants.TOPOLOGY_NODE_KEY
                  and e.get("operator") == "In" for v in (e.get("values") or [])]
        if not values:
            return None  # a term that does not constrain the node: the PV is not pinned to one
        nodes.update(values)
    return nodes.pop() if len(nodes) == 1 else None


def deletion_secret(pv: Mapping, classes: Mapping[str, Mapping]) -> Optional[SecretRef]:
    """The provisioner secret for deleting a PV's volume: from the PV's annotations (written at provisioning), else
    (a PV made before they were written) from its StorageClass if that still exists."""
    ann = meta(pv).get("annotations") or {}
    if ann.get(ANN_DELETION_SECRET_NAME) and ann.get(ANN_DELETION_SECRET_NAMESPACE):
        return SecretRef(ann[ANN_DELETION_SECRET_NAMESPACE], ann[ANN_DELETION_SECRET_NAME])
    sc = classes.get((pv.get("spec") or {}).get("storageClassName") or "")
    if not sc:
        return None
    ref = (pv.get("spec") or {}).get("claimRef") or {}
    try:
        _, reserved = split_parameters(sc.get("parameters") or {})
        return secret_ref(reserved, PARAM_PROVISIONER_SECRET, ref.get("namespace") or "default", ref.get("name") or "",
                          meta(pv).get("name") or "")
    except Unprovisionable:
        return None


def secret_data(secret: Mapping, ref: SecretRef) -> dict[str, str]:
    """A Secret's data as text (the API serves it base64-encoded). Messages name keys, never values."""
    out: dict[str, str] = {}
    for k, v in (secret.get("data") or {}).items():
        try:
            out[k] = base64.b64decode(v or "", validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise Unprovisionable(f"Secret {ref} key {k!r} is not UTF-8 text") from None
    return out


def check_stage_secret(secret: Optional[Mapping], ref: SecretRef) -> None:
    """kubelet gives a FlexVolume PV's secretRef to the driver only when the Secret's type is the driver name."""
    if secret is None:
        raise Unprovisionable(f"Secret {ref} (StorageClass node-stage/node-publish secret) does not exist")
    if secret.get("type") != FLEX_DRIVER:
        raise Unprovisionable(f"Secret {ref} has type {secret.get('type') or 'Opaque'!r}; kubelet passes a "
                              f"FlexVolume secret to the driver only when its type is {FLEX_DRIVER!r}: recreate it "
                              f"with `type: {FLEX_DRIVER}`")


IMMEDIATE_NODE_LOCAL = ("StorageClass {sc} binds Immediately, but backend {backend!r} is node-local: its volumes "
                        "can only be made on the node that will use them, which is known once a pod is scheduled. "
                        "Set volumeBindingMode: WaitForFirstConsumer on the StorageClass (or annotate the claim with "
                        f"{ANN_SELECTED_NODE}=<node>)")


def plan(pvcs: Sequence[Mapping], pvs: Sequence[Mapping], storage_classes: Sequence[Mapping], my_node: str,
         node_local_backends: frozenset[str] = frozenset(), default_backend: str = "",
         name: str = PROVISIONER_NAME, access_modes: Optional[Mapping[str, frozenset[str]]] = None) -> list[Action]:
    """Everything to do now. Claims: Pending, unbound, of one of our StorageClasses, with no PV made yet; claims of
    WaitForFirstConsumer classes wait for the scheduler's selected-node; claims for a node-local backend are left to
    the provisioner on the selected node (and refused without one). PVs: ours, Released, reclaim policy Delete; for
    a node-local backend only on the PV's node."""
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
        backend = backend_of_class(sc, default_backend)
        if backend in node_local_backends:
            if not selected:
                actions.append(Reject(pvc, IMMEDIATE_NODE_LOCAL.format(sc=meta(sc).get("name"), backend=backend)))
                continue
            if selected != my_node:
                continue  # the provisioner on the selected node makes it
        try:
            actions.append(Provision(pvc, sc, volume_request(pvc, sc, my_node, access_modes, default_backend)))
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
        if not vid:
            continue
        if _backend_of_id(vid) in node_local_backends and pv_node(pv) != my_node:
            continue  # only the volume's node can delete it (None: nobody can tell which node that is)
        actions.append(Delete(pv, vid, deletion_secret(pv, classes)))
    return actions


def build_pv(pvc: Mapping, sc: Mapping, req: VolumeRequest, volume_id: str, capacity_bytes: int,
             context: Mapping[str, str], topology: Sequence[Mapping[str, str]], name: str = PROVISIONER_NAME) -> dict:
    """The PV for a provisioned volume: a flexVolume source for `tessera/block` whose options carry the volume ID, the
    access mode and the volume context (what a node needs to attach it), pre-bound to the claim through claimRef."""
    m = meta(pvc)
    options = {"volumeID": volume_id, **{k: str(v) for k, v in context.items()}, "accessMode": req.publish_mode}
    if req.mount_options:
        options["mountOptions"] = ",".join(req.mount_options)
    annotations = {ANN_PROVISIONED_BY: name, ANN_VOLUME_ID: volume_id}
    if req.provisioner_secret:
        annotations[ANN_DELETION_SECRET_NAME] = req.provisioner_secret.name
        annotations[ANN_DELETION_SECRET_NAMESPACE] = req.provisioner_secret.namespace
    flex: dict = {"driver": FLEX_DRIVER, "fsType": req.fs_type, "options": options}
    if req.stage_secret:
        flex["secretRef"] = {"name": req.stage_secret.name, "namespace": req.stage_secret.namespace}
    pv: dict = {
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": pv_name(pvc),
                     "annotations": annotations,
                     "labels": {"app.kubernetes.io/managed-by": "tessera-flex-provisioner"}},
        "spec": {
            "capacity": {"storage": str(capacity_bytes)},
            "accessModes": list((pvc.get("spec") or {}).get("accessModes") or [RWO]),
            "persistentVolumeReclaimPolicy": sc.get("reclaimPolicy") or "Delete",
            "storageClassName": meta(sc).get("name"),
            "volumeMode": "Filesystem",
            "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": m.get("namespace"),
                         "name": m.get("name"), "uid": m.get("uid")},
            "flexVolume": flex,
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
