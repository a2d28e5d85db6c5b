"""Shared block storage over iSCSI: a Linux target host exports each volume, nodes log in with os-brick.

This is Cinder's LVM-iSCSI design in CSI form:
- Controller (runs on the target host): the backing store (`iscsi_store`: sparse files or LVs through the LVM
  backend's code) holds the bytes and the metadata; the target driver (`iscsi_targets`: LIO or tgt) exports each
  volume as its own target `<iqnPrefix>:<local id>` with the volume on LUN 0 (LIO) or LUN 1 (tgt, whose LUN 0 is
  its controller device). Creating a volume exports it with no ACL, so nobody can log in until it is published.
- ControllerPublishVolume adds an ACL for the node's initiator IQN. The IQN reaches the controller *inside the CSI
  node ID*: the node plugin's `node_attributes()` reports `{"iqn": ...}` and the core encodes it as
  `<node>?iqn=<iqn>` (csi/ids.py NodeRef) - NodeGetInfo's node ID is the only node data ControllerPublish receives,
  and topology would make every volume's accessibility depend on initiator names.
  FlexVolume has no node ID: kube-controller-manager's attach names only the node, so there the IQN comes from
  `initiatorNameTemplate` (e.g. `iqn.2026-01.com.example:{node}`), a naming convention the operator applies to every
  node's /etc/iscsi/initiatorname.iscsi; see `node_attributes_for_name` and flex/shim.py.
- CHAP (on by default): per-volume credentials, user = the volume's local id, password = HMAC-SHA256(controller key,
  volume id) in base32, so a retried publish returns the same secret without storing it anywhere readable. The key
  is `chapKeyFile` (created with 32 random bytes, mode 0600, when missing). The credentials go only into the
  publish context (a CSI secret-free map, but one nothing in Tessera logs); never into the volume context or logs.
- Node: os-brick's ISCSIConnector logs in (CHAP from the publish context) and returns the SCSI disk; detach lets
  os-brick remove the device and log out of the session only when no other device uses it. With one target per
  volume each volume has its own session, so two volumes never share one; os-brick's rule still matters for the
  multipath case (several portals → several sessions, all left to os-brick).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
import secrets as _secrets
import string
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping, Optional

from pydantic import Field, field_validator, model_validator

from .base import (Attachment, Backend, BackendOptions, Capacity, ContentSource, CreateVolumeSpec, Features,
                   ALL_MODES, Snapshot, Volume, object_uuid)
from .errors import (BackendUnavailable, FailedPrecondition, InUse, InvalidArgument, NotFound,
                     OutOfRange, TesseraError)
from . import instance_lock
from .publications import check_beside, describe
from .iscsi_store import SNAPSHOT_PREFIX, VOLUME_PREFIX, FileStore, LvmStore, Obj, Store, now
from .iscsi_targets import Chap, LioDriver, Portal, TargetDriver, TgtDriver

log = logging.getLogger(__name__)

MAX_LUN = 16383  # SAM's flat addressing: 14 bits
_HOST_RE = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
                      r"|[0-9A-Fa-f:.]+)$")
_IQN_RE = re.compile(r"^(iqn\.\d{4}-\d{2}\.[a-z0-9.-]+(:[A-Za-z0-9.:_-]+)?|eui\.[0-9A-Fa-f]{16})$")


class FileStoreOptions(BackendOptions):
    directory: str = Field(description="directory for the sparse volume files (created if missing)")

    @field_validator("directory")
    @classmethod
    def _abs(cls, v: str) -> str:
        if not os.path.isabs(v):
            raise ValueError("must be an absolute path")
        return os.path.normpath(v)


class LvmStoreOptions(BackendOptions):
    volumeGroup: str = Field(description="volume group holding the volumes' LVs")
    thinPool: Optional[str] = Field(None, description="thin pool in the VG (needed for snapshots)")


class BackingStore(BackendOptions):
    file: Optional[FileStoreOptions] = None
    lvm: Optional[LvmStoreOptions] = None

    @model_validator(mode="after")
    def _one(self) -> "BackingStore":
        if (self.file is None) == (self.lvm is None):
            raise ValueError("set exactly one of file or lvm")
        return self


class IscsiOptions(BackendOptions):
    portals: list[str] = Field(min_length=1, description="host:port the target listens on, first = primary")
    iqnPrefix: str = Field(description="target IQN prefix; a volume's target is <iqnPrefix>:<volume local id>")
    targetDriver: Literal["lio", "tgt"] = "lio"
    tgtControlPort: Optional[int] = Field(None, ge=0, le=65535, description="tgtd control port (tgtadm -C)")
    backingStore: BackingStore
    chap: bool = Field(True, description="per-volume CHAP credentials generated at ControllerPublish")
    chapKeyFile: Optional[str] = Field(None, description="HMAC key for CHAP secrets; default <stateDir>/iscsi-<backend>.key")
    multipath: bool = Field(False, description="node: log in to every portal and use dm-multipath")
    forceDelete: bool = Field(False, description="delete volumes even while an initiator is logged in")
    initiatorName: Optional[str] = Field(None, description="node: initiator IQN (default /etc/iscsi/initiatorname.iscsi)")
    initiatorNameTemplate: Optional[str] = Field(None, description=(
        "FlexVolume attach only: a node's initiator IQN from its Kubernetes node name, e.g. "
        "'iqn.2026-01.com.example:{node}' (kube-controller-manager's attach call names only the node); every node's "
        "InitiatorName (/etc/iscsi/initiatorname.iscsi, or initiatorName) must be this IQN"))
    commandTimeout: float = Field(60.0, gt=0)

    @field_validator("iqnPrefix")
    @classmethod
    def _iqn(cls, v: str) -> str:
        if not _IQN_RE.match(v) or len(v) > 180:
            raise ValueError("must be an iqn.YYYY-MM.reverse.domain[:name] IQN")
        return v

    @field_validator("initiatorNameTemplate")
    @classmethod
    def _template(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        try:
            fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(v) if f is not None]
        except ValueError as e:
            raise ValueError(f"is not a template: {e}") from None
        if fields != [("node", "", None)]:
            raise ValueError("must contain {node} exactly once and no other {...} field (a shared IQN would let "
                             "every node log in to every volume and makes the target drop one node's session "
                             "when another logs in)")
        if not _IQN_RE.match(v.format(node="node-1")):
            raise ValueError("must give an iqn.YYYY-MM.reverse.domain:name IQN, e.g. iqn.2026-01.com.example:{node}")
        return v

    @field_validator("portals")
    @classmethod
    def _portals(cls, v: list[str]) -> list[str]:
        for p in v:
            parse_portal(p)
        return v


def parse_portal(text: str) -> Portal:
    host, sep, port = text.rpartition(":")
    if not sep:
        return Portal(text, 3260)
    if not port.isdigit() or not host:
        raise ValueError(f"portal {text!r} is not host:port")
    return Portal(host.strip("[]"), int(port))


class IscsiBackend(Backend):
    type_name = "iscsi"
    options_model = IscsiOptions
    options: IscsiOptions

    def __init__(self, name: str, options: IscsiOptions, runtime: Any) -> None:
        super().__init__(name, options, runtime)
        self.portals = [parse_portal(p) for p in options.portals]
        self._store: Optional[Store] = None
        self._driver: Optional[TargetDriver] = None
        self._connector: Any = None
        self._lock = threading.Lock()

    # ---- parts, made lazily: a node plugin never needs the target or the store --------------------------------
    @property
    def store(self) -> Store:
        if self._store is None:
            bs = self.options.backingStore
            if bs.file is not None:
                self._store = FileStore(bs.file.directory)
            else:
                assert bs.lvm is not None
                self._store = LvmStore(bs.lvm.volumeGroup, bs.lvm.thinPool, timeout=self.options.commandTimeout)
        return self._store

    @property
    def driver(self) -> TargetDriver:
        if self._driver is None:
            if self.options.targetDriver == "tgt":
                self._driver = TgtDriver(self.options.tgtControlPort, timeout=self.options.commandTimeout)
            else:
                self._driver = LioDriver()
        return self._driver

    @property
    def lun(self) -> int:
        return 1 if self.options.targetDriver == "tgt" else 0

    def features(self) -> Features:
        snaps = self.options.backingStore.file is not None or bool(
            self.options.backingStore.lvm and self.options.backingStore.lvm.thinPool)
        # LIO's fileio backstore fixes its size at creation: growing it means re-creating it, which only an
        # unpublished volume tolerates.
        online = not (self.options.targetDriver == "lio" and self.options.backingStore.file is not None)
        return Features(snapshots=snaps, clones=True, expand=True, online_expand=online, controller_publish=True,
                        publish_needed=True, access_modes=ALL_MODES, published_nodes=True)

    def allocation_unit(self) -> int:
        return self.store.allocation_unit()

    def max_volume_bytes(self, parameters: Mapping[str, str] = {}) -> int:
        """The backing store's largest volume: its file system's size, or its VG's or thin pool's."""
        return self.store.capacity()[1]

    def validate_parameters(self, parameters: Mapping[str, str]) -> None:
        if parameters:
            raise InvalidArgument(f"the iscsi backend takes no StorageClass parameters; got {', '.join(sorted(parameters))}")

    def probe(self) -> None:
        self.store.probe()
        self.driver.probe()

    def node_probe(self) -> None:
        """A node logs in with its initiator name; the target host is the controller's concern."""
        self.initiator_name()

    # ---- helpers ----------------------------------------------------------------------------------------------
    def iqn(self, local_id: str) -> str:
        return f"{self.options.iqnPrefix}:{local_id}"

    def _context(self, local_id: str) -> dict[str, str]:
        return {"targetIqn": self.iqn(local_id), "targetPortals": ",".join(str(p) for p in self.portals),
                "lun": str(self.lun)}

    def _volume(self, o: Obj) -> Volume:
        m = o.meta
        src = None
        if ":" in m.get("source", ""):
            kind, _, sid = m["source"].partition(":")
            src = ContentSource(kind, sid)  # type: ignore[arg-type]
        params = {k[2:]: v for k, v in m.items() if k.startswith("p.")}
        abnormal, msg = (True, "creation did not finish; a retried CreateVolume redoes it") if o.pending else (False, "")
        return Volume(local_id=o.local_id, capacity_bytes=o.size, name=m.get("name", ""),
                      context=self._context(o.local_id), parameters=params, source=src,
                      abnormal=abnormal, condition_message=msg,
                      published_nodes=sorted({Publication.parse(v).csi_node_id() for v in _publications(m).values()}))

    def _snapshot(self, o: Obj) -> Snapshot:
        try:
            ctime = float(o.meta.get("ctime", "0"))
        except ValueError:
            ctime = 0.0
        return Snapshot(local_id=o.local_id, source_volume_local_id=o.meta.get("of", ""), size_bytes=o.size,
                        creation_time=ctime, ready_to_use=not o.pending, name=o.meta.get("name", ""))

    def _find(self, local_id: str, prefix: str) -> Optional[Obj]:
        if not local_id.startswith(prefix):
            return None
        o = self.store.find(local_id)
        if o is None or o.meta.get("kind") != ("volume" if prefix == VOLUME_PREFIX else "snapshot"):
            return None
        return o

    def _export(self, o: Obj) -> None:
        self.driver.ensure_target(self.iqn(o.local_id), self.store.export_path(o.local_id), o.size, self.portals,
                                  self.options.chap)

    # ---- one controller per target; lookups by name --------------------------------------------------------------
    def claim_controller(self) -> None:
        """The target's configuration (LIO in this host's kernel, or one tgtd) has no locking of its own: a second
        controller on the same target would race target numbers, ACLs and backing stores, so it refuses to start.
        The lock file sits in the state directory (the host's /var/lib/tessera in the chart), keyed by the target."""
        ident = f"{self.options.targetDriver}/{self.options.tgtControlPort or ''}/{self.options.iqnPrefix}"
        key = hashlib.sha256(ident.encode()).hexdigest()[:16]
        instance_lock.claim(os.path.join(self.runtime.state_dir, f"iscsi-controller-{key}.lock"),
                            f"iSCSI target {self.options.iqnPrefix} ({self.options.targetDriver})",
                            "the iscsi backend runs exactly one controller beside its target: stop the other "
                            "controller (or run this one with --mode node) instead of adding replicas")

    def local_id_for_name(self, kind: str, name: str, parameters: Mapping[str, str]) -> Optional[str]:
        if kind == "volume":
            return VOLUME_PREFIX + object_uuid(self.runtime.driver_name, name)
        return SNAPSHOT_PREFIX + object_uuid(self.runtime.driver_name, "snapshot/" + name)

    def find_by_name(self, name: str, secrets: Mapping[str, str]) -> Optional[Volume]:
        o = self._find(VOLUME_PREFIX + object_uuid(self.runtime.driver_name, name), VOLUME_PREFIX)
        return self._volume(o) if o is not None else None

    # ---- controller -------------------------------------------------------------------------------------------
    def create_volume(self, spec: CreateVolumeSpec) -> Volume:
        local_id = VOLUME_PREFIX + object_uuid(self.runtime.driver_name, spec.name)
        o = self._find(local_id, VOLUME_PREFIX)
        if o is None or o.pending:
            maximum = self.store.capacity()[1]
            if spec.size_bytes > maximum:
                raise OutOfRange(f"{spec.size_bytes} bytes is more than the largest volume the backing store can "
                                 f"hold ({maximum} bytes)")
            src_id = None
            if spec.source is not None:
                prefix = SNAPSHOT_PREFIX if spec.source.kind == "snapshot" else VOLUME_PREFIX
                src = self._find(spec.source.local_id, prefix)
                if src is None:
                    raise NotFound(f"source {spec.source.kind} {self.name}:{spec.source.local_id} does not exist")
                if spec.size_bytes < src.size:
                    raise OutOfRange(f"requested {spec.size_bytes} bytes is smaller than the source "
                                     f"{spec.source.kind} ({src.size} bytes)")
                if spec.limit_bytes and src.size > spec.limit_bytes:
                    raise OutOfRange(f"the source {spec.source.kind} ({src.size} bytes) exceeds limit_bytes")
                src_id = src.local_id
            meta = {"kind": "volume", "name": spec.name, "ctime": now(),
                    **{"p." + k: v for k, v in spec.parameters.items()}}
            if spec.source is not None:
                meta["source"] = f"{spec.source.kind}:{spec.source.local_id}"
            o = self.store.create(local_id, spec.size_bytes, meta, source=src_id)
        self._export(o)  # exported with no ACL: nobody gets in before ControllerPublish
        return self._volume(o)

    def delete_volume(self, local_id: str, secrets: Mapping[str, str]) -> None:
        if not local_id.startswith(VOLUME_PREFIX):
            return
        iqn = self.iqn(local_id)
        st = self.driver.state(iqn)
        if st is not None and st.sessions and not self.options.forceDelete:
            raise InUse(f"volume {self.name}:{local_id} is still in use: initiator(s) {', '.join(st.sessions)} are "
                        "logged in to its target; unpublish it first (or set forceDelete)")
        self.driver.remove_target(iqn)
        if self.store.find(local_id) is not None:
            self.store.delete(local_id)

    def get_volume(self, local_id: str, secrets: Mapping[str, str]) -> Volume:
        o = self._find(local_id, VOLUME_PREFIX)
        if o is None:
            raise NotFound(f"volume {self.name}:{local_id} does not exist")
        return self._volume(o)

    def list_volumes(self, secrets: Mapping[str, str]) -> Iterable[Volume]:
        return [self._volume(o) for o in self.store.list(VOLUME_PREFIX) if o.meta.get("kind") == "volume"]

    def get_capacity(self, parameters: Mapping[str, str], segments: Optional[Mapping[str, str]]) -> Capacity:
        avail, maximum = self.store.capacity()
        return Capacity(available_bytes=avail, maximum_volume_size=maximum)

    def expand_volume(self, local_id: str, size_bytes: int, secrets: Mapping[str, str]) -> tuple[int, bool]:
        o = self._find(local_id, VOLUME_PREFIX)
        if o is None:
            raise NotFound(f"volume {self.name}:{local_id} does not exist")
        if o.size >= size_bytes:
            return o.size, True
        iqn = self.iqn(local_id)
        if not self.features().online_expand:
            st = self.driver.state(iqn)
            if st is not None and (st.acls or st.sessions):
                raise FailedPrecondition(f"volume {self.name}:{local_id} is published; LIO file-backed volumes "
                                         "grow only while unpublished")
        new = self.store.resize(local_id, size_bytes)
        if self.driver.state(iqn) is not None:
            self.driver.refresh_size(iqn, self.store.export_path(local_id), new)
        return new, True

    # ---- snapshots --------------------------------------------------------------------------------------------
    def create_snapshot(self, source_local_id: str, name: str, parameters: Mapping[str, str],
                        secrets: Mapping[str, str]) -> Snapshot:
        if parameters:
            raise InvalidArgument(f"the iscsi backend takes no snapshot parameters; got {', '.join(sorted(parameters))}")
        local_id = SNAPSHOT_PREFIX + object_uuid(self.runtime.driver_name, "snapshot/" + name)
        o = self._find(local_id, SNAPSHOT_PREFIX)
        if o is not None and not o.pending:
            return self._snapshot(o)
        if self._find(source_local_id, VOLUME_PREFIX) is None:
            raise NotFound(f"volume {self.name}:{source_local_id} does not exist")
        if o is not None:
            self.store.delete(local_id)
        o = self.store.snapshot(source_local_id, local_id,
                                {"kind": "snapshot", "name": name, "of": source_local_id, "ctime": now()})
        return self._snapshot(o)

    def delete_snapshot(self, local_id: str, secrets: Mapping[str, str]) -> None:
        if self._find(local_id, SNAPSHOT_PREFIX) is not None:
            self.store.delete(local_id)

    def get_snapshot(self, local_id: str, secrets: Mapping[str, str]) -> Snapshot:
        o = self._find(local_id, SNAPSHOT_PREFIX)
        if o is None:
            raise NotFound(f"snapshot {self.name}:{local_id} does not exist")
        return self._snapshot(o)

    def list_snapshots(self, secrets: Mapping[str, str]) -> Iterable[Snapshot]:
        return [self._snapshot(o) for o in self.store.list(SNAPSHOT_PREFIX) if o.meta.get("kind") == "snapshot"]

    # ---- publish ----------------------------------------------------------------------------------------------
    def _chap_key(self, create: bool = True) -> bytes:
        path = self.options.chapKeyFile or os.path.join(self.runtime.state_dir, f"iscsi-{self.name}.key")
        with self._lock:
            try:
                with open(path, "rb") as f:
                    key = f.read()
            except FileNotFoundError:
                if not create:
                    raise FailedPrecondition(
                        f"iscsi backend {self.name!r}: this node has no CHAP key file {path}. With FlexVolume the "
                        "nodes derive each volume's CHAP secret themselves (attach's answer is stored in the Node "
                        "object, readable by many, so it never carries the secret): give every node the "
                        "controller's chapKeyFile, or set chap: false") from None
                os.makedirs(os.path.dirname(path), exist_ok=True)
                key = _secrets.token_bytes(32)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(key)
                    os.fsync(f.fileno())
        if len(key) < 16:
            raise FailedPrecondition(f"CHAP key file {path} holds fewer than 16 bytes")
        if b"REPLACE-WITH" in key:  # the example Secret's placeholder: a publicly known key would make CHAP moot
            raise FailedPrecondition(f"CHAP key file {path} still holds the example placeholder; put 32 random "
                                     "bytes there (e.g. head -c 32 /dev/urandom | base64)")
        return key

    def secret_publish_keys(self) -> frozenset[str]:
        return frozenset({"chapUser", "chapPassword"})

    def node_publish_secrets(self, local_id: str) -> dict[str, str]:
        if not self.options.chap:
            return {}
        chap = self.chap_for(local_id, create_key=False)
        return {"chapUser": chap.user, "chapPassword": chap.password}

    def chap_for(self, local_id: str, create_key: bool = True) -> Chap:
        """The volume's CHAP credentials (deterministic: a retried publish returns the same ones)."""
        digest = hmac.new(self._chap_key(create_key), b"tessera-iscsi-chap/" + local_id.encode(),
                          hashlib.sha256).digest()
        password = base64.b32encode(digest[:15]).decode().lower()  # 24 chars, fits every initiator's 12..16+ rule
        return Chap(user=local_id, password=password)

    def controller_publish(self, local_id: str, node: Any, readonly: bool, capability: Any,
                           context: Mapping[str, str], secrets: Mapping[str, str]) -> dict[str, str]:
        o = self._find(local_id, VOLUME_PREFIX)
        if o is None:
            raise NotFound(f"volume {self.name}:{local_id} does not exist")
        initiator = (node.attributes or {}).get("iqn", "")
        if not initiator:
            # a node whose plugin reported no IQN cannot be one of ours: NOT_FOUND, with the likely cause
            raise NotFound(f"node {node.name} does not exist as an iSCSI node: its node ID carries no initiator IQN; "
                           "run the node plugin with the iscsi backend configured (it adds ?iqn=... to the node ID)")
        if not _IQN_RE.match(initiator):
            raise InvalidArgument(f"node {node.name}: {initiator!r} is not an iSCSI initiator name")
        self._check_publish(o, node.name, initiator, readonly, capability, node.encode())
        self._export(o)  # re-creates the export after a tgtd restart / target host reboot
        chap = self.chap_for(local_id) if self.options.chap else None
        lun = self.driver.add_acl(self.iqn(local_id), initiator, chap, readonly=readonly)
        pc = {"lun": str(lun)}
        if readonly:
            pc["readonly"] = "true"
        if chap is not None:
            pc.update({"chapUser": chap.user, "chapPassword": chap.password})
        return pc

    def controller_unpublish(self, local_id: str, node: Any, secrets: Mapping[str, str]) -> None:
        if not local_id.startswith(VOLUME_PREFIX):
            return
        initiator = None if node is None else (node.attributes or {}).get("iqn")
        if node is not None and not initiator:
            return  # such a node can never have been granted access
        self.driver.remove_acl(self.iqn(local_id), initiator)
        # the record goes after the ACL: a crash in between leaves a record the retried unpublish removes
        o = self._find(local_id, VOLUME_PREFIX)
        if o is not None:
            drop = {k: None for k in _publications(o.meta) if initiator is None or k == _pub_key(initiator)}
            if drop:
                self.store.update_meta(local_id, drop)

    def _check_publish(self, o: Obj, node_name: str, initiator: str, readonly: bool, capability: Any,
                       node_id: str = "") -> None:
        """Refuse what the spec and the data refuse (backends/publications.py; a holder is named with its initiator
        and whether it is logged in now), then record this publication on the volume (in the storage, before the
        ACL exists, so a crash leaves a record the retry finds compatible)."""
        mode, atype = capability.access_mode, capability.access_type
        mine = _pub_key(initiator)
        want = Publication("ro" if readonly else "rw", mode, atype, node_name, initiator, node_id)
        pubs = {key: Publication.parse(raw) for key, raw in _publications(o.meta).items()}
        others = [p for key, p in pubs.items() if key != mine]
        live: set[str] = set()
        if others:
            st = self.driver.state(self.iqn(o.local_id))
            live = set(st.sessions) if st else set()

        def holder(p: Any) -> str:
            return f"node {p.node} (initiator {p.initiator}{', logged in now' if p.initiator in live else ''})"
        check_beside(f"{self.name}:{o.local_id}", node_name, want, pubs.get(mine), others, holder)
        if o.meta.get(mine) != want.encode():
            self.store.update_meta(o.local_id, {mine: want.encode()})

    def node_attributes_for_name(self, node_name: str) -> dict[str, str]:
        """What a FlexVolume attach publishes to: kube-controller-manager calls it with the node name alone (no node
        ID carrying the IQN, as CSI has), so the IQN comes from `initiatorNameTemplate`, a convention the operator
        keeps on every node. The shim's node side (waitforattach, mountdevice) checks the node's real IQN against
        it before any login. Without a template there is no way to know the IQN: FailedPrecondition."""
        tpl = self.options.initiatorNameTemplate
        if not tpl:
            raise FailedPrecondition(
                f"cannot attach to node {node_name}: the iscsi backend {self.name!r} grants access per initiator IQN, "
                "and a FlexVolume attach (run by kube-controller-manager) names only the node; set "
                "initiatorNameTemplate in the backend's config (e.g. \"iqn.2026-01.com.example:{node}\") and give "
                "every node that InitiatorName in /etc/iscsi/initiatorname.iscsi (then restart iscsid)")
        iqn = tpl.format(node=node_name)
        if not _IQN_RE.match(iqn) or len(iqn.encode()) > 223:
            raise InvalidArgument(f"initiatorNameTemplate of backend {self.name!r} gives {iqn!r} for node "
                                  f"{node_name}, which is not a valid iSCSI initiator name (at most 223 bytes)")
        return {"iqn": iqn}

    def node_attribute_remedy(self, key: str, want: str) -> str:
        if key == "iqn":
            return (f"set InitiatorName={want} in /etc/iscsi/initiatorname.iscsi and restart iscsid (and drop the "
                    "backend's initiatorName setting if it differs)")
        return super().node_attribute_remedy(key, want)

    # ---- node -------------------------------------------------------------------------------------------------
    def node_attributes(self) -> dict[str, str]:
        return {"iqn": self.initiator_name()}

    def initiator_name(self) -> str:
        if self.options.initiatorName:
            return self.options.initiatorName
        try:
            with open("/etc/iscsi/initiatorname.iscsi") as f:
                for line in f:
                    key, sep, value = line.strip().partition("=")
                    if sep and key.strip() == "InitiatorName" and value.strip():
                        return value.strip()
        except FileNotFoundError:
            pass
        raise BackendUnavailable("no iSCSI initiator name: install open-iscsi (/etc/iscsi/initiatorname.iscsi) "
                                 "or set initiatorName in the iscsi backend config")

    def _os_brick(self) -> Any:
        with self._lock:
            if self._connector is None:
                from .iscsi_node import make_connector
                self._connector = make_connector(self.runtime.state_dir, self.options.multipath)
        return self._connector

    def _properties(self, local_id: str, context: Mapping[str, str], lun: int) -> dict[str, Any]:
        portals = [p for p in context.get("targetPortals", "").split(",") if p] or [str(p) for p in self.portals]
        iqn = context.get("targetIqn") or self.iqn(local_id)
        self._check_target(local_id, iqn, portals)
        return {"target_portal": portals[0], "target_iqn": iqn, "target_lun": lun,
                "target_portals": portals, "target_iqns": [iqn] * len(portals), "target_luns": [lun] * len(portals),
                "volume_id": local_id, "discard": True}

    def _check_target(self, local_id: str, iqn: str, portals: list[str]) -> None:
        """What a node logs in to comes from the volume context, which a static PV writes: the IQN must be an IQN
        under this backend's prefix, and every portal host:port one this backend is configured with, so a PV can
        neither reach another target nor make the node log in to (and mount a disk from) an arbitrary host."""
        if not _IQN_RE.match(iqn) or len(iqn.encode()) > 223:
            raise InvalidArgument(f"volume {self.name}:{local_id}: targetIqn {iqn!r} is not an iSCSI name "
                                  "(iqn.YYYY-MM.reverse.domain:name, at most 223 bytes)")
        if not iqn.startswith(self.options.iqnPrefix + ":"):
            raise InvalidArgument(f"volume {self.name}:{local_id}: targetIqn {iqn!r} is not under this backend's "
                                  f"iqnPrefix {self.options.iqnPrefix!r}")
        known = {(p.host, p.port) for p in self.portals}
        for text in portals:
            try:
                portal = parse_portal(text)
            except ValueError as e:
                raise InvalidArgument(f"volume {self.name}:{local_id}: targetPortals: {e}") from None
            if not 0 < portal.port < 65536 or not _HOST_RE.match(portal.host):
                raise InvalidArgument(f"volume {self.name}:{local_id}: portal {text!r} is not host:port")
            if (portal.host, portal.port) not in known:
                raise InvalidArgument(f"volume {self.name}:{local_id}: portal {text!r} is not one of backend "
                                      f"{self.name!r}'s portals ({', '.join(str(p) for p in self.portals)})")

    @staticmethod
    def _lun(local_id: str, raw: str) -> int:
        if not raw.isdigit() or int(raw) > MAX_LUN:
            raise InvalidArgument(f"volume {local_id}: LUN {raw!r} is not a number in 0-{MAX_LUN}")
        return int(raw)

    def node_attach(self, local_id: str, context: Mapping[str, str], publish_context: Mapping[str, str],
                    secrets: Mapping[str, str], *, readonly: bool = False,
                    multi_writer: bool = False) -> Attachment:
        """Log in and return the SCSI disk. `readonly`: the controller mapped the LUN write-protected for this
        initiator (LIO) or gave a read-only LU (tgt); the disk is also set read-only here (BLKROSET), so nothing on
        this node writes even where the target would let it. Other writers are the controller's concern: it sees
        the sessions and refuses a second read-write publish."""
        lun = self._lun(local_id, str(publish_context.get("lun") or context.get("lun") or self.lun))
        # published read-only (a PV with readOnly: true): the LUN refuses writes, so the stage is read-only too
        readonly = readonly or publish_context.get("readonly") == "true"
        props = self._properties(local_id, context, lun)
        auth = dict(props)
        if publish_context.get("chapUser"):
            auth.update({"auth_method": "CHAP", "auth_username": publish_context["chapUser"],
                         "auth_password": publish_context.get("chapPassword", "")})
        t0 = time.monotonic()
        try:
            info = self._os_brick().connect_volume(auth)
        except TesseraError:
            raise
        except Exception as e:  # os-brick raises its own types; never echo the properties (they hold the secret)
            raise BackendUnavailable(f"iSCSI login to {props['target_iqn']} failed: {type(e).__name__}: "
                                     f"{_scrub(str(e), auth)}") from None
        log.info("iscsi attach %s: %s in %.2fs", local_id, info.get("path"), time.monotonic() - t0)
        if readonly:
            from .iscsi_node import set_read_only
            set_read_only(info["path"])
        # the stage record keeps what detach needs; no credentials (logout needs none)
        return Attachment(device=info["path"], data={"properties": props, "readonly": readonly, "device_info": {
            k: v for k, v in info.items() if isinstance(v, (str, int, bool))}})

    def node_detach(self, local_id: str, attachment: Attachment) -> None:
        props = attachment.data.get("properties") or self._properties(local_id, {}, self.lun)
        info = attachment.data.get("device_info") or {"path": attachment.device}
        try:
            self._os_brick().disconnect_volume(props, info)
        except Exception as e:
            raise BackendUnavailable(f"iSCSI detach of {props.get('target_iqn')} failed: {type(e).__name__}: {e}") from None

    def node_refresh_size(self, local_id: str, attachment: Attachment) -> None:
        props = attachment.data.get("properties") or self._properties(local_id, {}, self.lun)
        if not self.options.multipath:
            # one path: ask the SCSI disk to re-read its capacity (what `iscsiadm -m session --rescan` does per
            # device); os-brick's extend_volume would need lsscsi and only adds multipath handling
            name = os.path.basename(os.path.realpath(attachment.device))
            try:
                with open(f"/sys/class/block/{name}/device/rescan", "w") as f:
                    f.write("1")
            except OSError as e:
                raise BackendUnavailable(f"rescanning {attachment.device} for {props.get('target_iqn')} failed: {e}") from None
            return
        try:
            self._os_brick().extend_volume(props)
        except Exception as e:
            raise BackendUnavailable(f"iSCSI rescan of {props.get('target_iqn')} failed: {type(e).__name__}: {e}") from None

    def node_attachment_valid(self, local_id: str, attachment: Attachment,
                              context: Mapping[str, str]) -> Optional[bool]:
        """The recorded disk's number is a SCSI disk on a session to this volume's target IQN (its context, else
        the IQN its ID gives), at the LUN it was attached with; a multipath node when every path is
        (backends/node_proof.py). After a logout the disk is gone; a disk name reused by another login is not it."""
        from . import node_proof
        iqn = context.get("targetIqn") or self.iqn(local_id)
        lun = (attachment.data.get("properties") or {}).get("target_lun")
        if not _IQN_RE.match(iqn):
            return False
        if not isinstance(lun, int):
            return None  # a record without the LUN it was attached with: nothing to compare
        rdev = node_proof.device_rdev(attachment.device)
        return rdev is not None and node_proof.scsi_is(rdev, iqn, lun)


_PUB_PREFIX = "pub."


def _pub_key(initiator: str) -> str:
    """The metadata key of one initiator's publication (hashed: IQNs are long and carry ':')."""
    return _PUB_PREFIX + hashlib.sha256(initiator.encode()).hexdigest()[:16]


def _publications(meta: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in meta.items() if k.startswith(_PUB_PREFIX)}


@dataclass(frozen=True)
class Publication:
    """One ControllerPublishVolume in force, as stored on the volume: `rw|ro/MODE/TYPE/node/initiator/node-id`.
    The CSI node ID (as ControllerPublish received it, re-encoded: csi.ids.NodeRef) is what ControllerGetVolume and
    ListVolumes answer in `published_node_ids`; the record names it only when the node and initiator do not. None of the fields
    holds a '/' (node names, IQNs and the URL-encoded node ID cannot), so the split is exact."""
    access: str
    mode: str
    access_type: str
    node: str
    initiator: str
    node_id: str = ""

    def encode(self) -> str:
        """The node ID is stored only when it is not the usual `<node>?iqn=<initiator>` (a node reporting more
        attributes): the record stays short enough for an LVM tag, and records stay as they were."""
        fields = (self.access, self.mode, self.access_type, self.node, self.initiator)
        keep = self.node_id and self.node_id != self._usual_node_id()
        return "/".join(fields + ((self.node_id,) if keep else ()))

    @classmethod
    def parse(cls, raw: str) -> "Publication":
        parts = raw.split("/", 5)
        parts += [""] * (6 - len(parts))
        return cls(*parts)

    def csi_node_id(self) -> str:
        """The node ID this publication was made for. A record written before node IDs were kept gives the form
        an iSCSI node plugin reports (`<node>?iqn=<initiator>`, csi.ids.NodeRef)."""
        return self.node_id or self._usual_node_id()

    def _usual_node_id(self) -> str:
        return self.node + "?" + urllib.parse.urlencode([("iqn", self.initiator)])

    def describe(self) -> str:
        return describe(self)


def _scrub(text: str, props: Mapping[str, Any]) -> str:
    pw = props.get("auth_password")
    return text.replace(pw, "***") if pw else text


BACKEND = IscsiBackend
