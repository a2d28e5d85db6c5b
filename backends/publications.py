"""Who a volume is controller-published to, and which new publication the spec lets in beside them.

Backends that serve ControllerPublishVolume keep one record per node on the volume itself (iSCSI in its store's
metadata, RBD in the image's metadata), written before the access is granted, so a crash leaves a record the retry
finds compatible. The rules that judge a new publication against those records are the spec's and the same for
every backend; they live here once."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

from .base import SINGLE_NODE_MODES
from .errors import AlreadyExists, FailedPrecondition


class PublicationLike(Protocol):
    access: str  # "rw" | "ro"
    mode: str  # the CSI access mode name
    access_type: str  # "mount" | "block"

    def describe(self) -> str: ...


def describe(pub: PublicationLike) -> str:
    return f"{'read-only' if pub.access == 'ro' else 'read-write'} {pub.access_type} {pub.mode}"


def check_beside(volume: str, node: str, want: PublicationLike, mine: PublicationLike | None,
                 others: Iterable[PublicationLike], holder: Callable[[PublicationLike], str]) -> None:
    """Refuse a publication of `volume` to `node` as `want`, given this node's record `mine` and the other nodes'
    records `others` (`holder` names one of them in a message):
    - the same node again with another readonly flag, access mode or access type: ALREADY_EXISTS (the spec:
      "published ... but is incompatible with the specified volume_capability or readonly flag");
    - a single-node access mode while another node holds it, or another node holding it in a single-node mode:
      FAILED_PRECONDITION (the spec: "published at another node and does not have MULTI_NODE capability");
    - a read-write publication while another node holds it read-write, unless both are MULTI_NODE_MULTI_WRITER:
      FAILED_PRECONDITION naming the holder (one writer is all MULTI_NODE_SINGLE_WRITER allows)."""
    if mine is not None and (mine.access, mine.mode, mine.access_type) != (want.access, want.mode, want.access_type):
        raise AlreadyExists(f"volume {volume} is already published to node {node} as {mine.describe()}; this "
                            f"request asks {want.describe()} (unpublish first)")
    for p in others:
        if want.mode in SINGLE_NODE_MODES or p.mode in SINGLE_NODE_MODES:
            raise FailedPrecondition(f"volume {volume} is published to {holder(p)} as {p.describe()}; a single-node "
                                     "access mode allows one node only: unpublish it there first")
        if p.access == "rw" and want.access == "rw" and not (
                want.mode == "MULTI_NODE_MULTI_WRITER" and p.mode == "MULTI_NODE_MULTI_WRITER"):
            raise FailedPrecondition(f"volume {volume} is held read-write by {holder(p)}; {want.mode} allows one "
                                     "writer: unpublish it there first")


@dataclass(frozen=True)
class NodePublication:
    """One ControllerPublishVolume in force, as a backend that needs nothing node-specific stores it:
    `rw|ro/MODE/TYPE/node/node-id`. The CSI node ID (csi.ids.NodeRef, URL-encoded attributes) is what
    ControllerGetVolume and ListVolumes answer in `published_node_ids`. No field holds a '/' (node names cannot,
    and the node ID's attributes are URL-encoded), so the split is exact."""
    access: str
    mode: str
    access_type: str
    node: str
    node_id: str

    def encode(self) -> str:
        return "/".join((self.access, self.mode, self.access_type, self.node, self.node_id))

    @classmethod
    def parse(cls, raw: str) -> "NodePublication":
        parts = raw.split("/", 4)
        parts += [""] * (5 - len(parts))
        return cls(*parts)

    def describe(self) -> str:
        return describe(self)


def record_key(node_name: str) -> str:
    """The key of one node's record among a volume's metadata (hashed: a node name can be 253 characters)."""
    return "pub." + hashlib.sha256(node_name.encode()).hexdigest()[:16]


def is_record_key(key: str) -> bool:
    return key.startswith("pub.")
