"""Volume, snapshot and node IDs: parsed and checked here, and nowhere else.

An ID is `<backend-name>:<backend-local-id>`, at most 128 bytes of a restricted ASCII set, so that an ID that passed
`parse_id` is safe as a file name component, an LVM/RBD object name or a command argument. A well-formed string that
cannot be ours (no colon, unknown backend) means "no such object": NotFound, which DeleteVolume turns into success.
"""
from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, field

from backends.errors import InvalidArgument, NotFound

MAX_ID_BYTES = 128
MAX_NODE_ID_BYTES = 256
BACKEND_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
LOCAL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=@-]{0,126}$")
_PRINTABLE_RE = re.compile(r"^[\x21-\x7e]+$")


@dataclass(frozen=True)
class ObjectId:
    backend: str
    local: str

    def __str__(self) -> str:
        return f"{self.backend}:{self.local}"


def make_id(backend: str, local: str) -> str:
    """Joins a backend name and a local ID; refuses anything `parse_id` would not accept back."""
    if not BACKEND_NAME_RE.match(backend) or not LOCAL_ID_RE.match(local):
        raise ValueError(f"cannot form an ID from backend {backend!r} and local id {local!r}")
    raw = f"{backend}:{local}"
    if len(raw) > MAX_ID_BYTES:
        raise ValueError(f"ID {raw!r} is longer than {MAX_ID_BYTES} bytes")
    return raw


def parse_id(raw: str, kind: str = "volume") -> ObjectId:
    """Splits and validates an ID from a request.

    Empty → InvalidArgument (a required field is missing). Anything else that is not one of our IDs → NotFound, with
    the reason, because such an object cannot exist.
    """
    if not raw:
        raise InvalidArgument(f"{kind} ID is required")
    if len(raw.encode()) > MAX_ID_BYTES or not _PRINTABLE_RE.match(raw):
        raise NotFound(f"{kind} {raw[:64]!r} does not exist: not a Tessera {kind} ID (printable ASCII, at most {MAX_ID_BYTES} bytes)")
    backend, sep, local = raw.partition(":")
    if not sep or not BACKEND_NAME_RE.match(backend) or not LOCAL_ID_RE.match(local):
        raise NotFound(f"{kind} {raw!r} does not exist: Tessera {kind} IDs look like <backend>:<id>")
    return ObjectId(backend, local)


@dataclass(frozen=True)
class NodeRef:
    """A node as the controller sees it: the node name plus attributes its node plugin published.

    Backends that grant per-node access (iSCSI ACLs need the initiator IQN) put what they need in `attributes` on the
    node side (`Backend.node_attributes`); it travels inside the CSI node ID, the only node data ControllerPublish gets.
    """
    name: str
    attributes: dict[str, str] = field(default_factory=dict)

    def encode(self) -> str:
        if not self.attributes:
            return self.name
        raw = self.name + "?" + urllib.parse.urlencode(sorted(self.attributes.items()))
        if len(raw.encode()) > MAX_NODE_ID_BYTES:
            raise ValueError(f"node ID {raw!r} is longer than {MAX_NODE_ID_BYTES} bytes")
        return raw


NODE_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$")


def parse_node_id(raw: str) -> NodeRef:
    if not raw:
        raise InvalidArgument("node ID is required")
    if len(raw.encode()) > MAX_NODE_ID_BYTES or not _PRINTABLE_RE.match(raw):
        raise NotFound(f"node {raw[:64]!r} does not exist: not a Tessera node ID")
    name, _, query = raw.partition("?")
    if not NODE_NAME_RE.match(name):
        raise NotFound(f"node {raw!r} does not exist: not a Tessera node ID")
    try:
        attrs = dict(urllib.parse.parse_qsl(query, strict_parsing=True)) if query else {}
    except ValueError:
        raise NotFound(f"node {raw!r} does not exist: malformed node attributes") from None
    return NodeRef(name, attrs)
