"""Ceph RBD backend: volumes are RBD images, managed through librbd/librados (python3-rbd, python3-rados).

Layout (all in the volume's pool):
    tessera-vol-<uuid>    a volume; <uuid> = object_uuid(driver, request name)
    tessera-snap-<uuid>   a CSI snapshot, *its own image*: a clone of a short-lived RBD snapshot of the source
                          volume; <uuid> = object_uuid(driver, "snapshot/" + request name)

Why snapshots are images: a plain RBD snapshot pins its image, so DeleteVolume of a volume with snapshots would
fail or leave the volume behind. As a clone (clone v2, which the cluster allows from `min compat client mimic` on),
the snapshot image only depends on the source through a snapshot in the RBD trash namespace. Deleting a source with
dependants moves it to the RBD trash (its name is free at once, its dependants keep reading through it) and a
background job flattens the dependants and then purges it: DeleteVolume never waits on a full copy. Deleting a
snapshot does the same for the volumes restored from it. Clones and restores are clones too. A chain deeper than
`cloneDepthLimit` (soft) is flattened in the background (a snapshot reports ready_to_use=false until then); a
create whose chain would pass `cloneDepthHardLimit` answers ABORTED while its source is flattened
(`backends/rbd_flatten.py`). On clusters that allow only clone v1 (require-min-compat-client below mimic, the
default of many upgraded clusters) clones are v1: the parent keeps a protected snapshot named after each child until
the child is flattened, deleted or purged.

Concurrency across controller replicas: every create, clone, snapshot, delete and expand holds RADOS lease locks on
the images it touches (`backends/rbd_locks.py`); the loser of a race gets ABORTED naming the holder.

Idempotency and crash safety: names are deterministic; the request name, parameters and source are stored as the
image's records (`tessera.*` on its id object, backends/rbd_records.py), all keys in one atomic write once the image
is complete: the commit point. An image without `tessera.name` is an unfinished create that nothing has seen: a
retry removes and redoes it, and listings ignore it. The short-lived RBD
snapshot used for a clone is named after the new image, so a retry finds and reuses or removes it.

Connections: one long-lived rados.Rados per (cluster, user, key), shared by all RPCs (librbd releases the GIL, so
calls from the gRPC thread pool run in parallel), dropped and re-made after a timeout or a shut-down connection.
Every librados wait is bounded by `connectTimeout`/`opTimeout`, so a dead cluster yields UNAVAILABLE or
DEADLINE_EXCEEDED instead of a hung RPC. Keys arrive from the config (keyring path or key) or per StorageClass
through CSI secrets `userID`/`userKey`; they are handed to librados in memory and never logged.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Optional

from pydantic import Field, model_validator

from .base import (Attachment, Backend, BackendOptions, Capacity, ContentSource, CreateVolumeSpec, Features,
                   Orphan, SINGLE_NODE_MODES, Snapshot, Usage, Volume, object_uuid)
from .errors import (Aborted, AlreadyExists, BackendUnavailable, CapacityExceeded, DeadlineExceeded, FailedPrecondition,
                     Internal, InUse, InvalidArgument, NotFound, OutOfRange, PermissionDenied, TesseraError)
from .locking import Claim, LockProvider, Operation
from .rbd_flatten import RETRY, BackgroundJobs
from . import io_limits, rbd_publish, rbd_records
from .rbd_qos import QOS_PARAMETERS, context_note, from_metadata, metadata_key
from .rbd_locks import LeaseLocks, RadosLockProvider
from .errors import listing, shown
from .util import CommandError, run

log = logging.getLogger(__name__)

VOL_PREFIX = "tessera-vol-"
SNAP_PREFIX = "tessera-snap-"
# How long NodeStage waits for the watchers of an image to go before it calls them a writer elsewhere (seconds).
WATCHER_PATIENCE = 5.0
# How often a clone takes a fresh helper snapshot when librbd cannot open what the previous one depends on (see
# RbdBackend._clone); about 3 s in all, well inside a CO's RPC timeout.
CLONE_ATTEMPTS = 3
# How long a clone waits for this process's own background flatten of its source before going ahead (seconds).
FLATTEN_WAIT = 5.0
META = "tessera."
# librbd's image feature bits (include/rbd/features.h; a unit test checks them against the rbd module). Kept here so
# validating a config or a StorageClass does not load librbd: a controller that has served no RBD request yet
# stays ~13 MiB smaller.
FEATURE_BITS = {"layering": 1 << 0, "exclusive-lock": 1 << 2, "object-map": 1 << 3, "fast-diff": 1 << 4,
                "deep-flatten": 1 << 5}
FEATURE_NAMES = tuple(FEATURE_BITS)
FEATURE_NEEDS = {"object-map": "exclusive-lock", "fast-diff": "object-map"}
MOUNTERS = ("krbd", "nbd", "fuse")
PARAMS = ("pool", "dataPool", "imageFeatures", "mounter", "stripeUnit", "stripeCount")
POOL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
IMAGE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")  # a safe subset of Ceph's (no '/', '@', spaces)
# Ceph releases in order, for require-min-compat-client: clone v2 (what snapshots and clones here are) needs mimic.
RELEASES = ("argonaut", "bobtail", "cuttlefish", "dumpling", "emperor", "firefly", "giant", "hammer", "infernalis",
            "jewel", "kraken", "luminous", "mimic", "nautilus", "octopus", "pacific", "quincy", "reef", "squid",
            "tentacle")
CLONE_V2_FIX = "ceph osd set-require-min-compat-client mimic"
SECRET_USER = "userID"
SECRET_KEY = "userKey"
# librbd refuses an object map over 256,000,000 objects (cls_rbd's MAX_OBJECT_MAP_OBJECT_COUNT); Tessera creates
# images with the cluster's default object size, 4 MiB (rbd_default_order 22).
OBJECT_MAP_MAX_OBJECTS = 256_000_000
DEFAULT_OBJECT_BYTES = 4 << 20


class RbdOptions(BackendOptions):
    """Config of one RBD backend (`backends.<name>` with `type: rbd`)."""
    monitors: list[str] = Field(default_factory=list, description="mon addresses host:port; or give cephConf")
    cephConf: Optional[str] = Field(None, description="path of a ceph.conf naming the monitors (alternative)")
    user: str = Field("admin", description="ceph user without 'client.' (least privilege: see the README)")
    keyringPath: Optional[str] = Field(None, description="keyring file holding the user's key")
    key: Optional[str] = Field(None, description="the user's cephx key inline (prefer keyringPath or secrets)",
                               repr=False)
    pool: str = Field(description="default pool for volumes (StorageClass parameter `pool` overrides)")
    extraPools: list[str] = Field(default_factory=list, description="more pools scanned by ListVolumes/Snapshots")
    dataPool: Optional[str] = Field(None, description="erasure-coded data pool for image data")
    imageFeatures: list[str] = Field(default_factory=lambda: list(FEATURE_NAMES))
    stripeUnit: Optional[int] = Field(None, gt=0)
    stripeCount: Optional[int] = Field(None, gt=0)
    mounter: Literal["krbd", "nbd", "fuse"] = "krbd"
    cloneDepthLimit: int = Field(4, ge=1, le=16, description="soft limit: a clone or snapshot whose parent chain is "
                                 "deeper is flattened in the background")
    cloneDepthHardLimit: int = Field(8, ge=1, le=32, description="hard limit: a create whose chain would be deeper "
                                     "answers ABORTED while its source is flattened in the background")
    flattenPolicy: Literal["depth", "always"] = "depth"
    lockLease: int = Field(30, ge=1, le=600, description="seconds an operation lock outlives a crashed controller "
                           "replica (live holders renew it every third of this)")
    connectTimeout: float = Field(10.0, gt=0, description="seconds to reach a mon before UNAVAILABLE")
    opTimeout: float = Field(30.0, gt=0, description="seconds for one mon/OSD operation before DEADLINE_EXCEEDED")
    logFile: str = Field("", description="librados/librbd log file; empty: no file logging")

    @model_validator(mode="after")
    def _check(self) -> "RbdOptions":
        if not self.monitors and not self.cephConf:
            raise ValueError("one of monitors or cephConf is required")
        if self.keyringPath and self.key:
            raise ValueError("give keyringPath or key, not both")
        for p in [self.pool, *self.extraPools] + ([self.dataPool] if self.dataPool else []):
            if not POOL_RE.match(p):
                raise ValueError(f"pool name {p!r}: letters, digits, '_' and '-' only")
        _feature_bits(self.imageFeatures, ValueError)
        if self.cloneDepthHardLimit < self.cloneDepthLimit:
            raise ValueError(f"cloneDepthHardLimit ({self.cloneDepthHardLimit}) must not be below cloneDepthLimit "
                             f"({self.cloneDepthLimit})")
        return self


def _feature_bits(names: Iterable[str], exc: type[Exception] = InvalidArgument) -> int:
    names = [n.strip() for n in names if n.strip()]
    value = 0
    for n in names:
        if n not in FEATURE_BITS:
            raise exc(f"unknown image feature {shown(n, 64)}; known: {', '.join(FEATURE_NAMES)}")
        if n in FEATURE_NEEDS and FEATURE_NEEDS[n] not in names:
            raise exc(f"image feature {n!r} needs {FEATURE_NEEDS[n]!r}")
        value |= FEATURE_BITS[n]
    if "layering" not in names:
        raise exc("image feature 'layering' is required (snapshots and clones are RBD clones)")
    return value


class _Conn:
    """One connected cluster handle plus its open pool contexts."""

    def __init__(self, rados_obj: Any, user: str) -> None:
        self.rados = rados_obj
        self.user = user
        self.ioctxs: dict[str, Any] = {}
        self.lock = threading.Lock()
        self.clone_v2: Optional[bool] = None  # learnt on first clone; a refusal is re-checked after a minute
        self.clone_v2_checked = 0.0
        self.min_compat = ""
        self.resumed = False
        # pool -> (rbd_directory's version, size and mtime; sorted image names): see RbdBackend._image_names
        self.listings: dict[str, tuple[tuple[int, int, Any], list[str]]] = {}

    def ioctx(self, pool: str) -> Any:
        import rados
        with self.lock:
            io = self.ioctxs.get(pool)
            if io is None:
                try:
                    io = self.rados.open_ioctx(pool)
                except rados.ObjectNotFound:
                    raise NotFound(f"ceph pool {pool!r} does not exist") from None
                self.ioctxs[pool] = io
            return io

    def close(self) -> None:
        for io in self.ioctxs.values():
            with contextlib.suppress(Exception):
                io.close()
        with contextlib.suppress(Exception):
            self.rados.shutdown()


class RbdBackend(Backend):
    type_name = "rbd"
    options_model = RbdOptions
    options: RbdOptions

    def __init__(self, name, options, runtime) -> None:
        super().__init__(name, options, runtime)
        self._conns: dict[tuple[str, str, str], _Conn] = {}
        self._conns_lock = threading.Lock()
        self._leases = LeaseLocks(name, self.options.lockLease)
        self._jobs = BackgroundJobs(name)
        self._used_pools: dict[str, None] = dict.fromkeys([self.options.pool, *self.options.extraPools])
        self._provider: Optional[RadosLockProvider] = None
        self._flattening: set[tuple[str, str]] = set()  # (pool, image) a background job has open right now

    # ---- facts --------------------------------------------------------------------------------------------
    def features(self) -> Features:
        return Features(snapshots=True, clones=True, expand=True, online_expand=True, list_volumes=True,
                        capacity=True, block=True, volume_condition=True, controller_publish=True,
                        published_nodes=True,
                        access_modes=SINGLE_NODE_MODES | frozenset({"MULTI_NODE_READER_ONLY"}),
                        group_snapshots=True)

    def validate_parameters(self, parameters: Mapping[str, str]) -> None:
        unknown = sorted(set(parameters) - set(PARAMS))
        if unknown:
            raise InvalidArgument(f"unknown rbd StorageClass parameter(s) {listing(unknown)}; "
                                  f"known: {', '.join(PARAMS)}")
        for key in ("pool", "dataPool"):
            if key in parameters and not POOL_RE.match(parameters[key]):
                raise InvalidArgument(f"parameter {key}={shown(parameters[key], 80)} is not a valid pool name")
        if "imageFeatures" in parameters:
            _feature_bits(parameters["imageFeatures"].split(","))
        if "mounter" in parameters and parameters["mounter"] not in MOUNTERS:
            raise InvalidArgument(f"parameter mounter must be one of {', '.join(MOUNTERS)}")
        for key in ("stripeUnit", "stripeCount"):
            if key in parameters and not (parameters[key].isdigit() and int(parameters[key]) > 0):
                raise InvalidArgument(f"parameter {key} must be a positive integer")

    def allocation_unit(self) -> int:
        return 1 << 20

    def max_volume_bytes(self, parameters: Mapping[str, str] = {}) -> Optional[int]:
        """With the object-map feature an image holds at most 256,000,000 objects (976 TiB at 4 MiB); without it,
        librbd's sizes are 64-bit and the CSI int64 range is the limit."""
        names = parameters["imageFeatures"].split(",") if "imageFeatures" in parameters else self.options.imageFeatures
        if "object-map" in (n.strip() for n in names):
            return OBJECT_MAP_MAX_OBJECTS * DEFAULT_OBJECT_BYTES
        return None

    # ---- connections --------------------------------------------------------------------------------------
    def _credentials(self, secrets: Mapping[str, str]) -> tuple[str, Optional[str]]:
        """(user, key) from CSI secrets when given, else (configured user, configured inline key or None)."""
        user = secrets.get(SECRET_USER) if secrets else None
        key = secrets.get(SECRET_KEY) if secrets else None
        if user or key:
            if not (user and key):
                raise InvalidArgument(f"CSI secrets must hold both {SECRET_USER} and {SECRET_KEY}")
            return user.removeprefix("client."), key
        return self.options.user, self.options.key

    def _cluster_id(self) -> str:
        return ",".join(self.options.monitors) if self.options.monitors else f"conf:{self.options.cephConf}"

    def _conn(self, secrets: Mapping[str, str], clone_format: int = 2) -> _Conn:
        """The shared connection for these credentials. Clones are made with an explicit format, never librbd's
        "auto" (whose failed v1 attempt on an unprotected snapshot has crashed the process on pacific): the
        connection for format 1 is a second one, used only for clones on clusters that allow no v2."""
        import rados
        user, key = self._credentials(secrets)
        fingerprint = hashlib.sha256((key or "").encode()).hexdigest()[:16]
        ckey = (self._cluster_id(), user, fingerprint + ("" if clone_format == 2 else f"/clone{clone_format}"))
        with self._conns_lock:
            conn = self._conns.get(ckey)
            if conn is not None and conn.rados.state == "connected":
                return conn
            if conn is not None:
                self._conns.pop(ckey, None)
        o = self.options
        conf = {"client_mount_timeout": str(int(max(1, o.connectTimeout))),
                "rados_mon_op_timeout": str(int(max(1, o.opTimeout))),
                "rados_osd_op_timeout": str(int(max(1, o.opTimeout))),
                "log_to_stderr": "false", "err_to_stderr": "false", "log_file": o.logFile,
                "rbd_default_clone_format": str(clone_format)}
        if o.monitors:
            conf["mon_host"] = ",".join(o.monitors)
        if key:
            conf["key"] = key
        elif o.keyringPath:
            conf["keyring"] = o.keyringPath
        try:
            r = rados.Rados(rados_id=user, conffile=o.cephConf or rados.Rados.NO_CONF_FILE, conf=conf)
        except rados.Error as e:
            raise InvalidArgument(f"rbd backend {self.name!r}: bad ceph client settings: {e}") from None
        try:
            r.connect(timeout=int(max(1, o.connectTimeout)))
        except (rados.PermissionDeniedError, rados.PermissionError):
            with contextlib.suppress(Exception):
                r.shutdown()
            raise PermissionDenied(f"ceph refused user client.{user} of backend {self.name!r} "
                                   f"({self._cluster_id()}): wrong key or no such user") from None
        except (rados.TimedOut, rados.InterruptedOrTimeoutError, rados.ObjectNotFound) as e:
            with contextlib.suppress(Exception):
                r.shutdown()
            raise BackendUnavailable(f"cannot reach the ceph monitors of backend {self.name!r} "
                                     f"({self._cluster_id()}) within {o.connectTimeout:.0f}s: {e}") from None
        except rados.Error as e:
            with contextlib.suppress(Exception):
                r.shutdown()
            raise BackendUnavailable(f"cannot connect to ceph for backend {self.name!r} ({self._cluster_id()}) "
                                     f"as client.{user}: {e}") from None
        conn = _Conn(r, user)
        with self._conns_lock:
            old = self._conns.get(ckey)
            if old is not None and old.rados.state == "connected":
                conn.close()
                return old
            self._conns[ckey] = conn
        return conn

    def _drop(self, conn: _Conn) -> None:
        """Forget a connection that timed out; shut it down in the background (shutdown can block)."""
        with self._conns_lock:
            for k, v in list(self._conns.items()):
                if v is conn:
                    del self._conns[k]
        threading.Thread(target=conn.close, daemon=True).start()

    @contextlib.contextmanager
    def _ceph(self, what: str, conn: Optional[_Conn] = None) -> Iterator[None]:
        """Translate librados/librbd exceptions into the driver's typed errors."""
        import rados
        import rbd
        try:
            yield
        except TesseraError:
            raise
        except (rbd.PermissionError, rados.PermissionError, rados.PermissionDeniedError):
            raise PermissionDenied(f"{what}: ceph denied client.{conn.user if conn else self.options.user} "
                                   f"(check its caps, e.g. 'profile rbd pool=...')") from None
        except (rbd.Timeout, rados.TimedOut, rados.InterruptedOrTimeoutError):
            if conn:
                self._drop(conn)
            raise DeadlineExceeded(f"{what}: ceph did not answer within {self.options.opTimeout:.0f}s") from None
        except (rbd.ConnectionShutdown, rados.ConnectionShutdown, rados.NotConnected):
            if conn:
                self._drop(conn)
            raise BackendUnavailable(f"{what}: the connection to ceph was shut down; retry") from None
        except (rbd.NoSpace, rados.NoSpace, rbd.DiskQuotaExceeded):
            raise CapacityExceeded(f"{what}: the ceph pool is full or over quota") from None
        except rbd.ImageBusy:
            raise InUse(f"{what}: the image is in use (still mapped or open on a node)") from None
        except (rbd.Error, rados.Error) as e:
            raise Internal(f"{what}: {type(e).__name__}: {e}") from None

    def probe(self) -> None:
        o = self.options
        if not (o.key or o.keyringPath or o.cephConf):
            return  # credentials come only with each request's secrets: nothing to probe with
        conn = self._conn({})
        with self._ceph("probe", conn):
            conn.ioctx(self.options.pool)

    _MOUNTER_TOOLS = {"krbd": "rbd", "nbd": "rbd-nbd", "fuse": "rbd-fuse"}

    def node_probe(self) -> None:
        """The node maps images with the configured mounter's tool; Ceph itself is the controller's concern."""
        tool = self._MOUNTER_TOOLS[self.options.mounter]
        if shutil.which(tool) is None:
            raise BackendUnavailable(f"rbd backend {self.name!r}: mounter {self.options.mounter} needs {tool!r} on "
                                     "this node (ceph-common / rbd-nbd / rbd-fuse)")

    def close(self) -> None:
        if not self._jobs.close():
            log.warning("rbd backend %s: a background flatten is still running at shutdown; its connection is left "
                        "to the process exit (the flatten resumes through the next request that needs it)", self.name)
            return
        with self._conns_lock:
            conns, self._conns = list(self._conns.values()), {}
        for c in conns:
            c.close()

    # ---- operation locks across replicas, idempotency across pools --------------------------------------
    def _has_own_credentials(self) -> bool:
        o = self.options
        return bool(o.key or o.keyringPath or o.cephConf)

    def operation_lock_provider(self) -> Optional[LockProvider]:
        """RADOS lease locks in the default pool (backends/rbd_locks.py), taken with the configured credentials;
        without any (keys only per StorageClass secret) the locks hold within this process only."""
        if not self._has_own_credentials():
            return None
        if self._provider is None:
            self._provider = RadosLockProvider(self._leases, lambda: self._conn({}).ioctx(self.options.pool),
                                               lambda what: self._ceph(what), self._image_for_name)
        return self._provider

    def claim_controller(self) -> None:
        if not self._has_own_credentials():
            log.warning("rbd backend %s has no configured credentials (keyringPath, key or cephConf): operation "
                        "locks hold within this controller process only, not across replicas", self.name)

    def _image_for_name(self, kind: str, name: str) -> str:
        if kind == "snapshot":
            return SNAP_PREFIX + object_uuid(self.runtime.driver_name, "snapshot/" + name)
        return VOL_PREFIX + object_uuid(self.runtime.driver_name, name)

    def local_id_for_name(self, kind: Literal["volume", "snapshot"], name: str,
                          parameters: Mapping[str, str]) -> Optional[str]:
        # A snapshot lives in its source volume's pool, unknown here; the default pool stands in, which is enough
        # for the cross-replica lock, keyed by image name alone (rbd_locks.object_key).
        pool = parameters.get("pool", self.options.pool) if kind == "volume" else self.options.pool
        return f"{pool}.{self._image_for_name(kind, name)}"

    def _candidate_pools(self, conn: _Conn) -> list[tuple[str, bool]]:
        """(pool, known) for every pool a volume of this backend could live in: the configured ones and those this
        process created in (known), then every other pool of the cluster with the rbd application enabled (a
        StorageClass may name any pool; the pool list and applications come from the client's osdmap, no I/O)."""
        pools = [(p, True) for p in self._used_pools]
        try:
            with self._ceph("list pools", conn):
                for p in conn.rados.list_pools():
                    if p in self._used_pools or not POOL_RE.match(p):
                        continue
                    with contextlib.suppress(Exception):
                        if "rbd" in conn.ioctx(p).application_list():
                            pools.append((p, False))
        except TesseraError as e:
            log.warning("cannot list the pools of the cluster (only configured pools are searched): %s", e)
        return pools

    def find_by_name(self, name: str, secrets: Mapping[str, str]) -> Optional[Volume]:
        """The committed volume of `name` in any pool it could have gone to (`_candidate_pools`): one stat of the
        image's id object per pool. Pools the user may not read are skipped unless configured."""
        return self._find_in_pools(name, secrets, skip=None)

    def find_elsewhere(self, name: str, parameters: Mapping[str, str],
                       secrets: Mapping[str, str]) -> Optional[Volume]:
        """Every candidate pool but the one `parameters` name (the create's fast path meets an image there as
        ImageExists). With one pool in use that is no lookup at all: one round trip less per create."""
        return self._find_in_pools(name, secrets, skip=parameters.get("pool", self.options.pool))

    def _find_in_pools(self, name: str, secrets: Mapping[str, str], skip: Optional[str]) -> Optional[Volume]:
        import rados
        if not self._has_own_credentials() and not (secrets and secrets.get(SECRET_KEY)):
            return None  # no credentials to look with (this request is for another backend)
        image = self._image_for_name("volume", name)
        conn = self._conn(secrets)
        for pool, known in self._candidate_pools(conn):
            if pool == skip:
                continue
            try:
                with self._ceph(f"look for volume {name!r} in pool {pool}", conn):
                    try:
                        io = conn.ioctx(pool)
                    except NotFound:
                        continue
                    try:
                        io.stat(f"rbd_id.{image}")
                    except rados.ObjectNotFound:
                        continue
                    img = self._open(conn, pool, image)
                    if img is None:
                        continue
                    with img:
                        meta = self._meta(io, img)
                        if "name" in meta:
                            return self._volume_of(pool, image, img, meta)
            except PermissionDenied:
                if known:
                    raise
        return None

    # ---- clone format ---------------------------------------------------------------------------------------
    def _clone_format(self, conn: _Conn) -> int:
        """2 when the cluster allows clone v2 (require-min-compat-client mimic or newer), else 1: protected
        snapshots, which stay on the parent until its last child is flattened or deleted. Learnt once per
        connection; a v1 answer is checked again after a minute, so raising the setting takes effect."""
        now = time.monotonic()
        if conn.clone_v2 is None or (conn.clone_v2 is False and now - conn.clone_v2_checked > 60):
            ret, out, _ = conn.rados.mon_command(json.dumps({"prefix": "osd dump", "format": "json"}), b"",
                                                 timeout=int(self.options.opTimeout))
            if ret != 0:
                conn.clone_v2 = True  # cannot tell (caps): clone v2, whose refusal _clone maps to FAILED_PRECONDITION
                return 2
            conn.min_compat = str(json.loads(out).get("require_min_compat_client", ""))
            conn.clone_v2_checked = now
            conn.clone_v2 = conn.min_compat not in RELEASES or RELEASES.index(conn.min_compat) >= RELEASES.index("mimic")
            if not conn.clone_v2:
                log.info("ceph cluster of backend %s has require-min-compat-client %s: clones use format v1 "
                         "(protected snapshots); `%s` allows v2", self.name, conn.min_compat, CLONE_V2_FIX)
        return 2 if conn.clone_v2 else 1

    @staticmethod
    def _drop_snap(img: Any, snap: str) -> bool:
        """Remove a user snapshot, unprotecting it first (clone v1); False while v1 children still need it."""
        import rbd
        try:
            if img.is_protected_snap(snap):
                img.unprotect_snap(snap)
        except rbd.ImageNotFound:
            return True
        except (rbd.ImageBusy, rbd.InvalidArgument):
            return False  # children of it remain
        with contextlib.suppress(rbd.ImageNotFound):
            img.remove_snap(snap)
        return True

    def _v1_parent(self, img: Any, name: str) -> Optional[tuple[str, str]]:
        """(pool, image id) of the parent whose protected snapshot `name` this clone v1 child hangs from, else None
        (clone v2: the parent's snapshot sits in the trash namespace under a generated name and goes by itself)."""
        import rbd
        try:
            spec = img.get_parent_image_spec()
            parent_id = img.parent_id()
        except rbd.ImageNotFound:
            return None
        return (spec["pool_name"], parent_id) if spec.get("snap_name") == name else None

    def _release_v1(self, conn: _Conn, parent: Optional[tuple[str, str]], snap: str) -> None:
        """After a clone v1 child stopped needing its parent (flattened or deleted): drop the parent's snapshot."""
        import rbd
        if parent is None:
            return
        try:
            with rbd.Image(conn.ioctx(parent[0]), image_id=parent[1]) as p:
                self._drop_snap(p, snap)
        except (rbd.ImageNotFound, NotFound):
            pass

    # ---- background flattens --------------------------------------------------------------------------------
    def _claim_key(self, pool: str, image: str) -> str:
        kind = "snapshot" if image.startswith(SNAP_PREFIX) else "volume"
        return f"{kind}/{self.name}:{pool}.{image}"

    def _queue_flatten(self, secrets: Mapping[str, str], pool: str, image: str) -> None:
        self._jobs.submit(f"flatten {pool}/{image}", lambda: self._flatten_job(dict(secrets), pool, image))

    def _flatten_job(self, secrets: Mapping[str, str], pool: str, image: str) -> object:
        """Flatten one image, holding a shared claim on it (a delete of it meanwhile is ABORTED, naming this)."""
        import rbd
        provider = self.operation_lock_provider()
        try:
            with contextlib.ExitStack() as stack:
                if provider is not None:
                    stack.enter_context(provider.hold(Operation("background flatten", f"{self.name}:{pool}.{image}"),
                                                      [Claim(self._claim_key(pool, image), False)]))
                conn = self._conn(secrets)
                with self._ceph(f"flatten {pool}/{image}", conn):
                    self._flattening.add((pool, image))
                    try:
                        img = self._open(conn, pool, image, read_only=False)
                        if img is None:
                            return None
                        with img:
                            try:
                                img.parent_id()
                            except rbd.ImageNotFound:
                                return None  # flat already
                            v1 = self._v1_parent(img, image)
                            log.info("flattening %s/%s in the background", pool, image)
                            img.flatten()
                            log.info("flattened %s/%s", pool, image)
                        self._release_v1(conn, v1, image)
                    finally:
                        self._flattening.discard((pool, image))
        except Aborted as e:
            log.info("flatten of %s/%s waits: %s", pool, image, e)
            return RETRY
        return None

    def _queue_purge(self, secrets: Mapping[str, str], pool: str, image_id: str, name: str) -> None:
        self._jobs.submit(f"purge {pool}/{image_id}", lambda: self._purge_job(dict(secrets), pool, image_id, name))

    def _purge_job(self, secrets: Mapping[str, str], pool: str, image_id: str, name: str) -> object:
        """Finish deleting a trashed image: flatten its dependants, then remove it from the trash."""
        import rbd
        conn = self._conn(secrets)
        with self._ceph(f"purge deleted {pool}/{name}", conn):
            io = conn.ioctx(pool)
            try:
                with rbd.Image(io, image_id=image_id, read_only=True) as img:
                    children = list(img.list_children2())
                    v1 = self._v1_parent(img, name)
            except rbd.ImageNotFound:
                return None
            waiting = False
            for ch in children:
                if ch.get("trash"):  # a deleted dependant: its own purge must finish first
                    self._queue_purge(secrets, ch["pool"], ch["id"], ch["image"])
                    waiting = True
                elif self._flatten_job(secrets, ch["pool"], ch["image"]) is RETRY:
                    waiting = True
            if waiting:
                return RETRY
            try:
                with rbd.Image(io, image_id=image_id) as img:  # clone v1: its protected snapshots, now childless
                    if not all([self._drop_snap(img, snap) for snap in _user_snaps(img)]):
                        return RETRY
            except rbd.ImageNotFound:
                return None
            try:
                _trash_remove(io, image_id)
            except rbd.ImageHasSnapshots:
                return RETRY  # a trashed snapshot goes away once its last clone is flattened
            self._release_v1(conn, v1, name)
            log.info("purged deleted image %s/%s (trash id %s)", pool, name, image_id)
        return None

    def _resume(self, conn: _Conn, secrets: Mapping[str, str]) -> None:
        """Once per connection: queue the purge of images a DeleteVolume moved to the trash before this process
        (or another replica) finished them (one trash listing per pool)."""
        import rbd
        if conn.resumed:
            return
        conn.resumed = True
        for pool in list(self._used_pools):
            try:
                with self._ceph(f"list the trash of pool {pool}", conn):
                    entries = list(rbd.RBD().trash_list(conn.ioctx(pool)))
            except TesseraError as e:
                log.warning("cannot resume deletions in pool %s: %s", pool, e)
                continue
            for t in entries:
                # Only what DeleteVolume put there (no deferment): an operator's `rbd trash mv --expires-at` is kept.
                due, deleted = t.get("deferment_end_time"), t.get("deletion_time")
                if t.get("name", "").startswith((VOL_PREFIX, SNAP_PREFIX)) and t.get("source") == "USER" and \
                        (due is None or deleted is None or due <= deleted):
                    self._queue_purge(secrets, pool, t["id"], t["name"])

    # ---- ids and metadata ---------------------------------------------------------------------------------
    @staticmethod
    def _split(local_id: str, prefix: str) -> Optional[tuple[str, str]]:
        pool, _, image = local_id.rpartition(".")
        if not pool or not POOL_RE.match(pool) or not image.startswith(prefix):
            return None
        return pool, image

    @staticmethod
    def _meta(io: Any, image: Any) -> dict[str, str]:
        """The open image's Tessera records (backends/rbd_records.py, prefix dropped), plus its QoS overrides under
        their own `conf_rbd_qos_*` names (backends/rbd_qos.py), which librbd keeps in the header's metadata. The
        two reads travel together: one round trip.

        An image committed before the records moved to the id object has them in that same header metadata; they
        count while the id object holds no commit (`rbd_records.merged`; a clone's copy of its parent's header
        metadata names the parent in `image` and counts as none, so a clone interrupted before its commit is seen
        as unfinished)."""
        name = image.get_name()
        with rbd_records.reading(io, name) as pending:
            pairs = dict(image.metadata_list())
            mine = pending.result()
        header = rbd_records.own({k[len(META):]: v for k, v in pairs.items() if k.startswith(META)}, name)
        out = rbd_records.merged(mine, header)
        out.update((metadata_key(k), v) for k, v in from_metadata(pairs).items())
        return out

    def _open(self, conn: _Conn, pool: str, image: str, read_only: bool = True) -> Optional[Any]:
        """An open image, or None when it does not exist."""
        import rbd
        try:
            return rbd.Image(conn.ioctx(pool), image, read_only=read_only)
        except rbd.ImageNotFound:
            return None

    def _context(self, pool: str, image: str, mounter: str) -> dict[str, str]:
        ctx = {"pool": pool, "image": image, "mounter": mounter}
        if self.options.monitors:
            ctx["monitors"] = ",".join(self.options.monitors)
        return ctx

    def _volume_of(self, pool: str, name: str, img: Any, meta: dict[str, str]) -> Volume:
        params = json.loads(meta.get("parameters", "{}"))
        src = meta.get("source")
        source = None
        if src:
            kind, _, sid = src.partition(":")
            source = ContentSource(kind, sid)  # type: ignore[arg-type]
        abnormal, message = False, ""
        try:
            img.stat()
        except Exception as e:  # noqa: BLE001 - any failure to read the header is the condition to report
            abnormal, message = True, f"cannot read image header: {e}"
        mounter = params.get("mounter", self.options.mounter)
        qos = from_metadata(meta)
        return Volume(local_id=f"{pool}.{name}", capacity_bytes=img.size(), name=meta.get("name", ""),
                      context={**self._context(pool, name, mounter), **context_note(mounter, qos)},
                      parameters=params, source=source, abnormal=abnormal, condition_message=message,
                      mutable_parameters=qos, published_nodes=rbd_publish.published_node_ids(meta))

    def _snapshot_of(self, pool: str, name: str, img: Any, meta: dict[str, str], ready: bool = True) -> Snapshot:
        return Snapshot(local_id=f"{pool}.{name}", source_volume_local_id=meta.get("source_volume", ""),
                        size_bytes=img.size(), creation_time=float(meta.get("created", "0")), ready_to_use=ready,
                        name=meta.get("name", ""), group_local_id=meta.get("group", ""))

    def _snap_ready(self, conn: _Conn, img: Any, meta: Mapping[str, str]) -> bool:
        """A snapshot image is usable once its chain is within the soft depth limit (flat with `always`). The depth
        stored at creation bounds it from above (flattens only shorten chains), so listings open no parents."""
        import rbd
        try:
            img.parent_id()
        except rbd.ImageNotFound:
            return True
        if self.options.flattenPolicy == "always":
            return False
        depth = int(meta["depth"]) if meta.get("depth", "").isdigit() else self._depth(conn, img)
        return depth <= self.options.cloneDepthLimit

    def _deep(self, depth: int) -> bool:
        return self.options.flattenPolicy == "always" or depth > self.options.cloneDepthLimit

    # ---- building blocks ----------------------------------------------------------------------------------
    def _clone(self, conn: _Conn, parent_pool: str, parent: str, pool: str, child: str, features: int,
               data_pool: Optional[str], stripe: tuple[Optional[int], Optional[int]], what: str,
               secrets: Mapping[str, str]) -> None:
        """Clone `parent` (its current content) into `child` through an RBD snapshot named after the child. With
        clone v2 the snapshot is removed at once (v2 keeps it in the trash namespace while the child needs it);
        with v1 it is protected and stays until the child is flattened or deleted (`_release_v1`). The caller
        holds a shared claim on the parent, so no delete of it removes that snapshot meanwhile.

        One handle on the parent serves the whole clone: every open and close of an image costs a header read, a
        watch and lock hand-overs, and with one read-write and one read-only open/close pair more around the helper
        snapshot, pacific's librbd was seen to abort the process (a use-after-free in the parent-at-snapshot open
        of the new clone, under CPU load; not seen since the pairs went)."""
        import rbd
        fmt = self._clone_format(conn)
        pio = conn.ioctx(parent_pool)
        cconn = conn if fmt == 2 else self._conn(secrets, clone_format=1)
        # A snapshot taken while this process's background job flattens the parent (its own source was deleted)
        # races that flatten's lock and detach; the job is quick for a small image, so let it finish first.
        deadline = time.monotonic() + FLATTEN_WAIT
        while (parent_pool, parent) in self._flattening and time.monotonic() < deadline:
            time.sleep(0.1)
        for attempt in range(CLONE_ATTEMPTS):
            with rbd.Image(pio, parent) as p:
                if child not in _user_snaps(p):
                    p.create_snap(child)
                if fmt == 1 and not p.is_protected_snap(child):
                    p.protect_snap(child)
                try:
                    rbd.RBD().clone(cconn.ioctx(parent_pool), parent, child, cconn.ioctx(pool), child,
                                    features=features, data_pool=data_pool, stripe_unit=stripe[0],
                                    stripe_count=stripe[1])
                except rbd.InvalidArgument:
                    self._drop_snap(p, child)
                    conn.clone_v2 = None  # ask the cluster again next time
                    raise FailedPrecondition(f"{what}: ceph refused the clone (EINVAL, clone format v{fmt}); check "
                                             f"`ceph osd get-require-min-compat-client` (clone v2 needs mimic: "
                                             f"`{CLONE_V2_FIX}`) and that rbd_default_clone_format is not "
                                             f"forced") from None
                except rbd.ImageNotFound:
                    # The parent exists (this handle is open on it), yet the clone could not open the parent at the
                    # helper snapshot. Seen once in the guest right after the parent's own source was deleted (a
                    # background flatten of the parent then runs, holding its lock): the snapshot taken meanwhile
                    # was not usable. A fresh one, a moment later, is.
                    self._drop_snap(p, child)
                    log.warning("%s: the clone of %s could not open what its helper snapshot depends on (attempt "
                                "%d; the source was being flattened): taking a new one", what, parent, attempt + 1)
                    time.sleep(0.5 * (attempt + 1))
                    continue
                if fmt == 2:
                    self._drop_clone_helper(pio, p, child, what)
                return
        raise Aborted(f"{what}: the source {parent} is being flattened in the background (its own source was "
                      f"deleted) and could not be cloned meanwhile; retry shortly")

    @staticmethod
    def _drop_clone_helper(pio: Any, p: Any, snap: str, what: str, attempts: int = 5) -> None:
        """Remove the clone-v2 helper snapshot `snap` from the open parent `p` and confirm from the header object
        itself that it is gone, removing again a few times if it is not.

        Why not trust remove_snap: with exclusive-lock and fast-diff, librbd hands the removal to whichever
        librbd client owns the parent's lock, and treats that owner's "no such snapshot" as success. An owner
        whose view of the header predates the snapshot answers exactly that, and the snapshot stays. Another
        replica that holds the lock for a moment is stale for a moment (seen in the two-replica race test), and
        a retry a little later reaches a fresh owner. A long-lived owner (rbd-nbd or rbd-fuse mapping the volume,
        with no I/O since) stays stale: then the helper is left, with a warning, for the volume's next expand or
        delete to sweep (`_sweep_helpers`). Retrying longer would only delay the create (seen: 40 tries put
        clones of rbd-nbd-mapped volumes past the CO's deadline in the guest). The check reads the header with
        two object-class calls rather than opening a second image handle (see `_clone`)."""
        import rbd
        header = f"rbd_header.{p.id()}"
        for attempt in range(attempts):
            with contextlib.suppress(rbd.ImageNotFound):
                p.remove_snap(snap)
            if snap not in _header_snap_names(pio, header):
                if attempt:
                    log.warning("%s: the helper snapshot %s on %s needed %d removals (the lock owner's view "
                                "was stale)", what, snap, p.get_name(), attempt + 1)
                return
            time.sleep(0.05 * (attempt + 1))
        log.warning("%s: the helper snapshot %s is still on %s after %d removals (its lock owner, e.g. an rbd-nbd "
                    "or rbd-fuse mapping, answers from a stale view); the volume's next expand or delete removes "
                    "it", what, snap, p.get_name(), attempts)

    @staticmethod
    def _sweep_helpers(img: Any, what: str) -> None:
        """Drop clone-helper snapshots (named after a child image) left on `img` by a clone whose removal did not
        take or whose process died half-way. Only under an exclusive claim on the image: a clone in flight holds
        a shared one, so every unprotected helper here is a leftover (clone v1 children hang from protected ones,
        which stay)."""
        import rbd
        for snap in _user_snaps(img):
            if not snap.startswith((VOL_PREFIX, SNAP_PREFIX)):
                continue  # an operator's own snapshot
            try:
                if img.is_protected_snap(snap):
                    continue
                img.remove_snap(snap)
                log.warning("%s: removed the leftover clone-helper snapshot %s", what, snap)
            except rbd.ImageNotFound:
                pass

    def _depth(self, conn: _Conn, img: Any) -> int:
        """How many parents the image has (parents are opened by id: a deleted one waits in the trash)."""
        import rbd
        depth = 0
        cur = img
        opened: list[Any] = []
        try:
            while depth < 64:
                try:
                    spec = cur.get_parent_image_spec()
                    parent_id = cur.parent_id()
                except rbd.ImageNotFound:
                    return depth
                depth += 1
                cur = rbd.Image(conn.ioctx(spec["pool_name"]), image_id=parent_id, read_only=True)
                opened.append(cur)
            return depth
        finally:
            for o in opened:
                o.close()

    def _forget_stale(self, conn: _Conn, pool: str, name: str) -> None:
        """After a remove: librbd removes an image by moving it to the pool's trash (source REMOVING) and then
        deleting it from there; a driver killed in between leaves the image in the trash, where `rbd ls` still
        shows its name. Finish such removals for this name (one omap read when the trash is empty)."""
        import rados
        import rbd
        io = conn.ioctx(pool)
        # A create killed between registering the name and writing the image can leave the name in the pool's
        # directory with nothing behind it; drop such an entry (the RBD class' own directory call).
        enc = lambda b: struct.pack("<I", len(b)) + b  # noqa: E731
        try:
            _, out = io.execute("rbd_directory", "rbd", "dir_get_id", enc(name.encode()))
            stale_id = out[4:4 + struct.unpack("<I", out[:4])[0]]
        except rados.ObjectNotFound:
            stale_id = b""
        if stale_id:
            try:
                io.stat(f"rbd_id.{name}")
            except rados.ObjectNotFound:
                log.warning("dropping the stale directory entry of %s/%s (id %s)", pool, name, stale_id.decode())
                with contextlib.suppress(rados.ObjectNotFound):
                    io.execute("rbd_directory", "rbd", "dir_remove_image", enc(name.encode()) + enc(stale_id))
        # Images in the middle of removal are hidden from trash_list(), so read the trash's keys ("id_<id>").
        try:
            with rados.ReadOpCtx() as op:
                keys, _ = io.get_omap_keys(op, "id_", 1024)
                io.operate_read_op(op, "rbd_trash")
                ids = [k[3:] for k, _ in keys if k.startswith("id_")]
        except rados.ObjectNotFound:
            ids = []
        for image_id in ids:
            try:
                entry = rbd.RBD().trash_get(io, image_id)
            except rbd.ImageNotFound:
                continue
            if entry.get("name") == name and entry.get("source") == "REMOVING":
                log.warning("finishing the interrupted removal of %s/%s (trash id %s)", pool, name, image_id)
                _trash_remove(io, image_id)

    def _remove(self, conn: _Conn, pool: str, name: str, what: str, secrets: Mapping[str, str] = {}) -> None:
        """Remove an image. One with dependants (snapshots of a deleted volume, volumes restored from a deleted
        snapshot) goes to the RBD trash instead, where they keep reading through it, and a background job flattens
        them and then purges it: no full copy inside the RPC."""
        import rbd
        v1: Optional[tuple[str, str]] = None
        if self._clone_format(conn) == 1:  # a clone v1 child: its parent's protected snapshot goes with it
            img = self._open(conn, pool, name)
            if img is not None:
                with img:
                    v1 = self._v1_parent(img, name)
        try:  # fast path: no dependants, no leftovers
            self._unless_busy(lambda: rbd.RBD().remove(conn.ioctx(pool), name), pool, name, what)
            self._forget_stale(conn, pool, name)
            self._release_v1(conn, v1, name)
            return
        except rbd.ImageNotFound:
            self._forget_stale(conn, pool, name)
            return
        except rbd.ImageHasSnapshots:
            pass
        img = self._open(conn, pool, name, read_only=False)
        if img is None:
            return
        with img:
            children = list(img.list_children2())
            # Leftovers of a clone interrupted by a crash: a clone in flight holds a shared claim on this image,
            # which the caller's exclusive claim excludes, so every user snapshot here is a leftover, except the
            # protected ones clone v1 children still hang from (they go when the last child is flat or gone).
            for snap in _user_snaps(img):
                self._drop_snap(img, snap)
            image_id = img.id()
        if children:
            self._unless_busy(lambda: rbd.RBD().trash_move(conn.ioctx(pool), name), pool, name, what)
            log.info("moved %s/%s to the trash; its %d dependant(s) are flattened in the background, then it is "
                     "purged", pool, name, len(children))
            self._queue_purge(secrets, pool, image_id, name)
            return
        for attempt in range(50):
            try:
                self._unless_busy(lambda: rbd.RBD().remove(conn.ioctx(pool), name), pool, name, what)
                self._forget_stale(conn, pool, name)
                self._release_v1(conn, v1, name)
                return
            except rbd.ImageNotFound:
                self._forget_stale(conn, pool, name)
                return
            except rbd.ImageHasSnapshots:
                time.sleep(0.05)  # a trashed snapshot goes away once its last clone is flattened
        raise InUse(f"{what} still has snapshots that could not be removed")

    # ---- volumes ------------------------------------------------------------------------------------------
    def _unless_busy(self, call: Any, pool: str, name: str, what: str, patience: float = 5.0) -> None:
        """`call()` (a remove or trash move), retried while the image is busy for a moment: a watch that is going
        away (this process's own background job closing the image, a node's unmap finishing) is not a node that
        still uses the volume. Still busy after `patience` seconds: `_busy` decides the answer."""
        import rbd
        deadline = time.monotonic() + patience
        while True:
            try:
                call()
                return
            except rbd.ImageBusy:
                if (pool, name) in self._flattening or time.monotonic() > deadline:
                    self._busy(pool, name, what)
                time.sleep(0.2)

    def _busy(self, pool: str, name: str, what: str) -> None:
        """Raise for an image that has watchers: our own background flatten (ABORTED: retry once it is done), or a
        node that still has it mapped (FAILED_PRECONDITION)."""
        if (pool, name) in self._flattening:
            raise Aborted(f"{what}: a background flatten of it is running in this controller; retry shortly")
        raise InUse(f"{what} is still in use (mapped or open on a node: it has watchers); unstage it first")

    def _open_ok(self, conn: _Conn, pool: str, name: str) -> bool:
        img = self._open(conn, pool, name)
        if img is None:
            return False
        img.close()
        return True

    def _existing(self, conn: _Conn, pool: str, name: str, what: str,
                  reuse: Optional[tuple[int, int]] = None, secrets: Mapping[str, str] = {}) -> Optional[Volume]:
        """The committed volume under `name`, or None. An uncommitted image (an interrupted create nobody has
        seen) is kept when `reuse` = (size, features) matches it and it has no parent — the caller commits it;
        otherwise it is removed. Reusing avoids a remove, which a second crash could itself interrupt."""
        import rbd
        img = self._open(conn, pool, name)
        if img is None:
            # A create or remove killed half-way can leave the name registered without a readable header; librbd's
            # remove cleans such remains (and is a no-op for a name that is truly free).
            with contextlib.suppress(rbd.ImageNotFound):
                rbd.RBD().remove(conn.ioctx(pool), name)
            return None
        with img:
            meta = self._meta(conn.ioctx(pool), img)
            if "name" in meta:
                return self._volume_of(pool, name, img, meta)
            if reuse is not None and img.size() == reuse[0] and img.features() == reuse[1]:
                try:
                    img.get_parent_image_spec()
                except rbd.ImageNotFound:
                    log.warning("finishing unfinished image %s/%s left by an interrupted create", pool, name)
                    return None
        log.warning("removing unfinished image %s/%s left by an interrupted create", pool, name)
        try:
            self._remove(conn, pool, name, what, secrets)
        except InUse:
            # The process that was creating it died with the image open; the OSDs drop its watch after
            # `osd client watch timeout` (30 s by default). Until then, ask the CO to come back.
            raise Aborted(f"{what}: an interrupted earlier create still holds the image open; retry shortly") from None
        return None

    def create_volume(self, spec: CreateVolumeSpec) -> Volume:
        import rbd
        p = spec.parameters
        pool = p.get("pool", self.options.pool)
        name = VOL_PREFIX + object_uuid(self.runtime.driver_name, spec.name)
        what = f"volume {spec.name!r} ({pool}/{name})"
        conn = self._conn(spec.secrets)
        meta = {"kind": "volume", "parameters": json.dumps(dict(spec.parameters), sort_keys=True), "name": spec.name}
        with self._ceph(f"create {what}", conn):
            io = conn.ioctx(pool)
            self._used_pools.setdefault(pool, None)
            self._resume(conn, spec.secrets)
            features = _feature_bits(p["imageFeatures"].split(",") if "imageFeatures" in p
                                     else self.options.imageFeatures)
            data_pool = p.get("dataPool", self.options.dataPool)
            stripe = (int(p["stripeUnit"]) if "stripeUnit" in p else self.options.stripeUnit,
                      int(p["stripeCount"]) if "stripeCount" in p else self.options.stripeCount)
            size = spec.size_bytes
            if spec.source is None:
                # Fast path: create first; an existing image (retry, or a crash before the commit) is the rare case.
                for _ in range(2):
                    try:
                        rbd.RBD().create(io, name, size, features=features, data_pool=data_pool,
                                         stripe_unit=stripe[0], stripe_count=stripe[1])
                        break
                    except rbd.ImageExists:
                        found = self._existing(conn, pool, name, what, reuse=(size, features), secrets=spec.secrets)
                        if found is not None:
                            return found
                        if self._open_ok(conn, pool, name):
                            break  # an unfinished create of the same image: finish it (commit below)
                self._commit(io, name, meta)
                return Volume(local_id=f"{pool}.{name}", capacity_bytes=size, name=spec.name,
                              context=self._context(pool, name, p.get("mounter", self.options.mounter)),
                              parameters=dict(spec.parameters))
            found = self._existing(conn, pool, name, what, secrets=spec.secrets)
            if found is not None:
                return found
            prefix = SNAP_PREFIX if spec.source.kind == "snapshot" else VOL_PREFIX
            parsed = self._split(spec.source.local_id, prefix)
            src = self._open(conn, *parsed) if parsed else None
            if src is None or "name" not in self._meta(conn.ioctx(parsed[0]), src):
                if src is not None:
                    src.close()
                raise NotFound(f"source {spec.source.kind} {self.name}:{spec.source.local_id} does not exist")
            with src:
                src_size = src.size()
                depth = self._depth(conn, src) + 1
            if depth > self.options.cloneDepthHardLimit:
                assert parsed is not None
                self._queue_flatten(spec.secrets, *parsed)
                raise Aborted(f"{what}: a clone of {spec.source.kind} {self.name}:{spec.source.local_id} would sit on "
                              f"a chain of {depth} images, past cloneDepthHardLimit "
                              f"({self.options.cloneDepthHardLimit}); the source is being flattened in the "
                              f"background: retry shortly")
            if size < src_size:
                if spec.limit_bytes and src_size > spec.limit_bytes:
                    raise OutOfRange(f"the source {spec.source.kind} ({src_size} bytes) is larger than "
                                     f"limit_bytes {spec.limit_bytes}")
                size = src_size  # no explicit size asked beyond the source's: take the source's size
            assert parsed is not None
            self._clone(conn, parsed[0], parsed[1], pool, name, features, data_pool, stripe, f"create {what}",
                        spec.secrets)
            meta["source"] = f"{spec.source.kind}:{spec.source.local_id}"
            with rbd.Image(io, name, read_only=size <= src_size) as img:  # one handle on the new image
                if size > src_size:
                    img.resize(size)
                self._commit(io, name, meta)
                volume = self._volume_of(pool, name, img, self._meta(io, img))
            if self._deep(depth):
                self._queue_flatten(spec.secrets, pool, name)  # usable meanwhile: reads go through the chain
            return volume

    @staticmethod
    def _commit(io: Any, name: str, meta: Mapping[str, str]) -> None:
        """Write all Tessera records of a new image in one atomic step, the commit point of a create, with `image`
        = its own name: one OSD operation on the image's id object (backends/rbd_records.py), no read first.

        Why not Image.metadata_set: opening an image (header read, watch, exclusive-lock acquisition) costs more
        than the create itself; and the header's metadata can only be written after reading the image's id."""
        import rados
        try:
            rbd_records.write(io, name, {**meta, "image": name})
        except rados.ObjectNotFound:
            raise Aborted(f"image {name} vanished before its create committed (removed meanwhile); retry") from None

    def delete_volume(self, local_id: str, secrets: Mapping[str, str]) -> None:
        parsed = self._split(local_id, VOL_PREFIX)
        if parsed is None:
            return  # not an id this backend could have made: nothing to delete
        conn = self._conn(secrets)
        with self._ceph(f"delete volume {local_id}", conn):
            try:
                conn.ioctx(parsed[0])
            except NotFound:
                return
            self._resume(conn, secrets)
            self._remove(conn, parsed[0], parsed[1], f"volume {self.name}:{local_id}", secrets)

    def get_volume(self, local_id: str, secrets: Mapping[str, str]) -> Volume:
        parsed = self._split(local_id, VOL_PREFIX)
        if parsed is None:
            raise NotFound(f"volume {self.name}:{local_id} does not exist")
        conn = self._conn(secrets)
        with self._ceph(f"get volume {local_id}", conn):
            img = self._open(conn, *parsed)
            if img is None:
                raise NotFound(f"volume {self.name}:{local_id} does not exist")
            with img:
                meta = self._meta(conn.ioctx(parsed[0]), img)
                if "name" not in meta:
                    raise NotFound(f"volume {self.name}:{local_id} does not exist (unfinished create)")
                return self._volume_of(parsed[0], parsed[1], img, meta)

    def _ids_after(self, conn: _Conn, prefix: str, start_after: str) -> list[tuple[str, str, str]]:
        """(local ID, pool, image) of every image named with `prefix` whose local ID sorts after `start_after`, in
        local ID order: names only (one `rbd ls` per pool), so a page opens just the images it returns."""
        out = []
        for pool in dict.fromkeys([self.options.pool, *self.options.extraPools]):
            with self._ceph(f"list pool {pool}", conn):
                names = self._image_names(conn, pool)
            out.extend((f"{pool}.{n}", pool, n) for n in names if n.startswith(prefix) and f"{pool}.{n}" > start_after)
        out.sort()
        return out

    @staticmethod
    def _image_names(conn: _Conn, pool: str) -> list[str]:
        """The pool's image names, sorted. Why kept: `rbd ls` of 10,000 images reads 20,000 omap keys (~0.2 s here),
        once per page of a paged listing. Every create, rename and removal of an image updates the pool's
        `rbd_directory` object, which is where the list comes from, so the names are read again only when that
        object's version changed: one stat per page. The stat comes first, so a change racing the read only makes
        the next page read again. A private ioctx, because get_last_version reports the ioctx's last operation."""
        import rados
        import rbd
        conn.ioctx(pool)  # NotFound for a pool that does not exist, as everywhere else
        io = conn.rados.open_ioctx(pool)
        try:
            try:
                size, mtime = io.stat("rbd_directory")
            except rados.ObjectNotFound:
                return []  # no image was ever made in this pool
            key = (io.get_last_version(), size, mtime)
            kept = conn.listings.get(pool)
            if kept is not None and kept[0] == key:
                return kept[1]
            names = sorted(rbd.RBD().list(io))
            conn.listings[pool] = (key, names)
            return names
        finally:
            io.close()

    def _iter_images(self, secrets: Mapping[str, str], prefix: str, start_after: str,
                     build: Callable[[_Conn, str, str, Any, dict[str, str]], Any]) -> Iterator[Any]:
        """`build(conn, pool, image, img, meta)` of each finished image after `start_after`, opened one at a time
        when the caller asks for it and closed before it is handed out (a caller may stop at any point)."""
        conn = self._conn(secrets)
        for _, pool, n in self._ids_after(conn, prefix, start_after):
            with self._ceph(f"read {pool}/{n}", conn):
                img = self._open(conn, pool, n)
                if img is None:
                    continue  # deleted since the listing
                with img:
                    meta = self._meta(conn.ioctx(pool), img)
                    if "name" not in meta:
                        continue  # a create before its commit point
                    item = build(conn, pool, n, img, meta)
            yield item

    def list_volumes(self, secrets: Mapping[str, str]) -> Iterable[Volume]:
        return list(self.iter_volumes("", secrets))

    def iter_volumes(self, start_after: str, secrets: Mapping[str, str]) -> Iterator[Volume]:
        return self._iter_images(secrets, VOL_PREFIX, start_after,
                                 lambda conn, pool, n, img, meta: self._volume_of(pool, n, img, meta))

    def _pool_stats(self, pool: str) -> dict[str, Any]:
        """The pool's row of `ceph df` (max_avail, bytes_used, percent_used, ...). The figures come from the
        ceph-mgr: without one, BackendUnavailable saying so."""
        conn = self._conn({})
        with self._ceph(f"capacity of pool {pool}", conn):
            ret, out, err = conn.rados.mon_command(json.dumps({"prefix": "df", "format": "json"}), b"",
                                                   timeout=int(self.options.opTimeout))
            if ret != 0:
                raise BackendUnavailable(f"GetCapacity needs a ceph-mgr (pool usage comes from it): `ceph df` for "
                                         f"pool {pool} failed: {err.strip() or ret}")
            df = json.loads(out)
        if not df.get("stats", {}).get("total_bytes"):
            raise BackendUnavailable("GetCapacity needs a ceph-mgr: the cluster reports no pool statistics (no "
                                     "ceph-mgr running, or it has not reported yet); start one and retry")
        for p in df.get("pools", []):
            if p.get("name") == pool:
                return p["stats"]
        with self._ceph(f"look up pool {pool}", conn):
            exists = conn.rados.pool_exists(pool)
        if exists:  # the osdmap has it; the mgr's statistics do not yet (a new pool)
            raise BackendUnavailable(f"the ceph-mgr has not reported statistics for pool {pool} yet (a new pool); "
                                     "retry shortly")
        raise NotFound(f"ceph pool {pool!r} does not exist")

    def get_capacity(self, parameters: Mapping[str, str], segments: Optional[Mapping[str, str]]) -> Capacity:
        return Capacity(available_bytes=int(self._pool_stats(parameters.get("pool", self.options.pool))["max_avail"]))

    # ---- operator views ---------------------------------------------------------------------------------------
    def usage(self) -> Usage:
        """Counts of Tessera's image names in this backend's pools (one directory read per pool: opening every
        image, as a listing does, would cost thousands of reads every refresh at scale; an unfinished create is
        counted until its retry or `volumes orphans` settles it); the default pool's size (used + what it may still
        take), free space and use in percent from the ceph-mgr (absent without one, and said so in `problems`)."""
        import rbd
        out = Usage()
        try:
            conn = self._conn({})
            vols = snaps = 0
            for pool in dict.fromkeys([self.options.pool, *self.options.extraPools]):
                with self._ceph(f"list pool {pool}", conn):
                    names = rbd.RBD().list(conn.ioctx(pool))
                vols += sum(1 for n in names if n.startswith(VOL_PREFIX))
                snaps += sum(1 for n in names if n.startswith(SNAP_PREFIX))
            out.volumes, out.snapshots = vols, snaps
        except Exception as e:  # noqa: BLE001 - reported as a problem, never raised into the metrics thread
            out.problems.append(f"counts: {e}")
        try:
            stats = self._pool_stats(self.options.pool)
            used, avail = int(stats.get("bytes_used", 0)), int(stats["max_avail"])
            out.total_bytes, out.free_bytes = used + avail, avail
            out.gauges["pool_used_percent"] = float(stats.get("percent_used", 0.0)) * 100.0
        except Exception as e:  # noqa: BLE001 - reported as a problem, never raised into the metrics thread
            out.problems.append(f"pool {self.options.pool}: {e}")
        return out

    def orphans(self) -> list[Orphan]:
        """Images with Tessera's name prefix in this backend's pools that carry no request name: a create that
        stopped before its commit point (retrying that create removes and redoes it), or an image made by hand.
        The lease-lock objects of names never created are not listed: finding them means reading every object of
        the pool."""
        import rbd
        conn = self._conn({})
        out: list[Orphan] = []
        for pool in dict.fromkeys([self.options.pool, *self.options.extraPools]):
            with self._ceph(f"list pool {pool}", conn):
                names = sorted(n for n in rbd.RBD().list(conn.ioctx(pool)) if n.startswith((VOL_PREFIX, SNAP_PREFIX)))
            for n in names:
                with self._ceph(f"read {pool}/{n}", conn):
                    img = self._open(conn, pool, n)
                    if img is None:
                        continue
                    with img:
                        if "name" not in self._meta(conn.ioctx(pool), img):
                            out.append(Orphan(f"{pool}/{n}", "image without Tessera's request metadata: a create "
                                                             "that stopped before its commit point (a retry of "
                                                             "that create redoes it), or made by hand"))
        return out

    def expand_volume(self, local_id: str, size_bytes: int, secrets: Mapping[str, str]) -> tuple[int, bool]:
        import rbd
        parsed = self._split(local_id, VOL_PREFIX)
        if parsed is None:
            raise NotFound(f"volume {self.name}:{local_id} does not exist")
        conn = self._conn(secrets)
        with self._ceph(f"expand volume {local_id}", conn):
            try:
                img = rbd.Image(conn.ioctx(parsed[0]), parsed[1])
            except rbd.ImageNotFound:
                raise NotFound(f"volume {self.name}:{local_id} does not exist") from None
            with img:
                size = img.size()
                if size < size_bytes:
                    img.resize(size_bytes)
                    size = size_bytes
                self._sweep_helpers(img, f"{self.name}:{local_id}")
        return size, True

    # ---- publications (backends/rbd_publish.py) -------------------------------------------------------------
    def controller_publish(self, local_id: str, node: Any, readonly: bool, capability: Any,
                           context: Mapping[str, str], secrets: Mapping[str, str]) -> dict[str, str]:
        return rbd_publish.publish(self, local_id, node, readonly, capability, secrets)

    def controller_unpublish(self, local_id: str, node: Any, secrets: Mapping[str, str]) -> None:
        rbd_publish.unpublish(self, local_id, node, secrets)

    def node_attributes(self) -> dict[str, str]:
        return dict(rbd_publish.NODE_ATTRIBUTES)

    # ---- mutable parameters: QoS (backends/rbd_qos.py) -----------------------------------------------------
    def mutable_parameters(self) -> Mapping[str, Any]:
        return QOS_PARAMETERS

    def modify_volume(self, local_id: str, changes: Mapping[str, str], secrets: Mapping[str, str]) -> Volume:
        """Write each changed QoS value as the image's `conf_rbd_qos_*` metadata through librbd (Image.metadata_set
        notifies the image's watchers, so rbd-nbd and rbd-fuse clients apply it at once). Values already in force
        are not written again."""
        import rbd
        parsed = self._split(local_id, VOL_PREFIX)
        if parsed is None:
            raise NotFound(f"volume {self.name}:{local_id} does not exist")
        conn = self._conn(secrets)
        with self._ceph(f"modify volume {local_id}", conn):
            try:
                img = rbd.Image(conn.ioctx(parsed[0]), parsed[1])
            except rbd.ImageNotFound:
                raise NotFound(f"volume {self.name}:{local_id} does not exist") from None
            with img:
                meta = self._meta(conn.ioctx(parsed[0]), img)
                if "name" not in meta:
                    raise NotFound(f"volume {self.name}:{local_id} does not exist (unfinished create)")
                for key, value in sorted(changes.items()):
                    if meta.get(metadata_key(key)) != value:
                        img.metadata_set(metadata_key(key), value)
                return self._volume_of(parsed[0], parsed[1], img, self._meta(conn.ioctx(parsed[0]), img))

    # ---- snapshots ----------------------------------------------------------------------------------------
    def create_snapshot(self, source_local_id: str, name: str, parameters: Mapping[str, str],
                        secrets: Mapping[str, str]) -> Snapshot:
        import rbd
        if parameters:
            raise InvalidArgument(f"the rbd backend takes no snapshot parameters; got {', '.join(sorted(parameters))}")
        parsed = self._split(source_local_id, VOL_PREFIX)
        if parsed is None:
            raise NotFound(f"source volume {self.name}:{source_local_id} does not exist")
        pool = parsed[0]
        sname = SNAP_PREFIX + object_uuid(self.runtime.driver_name, "snapshot/" + name)
        what = f"snapshot {name!r} ({pool}/{sname})"
        conn = self._conn(secrets)
        with self._ceph(f"create {what}", conn):
            img = self._open(conn, pool, sname)
            if img is not None:
                with img:
                    meta = self._meta(conn.ioctx(pool), img)
                    if "name" in meta:
                        ready = self._snap_ready(conn, img, meta)
                        if not ready:
                            self._queue_flatten(secrets, pool, sname)
                        return self._snapshot_of(pool, sname, img, meta, ready)
                self._remove(conn, pool, sname, what, secrets)
            src = self._open(conn, *parsed)
            if src is None:
                raise NotFound(f"source volume {self.name}:{source_local_id} does not exist")
            with src:
                if "name" not in self._meta(conn.ioctx(pool), src):
                    raise NotFound(f"source volume {self.name}:{source_local_id} does not exist")
                features = src.features() & _feature_bits(FEATURE_NAMES)
                data_pool_id = src.data_pool_id()
                depth = self._depth(conn, src) + 1
            data_pool = None
            if data_pool_id >= 0 and data_pool_id != conn.ioctx(pool).get_pool_id():
                data_pool = conn.rados.pool_reverse_lookup(data_pool_id)
            self._clone(conn, pool, parsed[1], pool, sname, features, data_pool, (None, None), f"create {what}",
                        secrets)
            self._commit(conn.ioctx(pool), sname, {"kind": "snapshot", "source_volume": source_local_id,
                                                    "created": repr(time.time()), "name": name, "depth": str(depth)})
            deep = self._deep(depth)
            if deep:  # ready_to_use=false until the background flatten makes it self-contained
                self._queue_flatten(secrets, pool, sname)
            with rbd.Image(conn.ioctx(pool), sname, read_only=True) as s:
                return self._snapshot_of(pool, sname, s, self._meta(conn.ioctx(pool), s), not deep)

    def delete_snapshot(self, local_id: str, secrets: Mapping[str, str]) -> None:
        parsed = self._split(local_id, SNAP_PREFIX)
        if parsed is None:
            return
        conn = self._conn(secrets)
        with self._ceph(f"delete snapshot {local_id}", conn):
            try:
                conn.ioctx(parsed[0])
            except NotFound:
                return
            self._resume(conn, secrets)
            self._remove(conn, parsed[0], parsed[1], f"snapshot {self.name}:{local_id}", secrets)

    def get_snapshot(self, local_id: str, secrets: Mapping[str, str]) -> Snapshot:
        parsed = self._split(local_id, SNAP_PREFIX)
        if parsed is None:
            raise NotFound(f"snapshot {self.name}:{local_id} does not exist")
        conn = self._conn(secrets)
        with self._ceph(f"get snapshot {local_id}", conn):
            img = self._open(conn, *parsed)
            if img is None:
                raise NotFound(f"snapshot {self.name}:{local_id} does not exist")
            with img:
                meta = self._meta(conn.ioctx(parsed[0]), img)
                if "name" not in meta:
                    raise NotFound(f"snapshot {self.name}:{local_id} does not exist (unfinished create)")
                ready = self._snap_ready(conn, img, meta)
                if not ready:
                    self._queue_flatten(secrets, *parsed)
                return self._snapshot_of(parsed[0], parsed[1], img, meta, ready)

    def list_snapshots(self, secrets: Mapping[str, str]) -> Iterable[Snapshot]:
        return list(self.iter_snapshots("", secrets))

    def iter_snapshots(self, start_after: str, secrets: Mapping[str, str]) -> Iterator[Snapshot]:
        def build(conn: _Conn, pool: str, n: str, img: Any, meta: dict[str, str]) -> Snapshot:
            ready = self._snap_ready(conn, img, meta)
            if not ready:
                self._queue_flatten(secrets, pool, n)
            return self._snapshot_of(pool, n, img, meta, ready)
        return self._iter_images(secrets, SNAP_PREFIX, start_after, build)

    # ---- node ---------------------------------------------------------------------------------------------
    def _node_dir(self) -> str:
        d = os.path.join(self.runtime.state_dir, "rbd", self.name)
        os.makedirs(d, mode=0o700, exist_ok=True)
        return d

    def _node_client_args(self, secrets: Mapping[str, str]) -> list[str]:
        """Arguments that point a ceph command-line tool at the cluster with the right user, the key in a 0600
        file (never on the command line, where `ps` would show it)."""
        user, key = self._credentials(secrets)
        d = self._node_dir()
        conf = self.options.cephConf
        if not conf:
            conf = os.path.join(d, "ceph.conf")
            if not os.path.exists(conf):
                with open(conf + ".tmp", "w") as f:
                    f.write("[global]\n")
                os.replace(conf + ".tmp", conf)
        args = ["--conf", conf, "--id", user]
        if self.options.monitors:
            args += ["--mon-host", ",".join(self.options.monitors)]
        if key:
            path = os.path.join(d, f"key-{hashlib.sha256((user + key).encode()).hexdigest()[:16]}")
            if not os.path.exists(path):
                fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(key)
                os.replace(path + ".tmp", path)
            args += ["--keyfile", path]
        elif self.options.keyringPath:
            args += ["--keyring", self.options.keyringPath]
        return args

    def node_attach(self, local_id: str, context: Mapping[str, str], publish_context: Mapping[str, str],
                    secrets: Mapping[str, str], *, readonly: bool = False,
                    multi_writer: bool = False) -> Attachment:
        """Map the image: read-only at the device for reader-only modes (krbd/rbd-nbd --read-only, a read-only
        loop over rbd-fuse), never adopting another mapping of different permission. A read-write map first asks
        Ceph who watches the image: every read-write mapping (krbd, rbd-nbd, rbd-fuse) holds a watch, read-only
        ones do not, so a watcher is another node (or process) holding it read-write: FAILED_PRECONDITION naming
        it, unless the mode lets several nodes write (raw block MULTI_NODE_MULTI_WRITER)."""
        parsed = self._split(local_id, VOL_PREFIX)
        if parsed is None:
            raise NotFound(f"volume {self.name}:{local_id} is not an rbd volume id")
        pool, image = context.get("pool", parsed[0]), context.get("image", parsed[1])
        mounter = context.get("mounter", self.options.mounter)
        self._check_context(local_id, pool, image, mounter)
        if mounter == "fuse":
            return self._fuse_attach(pool, image, secrets, readonly, multi_writer)
        if mounter == "krbd":
            return self._krbd_attach(pool, image, secrets, readonly, multi_writer)
        return self._nbd_attach(pool, image, secrets, readonly, multi_writer)

    def _check_context(self, local_id: str, pool: str, image: str, mounter: str) -> None:
        """The volume context comes from a static PV as often as from CreateVolume: pool and image must follow
        Ceph's naming (and never look like an option), the pool must be one this backend is configured for
        (`pool` or `extraPools`: a PV cannot map an image of a pool the operator did not give Tessera), and the
        mounter one of the known ones."""
        if not POOL_RE.match(pool):
            raise InvalidArgument(f"volume {self.name}:{local_id}: pool {pool!r} is not a valid pool name "
                                  "(letters, digits, '_' and '-', at most 63)")
        allowed = [self.options.pool, *self.options.extraPools]
        if pool not in allowed:
            raise InvalidArgument(f"volume {self.name}:{local_id}: pool {pool!r} is not one of backend "
                                  f"{self.name!r}'s pools ({', '.join(allowed)}); add it to extraPools to allow it")
        if not IMAGE_RE.match(image):
            raise InvalidArgument(f"volume {self.name}:{local_id}: image {image!r} is not a valid RBD image name "
                                  "(letters, digits, '_', '.', '-', at most 128, not starting with '-' or '.')")
        if mounter not in MOUNTERS:
            raise InvalidArgument(f"volume {self.name}:{local_id}: unknown mounter {mounter!r} "
                                  f"(one of {', '.join(MOUNTERS)})")

    def node_detach(self, local_id: str, attachment: Attachment) -> None:
        mounter = attachment.data.get("mounter")
        if mounter == "fuse":
            self._fuse_detach(attachment)
        elif mounter == "krbd":
            if attachment.device and os.path.exists(attachment.device):
                _unmap(["rbd", "device", "unmap", attachment.device])
        elif mounter == "nbd":
            if attachment.device and os.path.exists(attachment.device):
                _unmap(["rbd-nbd", "unmap", attachment.device])
        pool, image = attachment.data.get("pool", ""), attachment.data.get("image", "")
        if mounter in ("krbd", "nbd") and POOL_RE.match(pool) and IMAGE_RE.match(image):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._claim_path(mounter, pool, image))

    def node_io_limits(self, local_id: str, attachment: Optional[Attachment] = None) -> Mapping[str, str]:
        """krbd reads none of librbd's QoS: for a krbd-mapped image the node enforces the image's `rbd_qos_*`
        limits with the pod's cgroup io.max (backends/io_limits.py: per direction, no bursts). rbd-nbd and fuse are
        librbd clients that enforce the limits themselves: nothing for the node."""
        mounter = (attachment.data.get("mounter") if attachment is not None else "") or self.options.mounter
        parsed = self._split(local_id, VOL_PREFIX)
        if mounter != "krbd" or parsed is None or not self._has_own_credentials():
            return {}  # without its own credentials the node cannot read the image's limits (README)
        conn = self._conn({})
        with self._ceph(f"read the QoS of volume {self.name}:{local_id}", conn):
            img = self._open(conn, *parsed)
            if img is None:
                return {}
            with img:
                return io_limits.from_rbd_qos(from_metadata(dict(img.metadata_list())))

    def node_refresh_size(self, local_id: str, attachment: Attachment) -> None:
        # krbd and rbd-nbd watch the image header and resize their device themselves; a loop device over an
        # rbd-fuse file must be told.
        if attachment.data.get("mounter") == "fuse":
            from csi import loopdev
            loopdev.refresh(attachment.device)

    def node_attachment_valid(self, local_id: str, attachment: Attachment,
                              context: Mapping[str, str]) -> Optional[bool]:
        """Proven from the kernel (backends/node_proof.py), for the image the *volume* names (its context, else its
        ID), never the one the record names: krbd — /sys/bus/rbd/devices/<id> of this device number names this
        pool/image's head; rbd-nbd — the nbd device's serving process is an rbd-nbd map of it (or, when that
        process is not visible here, `rbd-nbd list-mapped` lists it); fuse — the loop device is backed by this
        image's rbd-fuse file and that FUSE mount is alive."""
        from . import node_proof
        parsed = self._split(local_id, VOL_PREFIX)
        if parsed is None:
            return False
        pool, image = context.get("pool", parsed[0]), context.get("image", parsed[1])
        if not POOL_RE.match(pool) or not IMAGE_RE.match(image):
            return False
        rdev = node_proof.device_rdev(attachment.device)
        if rdev is None:
            return False
        mounter = attachment.data.get("mounter") or context.get("mounter", self.options.mounter)
        if mounter == "krbd":
            return node_proof.krbd_is(rdev, pool, image)
        if mounter == "nbd":
            pid = node_proof.nbd_pid(rdev)
            listed = None
            if pid is not None and node_proof.rbd_nbd_serves(pid, pool, image) is None:
                try:  # the serving process is in another PID namespace: ask rbd-nbd itself
                    listed = json.loads(run(["rbd-nbd", "list-mapped", "--format", "json"], timeout=30).stdout
                                        or "[]")
                except (CommandError, ValueError, OSError):
                    listed = None
            return node_proof.nbd_is(rdev, attachment.device, pool, image, listed)
        if mounter == "fuse":
            from csi import loopdev
            mnt = self._fuse_mountpoint(pool, image)
            path = os.path.join(mnt, image)
            if node_proof.loop_backing_name(rdev) not in (path, os.path.realpath(mnt) + "/" + image):
                return False
            return node_proof.fuse_mounted(mnt) and loopdev.backs(attachment.device, path)
        return False

    # krbd / rbd-nbd: the same `rbd map` os-brick's RBD connector runs for a local attach, called directly so the
    # node needs no rootwrap/privsep setup (the node plugin already runs privileged).
    def _krbd_attach(self, pool: str, image: str, secrets: Mapping[str, str], readonly: bool = False,
                     multi_writer: bool = False) -> Attachment:
        argv = ["rbd", "device", "map", "--pool", pool, "--image", image] + (["--read-only"] if readonly else [])
        dev = self._claimed_map("krbd", ["rbd", "device", "list", "--format", "json"], pool, image, readonly,
                                multi_writer, secrets, lambda: run(argv + self._node_client_args(secrets),
                                                                   timeout=self.options.opTimeout + 30).stdout.strip())
        return Attachment(device=dev, data={"mounter": "krbd", "pool": pool, "image": image, "readonly": readonly})

    def _nbd_attach(self, pool: str, image: str, secrets: Mapping[str, str], readonly: bool = False,
                    multi_writer: bool = False) -> Attachment:
        log_file = os.path.join(self._node_dir(), f"rbd-nbd-{pool}-{image}.log")
        argv = ["rbd-nbd", "map", f"{pool}/{image}", "--log-file", log_file] + (["--read-only"] if readonly else [])
        dev = self._claimed_map("nbd", ["rbd-nbd", "list-mapped", "--format", "json"], pool, image, readonly,
                                multi_writer, secrets, lambda: run(argv + self._node_client_args(secrets),
                                                                   timeout=self.options.opTimeout + 30).stdout.strip())
        return Attachment(device=dev, data={"mounter": "nbd", "pool": pool, "image": image, "readonly": readonly})

    def _claim_path(self, kind: str, pool: str, image: str) -> str:
        d = os.path.join(self._node_dir(), "mapped")
        os.makedirs(d, mode=0o700, exist_ok=True)
        return os.path.join(d, f"{kind}.{pool}.{image}.json")

    def _claimed_map(self, kind: str, list_argv: list[str], pool: str, image: str, readonly: bool,
                     multi_writer: bool, secrets: Mapping[str, str], do_map: Any) -> str:
        """Map once per plugin, idempotently. The kernel's mapping list is shared by everything on the host, so
        a mapping is adopted only when this plugin claimed it (a claim file in its state directory, written
        *before* the map: a crash during the map leaves a claim 'mapping', and the retry then adopts the kernel's
        mapping of that image, the one the crashed attempt made). Never adopts a mapping of the other permission."""
        from .util import read_json, write_json_atomic
        path = self._claim_path(kind, pool, image)
        try:
            claim = read_json(path)
        except (FileNotFoundError, ValueError):
            claim = None
        found = self._mapped(list_argv, pool, image)
        dev = None
        if claim and found:
            want = claim.get("device")
            dev = want if want in found else (found[0] if want is None else None)
        if dev is not None and _device_read_only(dev) != readonly:
            raise FailedPrecondition(f"image {pool}/{image} is mapped on this node as {dev} "
                                     f"{'read-only' if _device_read_only(dev) else 'read-write'}; unstage it before "
                                     f"staging it {'read-only' if readonly else 'read-write'}")
        if dev is None:
            if not readonly and not multi_writer:
                self._check_no_writer(pool, image, secrets)
            write_json_atomic(path, {"device": None})
            dev = do_map()
        write_json_atomic(path, {"device": dev})
        return dev

    def _watchers(self, pool: str, image: str, secrets: Mapping[str, str]) -> list[dict[str, Any]]:
        try:
            out = run(["rbd", "status", "--format", "json", "--pool", pool, "--image", image,
                       *self._node_client_args(secrets)], timeout=self.options.opTimeout + 30).stdout
        except CommandError as e:
            if "No such file" in e.stderr or "not found" in e.stderr.lower():
                raise NotFound(f"rbd image {pool}/{image} does not exist") from None
            raise BackendUnavailable(f"cannot ask Ceph who uses {pool}/{image}: {e}") from None
        try:
            return list(json.loads(out or "{}").get("watchers", []))
        except ValueError:
            return []

    def _check_no_writer(self, pool: str, image: str, secrets: Mapping[str, str],
                         patience: float = WATCHER_PATIENCE) -> None:
        """FailedPrecondition naming the watchers when anything keeps the image open read-write.

        A watcher seen once is not yet a writer: librbd opens a clone's parent read-write for a moment whenever
        it detaches a child (a controller flattening or deleting a snapshot of this volume), and such a watch is
        gone within a second. A mapping on another node stays; so the check asks again until the watchers are
        gone or `patience` seconds have passed."""
        deadline = time.monotonic() + patience
        while True:
            watchers = self._watchers(pool, image, secrets)
            if not watchers:
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(0.25)
        who = ", ".join(f"client.{w.get('client', '?')} at {w.get('address', '?')}" for w in watchers)
        raise FailedPrecondition(f"rbd image {pool}/{image} has been held open read-write by {who} for "
                                 f"{patience:.0f}s (a mapping on another node, or a client outside the CO); unstage "
                                 "it there first, or use a reader-only or raw block multi-writer access mode")

    @staticmethod
    def _mapped(argv: list[str], pool: str, image: str) -> list[str]:
        """Every device the kernel has mapped for the image's head (several processes may each have one)."""
        try:
            out = run(argv, timeout=30).stdout
        except CommandError:
            return []
        return [m.get("device") for m in json.loads(out or "[]")
                if m.get("pool") == pool and m.get("name", m.get("image")) == image
                and m.get("snap") in (None, "", "-") and m.get("device")]

    # fuse: rbd-fuse exposes the one image as a file; a loop device over it is the block device.
    def _fuse_mountpoint(self, pool: str, image: str) -> str:
        return os.path.join(self._node_dir(), "fuse", f"{pool}.{image}")

    def _fuse_attach(self, pool: str, image: str, secrets: Mapping[str, str], readonly: bool = False,
                     multi_writer: bool = False) -> Attachment:
        from csi import loopdev
        mnt = self._fuse_mountpoint(pool, image)
        path = os.path.join(mnt, image)
        if not _is_mountpoint(mnt):
            if not readonly and not multi_writer:
                self._check_no_writer(pool, image, secrets)  # rbd-fuse always holds a watch, even for readers
            os.makedirs(mnt, exist_ok=True)
            log_file = os.path.join(self._node_dir(), f"rbd-fuse-{pool}.{image}.log")
            # attr_timeout=0: the kernel must not cache the file size, or a loop refresh after a resize sees the old one
            argv = ["rbd-fuse", mnt, "-f", "-o", "attr_timeout=0,entry_timeout=0", "-p", pool, "-r", image,
                    "--log-file", log_file,
                    *self._node_client_args(secrets)]
            with open(log_file + ".out", "ab") as out:
                # A long-running daemon, not a command: it lives in its own session so a driver restart leaves
                # staged volumes working; node_detach unmounts it, which ends it.
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            deadline = time.monotonic() + self.options.connectTimeout + 5
            while not os.path.exists(path):
                if proc.poll() is not None:
                    raise BackendUnavailable(f"rbd-fuse for {pool}/{image} exited with {proc.returncode}; "
                                             f"see {log_file}")
                if time.monotonic() > deadline:
                    proc.kill()
                    with contextlib.suppress(CommandError):
                        run(["umount", "-l", mnt])
                    raise DeadlineExceeded(f"rbd-fuse did not expose {pool}/{image} within "
                                           f"{self.options.connectTimeout + 5:.0f}s; see {log_file}")
                time.sleep(0.05)
        dev = loopdev.attach(path, direct_io=False, read_only=readonly)
        return Attachment(device=dev, data={"mounter": "fuse", "pool": pool, "image": image, "mountpoint": mnt,
                                            "path": path, "readonly": readonly})

    def _fuse_detach(self, attachment: Attachment) -> None:
        from csi import loopdev
        path, mnt = attachment.data.get("path", ""), attachment.data.get("mountpoint", "")
        for _ in range(8):
            dev = loopdev.find(path) if path else None
            if not dev:
                break
            loopdev.detach(dev)
        daemons = _fuse_daemons(mnt) if mnt else []
        if mnt and _is_mountpoint(mnt):
            deadline = time.monotonic() + 10
            while True:
                try:
                    run(["umount", mnt], timeout=30)
                    break
                except CommandError:
                    if time.monotonic() > deadline:
                        run(["umount", "-l", mnt], timeout=30)
                        break
                    time.sleep(0.1)  # the loop device lets go of the file asynchronously
        # The daemon closes the image (and so drops its watch) as it exits, a moment after the unmount: a
        # DeleteVolume right after the unstage would otherwise meet that watch and answer "still in use".
        _wait_gone(daemons, timeout=15.0)
        if mnt:
            with contextlib.suppress(OSError):
                os.rmdir(mnt)

    # ---- changed-block tracking (backends/rbd_diff.py) ------------------------------------------------------
    def metadata_block_size(self) -> Optional[int]:
        from .rbd_diff import BLOCK
        return BLOCK

    def _snapshot_reader(self, local_id: str, secrets: Mapping[str, str]) -> tuple[Any, int]:
        """(a function opening the snapshot's image read-only, its size); NotFound for no finished snapshot."""
        self.get_snapshot(local_id, secrets)
        pool, image = self._split(local_id, SNAP_PREFIX) or ("", "")
        conn = self._conn(secrets)
        what = f"snapshot {self.name}:{local_id}"

        def open_image() -> Any:
            img = self._open(conn, pool, image)
            if img is None:
                raise NotFound(f"{what} does not exist (it was deleted)")
            return img
        with self._ceph(f"read {what}", conn):
            with open_image() as img:
                return open_image, img.size()

    def allocated_ranges(self, snapshot_local_id: str, start: int, secrets: Mapping[str, str]) -> "RangeStream":
        from . import rbd_diff
        from .base import RangeStream
        opener, size = self._snapshot_reader(snapshot_local_id, secrets)
        guard = lambda: self._ceph(f"diff snapshot {self.name}:{snapshot_local_id}")  # noqa: E731
        return RangeStream(size, rbd_diff.allocated(opener, guard, size, start))

    def changed_ranges(self, base_local_id: str, target_local_id: str, start: int,
                       secrets: Mapping[str, str]) -> "RangeStream":
        from . import rbd_diff
        from .base import RangeStream
        open_base, _ = self._snapshot_reader(base_local_id, secrets)
        open_target, size = self._snapshot_reader(target_local_id, secrets)
        guard = lambda: self._ceph(f"diff snapshots {self.name}:{base_local_id} and {target_local_id}")  # noqa: E731
        return RangeStream(size, rbd_diff.changed(open_base, open_target, guard, size, start))

    # ---- group snapshots (backends/rbd_group.py: a temporary RBD group, one group snapshot, member copies) -------
    def group_local_id_for_name(self, name: str) -> Optional[str]:
        from . import rbd_group
        return rbd_group.group_local_id(self, name)

    def create_group_snapshot(self, name: str, source_local_ids: list[str], parameters: Mapping[str, str],
                              secrets: Mapping[str, str]) -> "GroupSnapshot":
        from . import rbd_group
        return rbd_group.create(self, name, source_local_ids, parameters, secrets)

    def delete_group_snapshot(self, local_id: str, secrets: Mapping[str, str]) -> None:
        from . import rbd_group
        rbd_group.delete(self, local_id, secrets)

    def get_group_snapshot(self, local_id: str, secrets: Mapping[str, str]) -> "GroupSnapshot":
        from . import rbd_group
        return rbd_group.get(self, local_id, secrets)


def _trash_remove(io: Any, image_id: str) -> None:
    """Delete an image from the trash. One whose move into the trash was interrupted is left in state MOVING,
    which librbd refuses to delete (EUCLEAN); nobody is moving it any more, so set it back to NORMAL first (the
    RBD class' own `trash_state_set`, guarded by the expected state) and delete it then."""
    import errno
    import rbd
    try:
        rbd.RBD().trash_remove(io, image_id, force=True)
        return
    except rbd.ImageNotFound:
        return
    except rbd.OSError as e:
        if e.errno != errno.EUCLEAN:
            raise
    enc = struct.pack("<I", len(image_id)) + image_id.encode()
    io.execute("rbd_trash", "rbd", "trash_state_set", enc + bytes([0, 1]))  # NORMAL, expecting MOVING
    with contextlib.suppress(rbd.ImageNotFound):
        rbd.RBD().trash_remove(io, image_id, force=True)


def _header_snap_names(io: Any, header: str) -> set[str]:
    """Names of the snapshots recorded in an image's header object, read with the `rbd` object class
    (get_snapcontext, then get_snapshot_name per id) instead of through an image handle. Clone v2 renames a
    snapshot it keeps for children to a UUID in the trash namespace, so a user snapshot's name shows only while
    it is a user snapshot."""
    import rados
    _, raw = io.execute(header, "rbd", "get_snapcontext", b"", length=1 << 16)
    count = struct.unpack_from("<I", raw, 8)[0]  # seq (u64), then the snapshot ids (u32 count, u64 each)
    names = set()
    for snap_id in struct.unpack_from(f"<{count}Q", raw, 12):
        try:
            _, enc = io.execute(header, "rbd", "get_snapshot_name", struct.pack("<Q", snap_id))
        except rados.ObjectNotFound:
            continue  # removed between the two reads
        names.add(enc[4:4 + struct.unpack_from("<I", enc)[0]].decode(errors="replace"))
    return names


def _user_snaps(img: Any) -> list[str]:
    """Names of the image's own snapshots (not those clone v2 keeps in the trash namespace for its children)."""
    import rbd
    return [s["name"] for s in img.list_snaps() if s.get("namespace", rbd.RBD_SNAP_NAMESPACE_TYPE_USER)
            == rbd.RBD_SNAP_NAMESPACE_TYPE_USER]


def _is_mountpoint(path: str) -> bool:
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == path for line in f)
    except OSError:
        return False


def _device_read_only(device: str) -> bool:
    """Whether the kernel refuses writes to `device` (its /sys/class/block/<name>/ro)."""
    try:
        with open(f"/sys/class/block/{os.path.basename(os.path.realpath(device))}/ro") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def _unmap(argv: list[str]) -> None:
    try:
        run(argv, timeout=60)
    except CommandError as e:
        if "not mapped" in e.stderr or "No such" in e.stderr or "Invalid argument" in e.stderr:
            return
        raise


def _fuse_daemons(mountpoint: str) -> list[int]:
    """PIDs of the rbd-fuse processes serving `mountpoint` (their command line names it)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0]) == b"rbd-fuse" and os.fsencode(mountpoint) in argv:
            pids.append(int(entry))
    return pids


def _wait_gone(pids: list[int], timeout: float) -> None:
    """Until every process in `pids` has exited (or `timeout`); a process left running is logged, not killed."""
    deadline = time.monotonic() + timeout
    left = list(pids)
    while left and time.monotonic() < deadline:
        left = [p for p in left if os.path.exists(f"/proc/{p}") and not _zombie(p)]
        if left:
            time.sleep(0.05)
    if left:
        log.warning("rbd-fuse %s still running %.0fs after its unmount", left, timeout)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


BACKEND = RbdBackend
