"""ControllerPublish/Unpublish for RBD: a record of each node a volume is published to, kept with the image's other
Tessera records (`tessera.pub.<hash of the node name>`, backends/rbd_records.py).

RBD needs no per-node grant: any node with the Ceph credentials can map an image. What the records give is what
the controller could not know otherwise: the CSI node IDs in `published_node_ids` (ControllerGetVolume,
ListVolumes: the image's watchers name client addresses, not nodes), and the spec's refusal of a second node for
a single-node access mode or a second writer (FAILED_PRECONDITION), before that node ever maps the image. The node
plugin's own check at NodeStage (no other client holding the image read-write) stays: it also covers clients
outside Kubernetes.

The records live on the image's id object (backends/rbd_records.py): a publish opens no image, so it never takes the
exclusive lock a node holds on a mapped image; it reads the records once and writes them once."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from .errors import NotFound
from .publications import NodePublication, check_beside, is_record_key, record_key
from . import rbd_records

if TYPE_CHECKING:
    from .rbd import RbdBackend

# What an rbd node plugin adds to its CSI node ID (NodeGetInfo; csi.ids.NodeRef): ControllerPublish receives no node
# data but that ID, and a node ID without it cannot come from a node that maps this backend's images — the spec's
# NOT_FOUND "node does not exist", rather than a record for a node that will never stage the volume.
NODE_ATTRIBUTES = {"rbd": "1"}


def published_node_ids(meta: Mapping[str, str]) -> list[str]:
    """The CSI node IDs of the records among an image's `tessera.*` metadata (prefix dropped)."""
    return sorted({NodePublication.parse(v).node_id for k, v in meta.items() if is_record_key(k)})


def publish(backend: "RbdBackend", local_id: str, node: Any, readonly: bool, capability: Any,
            secrets: Mapping[str, str]) -> dict[str, str]:
    """Record the publication after checking it against the others; nothing else to grant. Idempotent: the same
    publication again writes nothing."""
    import rados
    from .rbd import VOL_PREFIX
    what = f"volume {backend.name}:{local_id}"
    parsed = backend._split(local_id, VOL_PREFIX)
    if parsed is None:
        raise NotFound(f"{what} does not exist")
    conn = backend._conn(secrets)
    with backend._ceph(f"publish {what}", conn):
        io = conn.ioctx(parsed[0])
        meta = rbd_records.load(io, parsed[1])
        if meta is None or "name" not in meta:
            raise NotFound(f"{what} does not exist")
        if any((node.attributes or {}).get(k) != v for k, v in NODE_ATTRIBUTES.items()):
            raise NotFound(f"node {node.name} does not exist as an rbd node: its node ID {node.encode()!r} carries "
                           "no rbd=1, which every Tessera node plugin with an rbd backend reports (NodeGetInfo); "
                           "configure the node plugin with the rbd backend")
        want = NodePublication("ro" if readonly else "rw", capability.access_mode, capability.access_type,
                               node.name, node.encode())
        mine = record_key(node.name)
        pubs = {k: NodePublication.parse(v) for k, v in meta.items() if is_record_key(k)}
        others = [p for k, p in pubs.items() if k != mine]
        check_beside(f"{backend.name}:{local_id}", node.name, want, pubs.get(mine), others,
                     lambda p: f"node {p.node}")
        if meta.get(mine) != want.encode():
            try:
                rbd_records.save(io, parsed[1], meta, {mine: want.encode()})
            except rados.ObjectNotFound:
                raise NotFound(f"{what} does not exist") from None
    return {}


def unpublish(backend: "RbdBackend", local_id: str, node: Any, secrets: Mapping[str, str]) -> None:
    """Drop the record of `node` (every record when `node` is None). A volume or record that is not there is
    unpublished already: OK, as the spec asks."""
    import rados
    from .rbd import VOL_PREFIX
    parsed = backend._split(local_id, VOL_PREFIX)
    if parsed is None:
        return
    conn = backend._conn(secrets)
    with backend._ceph(f"unpublish volume {backend.name}:{local_id}", conn):
        try:
            io = conn.ioctx(parsed[0])
        except NotFound:
            return  # the pool is gone, and the volume with it
        meta = rbd_records.load(io, parsed[1])
        if meta is None:
            return
        drop = [k for k in meta if is_record_key(k) and (node is None or k == record_key(node.name))]
        if drop:
            try:
                rbd_records.save(io, parsed[1], meta, {}, drop)
            except rados.ObjectNotFound:
                return
