"""The CSI SnapshotMetadata service (changed-block tracking): GetMetadataAllocated and GetMetadataDelta.

Both RPCs stream. A backend hands back its extents as a lazy iterator (`Backend.allocated_ranges`,
`Backend.changed_ranges`, helpers in backends/range_diff.py); here they are cut into messages of at most
`max_results` tuples (DEFAULT_MAX_RESULTS when the caller leaves it 0, never more than MAX_RESULTS), so a 1 TiB
volume streams with the memory of one message. Every message says VARIABLE_LENGTH: each tuple is an extent aligned
to the backend's `metadata_block_size`, adjacent blocks merged (a sequentially written volume is one tuple).

Rules from the spec, and where each is kept:
- `starting_offset` negative or past the volume's size → OUT_OF_RANGE; no tuple ends at or before it; the first
  tuple may start at the block holding it (so a resumed stream repeats at most part of one block).
- Unknown or malformed snapshot IDs → NOT_FOUND; a missing ID or a negative `max_results` → INVALID_ARGUMENT;
  two snapshots of different volumes → INVALID_ARGUMENT (a delta is defined between snapshots of one volume).
- A backend that cannot tell allocated or changed blocks → FAILED_PRECONDITION ("changed block tracking is not
  enabled": the caller makes a full backup). The service is only registered and advertised when at least one
  backend can.
- An error mid-stream aborts the stream with its code (never a clean end), so the caller can tell "all metadata
  received" from "interrupted" and resume with `starting_offset`.

The security token: Kubernetes clients call the external-snapshot-metadata sidecar, which authenticates them
(TokenReview of the `security_token` in its own API) and authorises them against the snapshots; the sidecar then
calls this service over the plugin's unix socket with the CSI messages above, which carry no token. What a plugin
does receive is `secrets` (the snapshot class's secrets), marked `csi_secret`: passed to the backend (RBD
credentials), never logged — the per-call log line names IDs and offsets only, and an INTERNAL error's request
rendering goes through csi.redact.

Locks: each call holds a *shared* claim on every snapshot it reads (csi/locks.py) for as long as it streams, so a
DeleteSnapshot of it meanwhile is ABORTED (the sidecar retries later) rather than pulling the data from under a
backup; reads of one snapshot run side by side. A cancelled stream closes its generator and gives the claims back.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import grpc

from backends.base import Backend, RangeStream
from backends.errors import FailedPrecondition, InvalidArgument, OutOfRange, clip
from backends.locking import Operation

from ._pb import csi_pb2 as pb
from ._pb import csi_pb2_grpc as rpc
from .errors import status_for
from .ids import ObjectId, parse_id
from .interceptors import LATENCY, REQUESTS, decode
from .locks import KeyedLocks, snapshot_key
from .redact import safe_bounded_dict
from .registry import Backends

log = logging.getLogger("tessera.rpc")

DEFAULT_MAX_RESULTS = 256  # tuples per message when the caller leaves max_results 0
MAX_RESULTS = 4096  # tuples per message at most, whatever the caller asks (the spec lets us send fewer)
Range = tuple[int, int]
VARIABLE_LENGTH = pb.BlockMetadataType.Value("VARIABLE_LENGTH")


def supported(backends: Iterable[Backend]) -> bool:
    """Whether any configured backend can answer (then the service is registered and advertised)."""
    return any(b.metadata_block_size() is not None for b in backends)


def batches(ranges: Iterable[Range], max_results: int) -> Iterator[list[Range]]:
    """`ranges` cut into lists of at most `max_results` (0: DEFAULT_MAX_RESULTS; capped at MAX_RESULTS)."""
    size = min(max_results or DEFAULT_MAX_RESULTS, MAX_RESULTS)
    batch: list[Range] = []
    for r in ranges:
        batch.append(r)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class SnapshotMetadataOps:
    """The service's logic, free of gRPC: validation, claims, and the backend's stream cut into batches."""

    def __init__(self, backends: Backends, locks: Optional[KeyedLocks] = None) -> None:
        self.backends = backends
        self.locks = locks or KeyedLocks()

    def _snapshot(self, raw_id: str, field: str) -> tuple[Backend, ObjectId]:
        if not raw_id:
            raise InvalidArgument(f"{field} is required")
        oid = parse_id(raw_id, "snapshot")
        backend = self.backends.for_id(oid.backend, f"snapshot {raw_id!r}")
        if backend.metadata_block_size() is None:
            raise FailedPrecondition(
                f"backend {backend.name!r} ({backend.type_name}) does not track allocated or changed blocks of "
                f"snapshots; make a full backup of snapshot {raw_id!r} instead")
        return backend, oid

    @staticmethod
    def _check_request(starting_offset: int, max_results: int) -> None:
        if max_results < 0:
            raise InvalidArgument(f"max_results must not be negative (got {max_results})")
        if starting_offset < 0:
            raise OutOfRange(f"starting_offset must not be negative (got {starting_offset})")

    @staticmethod
    def _stream(stream: RangeStream, starting_offset: int, max_results: int,
                what: str) -> Iterator[tuple[int, list[Range]]]:
        if starting_offset > stream.capacity_bytes:
            close = getattr(stream.ranges, "close", None)
            if close:
                close()
            raise OutOfRange(f"starting_offset {starting_offset} is past the end of {what} "
                             f"({stream.capacity_bytes} bytes)")
        sent = False
        for batch in batches(stream.ranges, max_results):
            sent = True
            yield stream.capacity_bytes, batch
        if not sent:  # one message even when nothing is allocated or changed: it carries the volume's size
            yield stream.capacity_bytes, []

    def allocated(self, snapshot_id: str, starting_offset: int, max_results: int,
                  secrets: Mapping[str, str]) -> Iterator[tuple[int, list[Range]]]:
        """(volume capacity, extents) messages for GetMetadataAllocated."""
        self._check_request(starting_offset, max_results)
        backend, oid = self._snapshot(snapshot_id, "snapshot_id")
        with self.locks.operation(Operation("GetMetadataAllocated", snapshot_id), shared=[snapshot_key(snapshot_id)],
                                  provider=backend.operation_lock_provider()):
            stream = backend.allocated_ranges(oid.local, starting_offset, secrets)
            yield from self._stream(stream, starting_offset, max_results, f"snapshot {snapshot_id}")

    def delta(self, base_id: str, target_id: str, starting_offset: int, max_results: int,
              secrets: Mapping[str, str]) -> Iterator[tuple[int, list[Range]]]:
        """(volume capacity, extents) messages for GetMetadataDelta."""
        self._check_request(starting_offset, max_results)
        backend, base = self._snapshot(base_id, "base_snapshot_id")
        target_backend, target = self._snapshot(target_id, "target_snapshot_id")
        if target_backend is not backend:
            raise InvalidArgument(f"base snapshot {base_id!r} and target snapshot {target_id!r} live in different "
                                  "backends, so they are not snapshots of one volume")
        base_snap = backend.get_snapshot(base.local, secrets)
        target_snap = backend.get_snapshot(target.local, secrets)
        if base_snap.source_volume_local_id != target_snap.source_volume_local_id:
            raise InvalidArgument(
                f"base snapshot {base_id!r} is of volume {backend.name}:{base_snap.source_volume_local_id} and target "
                f"snapshot {target_id!r} of volume {backend.name}:{target_snap.source_volume_local_id}; a delta needs "
                "two snapshots of the same volume")
        with self.locks.operation(Operation("GetMetadataDelta", target_id, "to"),
                                  shared=[snapshot_key(base_id), snapshot_key(target_id)],
                                  provider=backend.operation_lock_provider()):
            stream = backend.changed_ranges(base.local, target.local, starting_offset, secrets)
            yield from self._stream(stream, starting_offset, max_results,
                                    f"target snapshot {target_id}")


def _blocks(batch: list[Range]) -> list["pb.BlockMetadata"]:
    return [pb.BlockMetadata(byte_offset=o, size_bytes=n) for o, n in batch]


class SnapshotMetadataService(rpc.SnapshotMetadataServicer):
    """The servicer. Register it with `add_to_server` (not the generated function), so requests reach it as bytes
    and are parsed inside the call, as the unary interceptor does for every other RPC (csi/interceptors.py): bytes
    protobuf cannot parse are then INVALID_ARGUMENT, logged and counted, instead of grpc's bare INTERNAL."""

    def __init__(self, ops: SnapshotMetadataOps) -> None:
        self.ops = ops

    def GetMetadataAllocated(self, request, context):
        def start(req: Any) -> tuple[Iterator[tuple[int, list[Range]]], Callable[[int, list[Range]], Any]]:
            return (self.ops.allocated(req.snapshot_id, req.starting_offset, req.max_results, req.secrets),
                    lambda cap, batch: pb.GetMetadataAllocatedResponse(
                        block_metadata_type=VARIABLE_LENGTH, volume_capacity_bytes=cap, block_metadata=_blocks(batch)))
        return _served("GetMetadataAllocated", pb.GetMetadataAllocatedRequest, request, context, start,
                       ("snapshot_id",))

    def GetMetadataDelta(self, request, context):
        def start(req: Any) -> tuple[Iterator[tuple[int, list[Range]]], Callable[[int, list[Range]], Any]]:
            return (self.ops.delta(req.base_snapshot_id, req.target_snapshot_id, req.starting_offset,
                                   req.max_results, req.secrets),
                    lambda cap, batch: pb.GetMetadataDeltaResponse(
                        block_metadata_type=VARIABLE_LENGTH, volume_capacity_bytes=cap, block_metadata=_blocks(batch)))
        return _served("GetMetadataDelta", pb.GetMetadataDeltaRequest, request, context, start,
                       ("base_snapshot_id", "target_snapshot_id"))


def add_to_server(service: SnapshotMetadataService, server: grpc.Server) -> None:
    """Register the service with raw-bytes request handlers (see SnapshotMetadataService)."""
    handlers = {
        "GetMetadataAllocated": grpc.unary_stream_rpc_method_handler(
            service.GetMetadataAllocated, request_deserializer=None,
            response_serializer=pb.GetMetadataAllocatedResponse.SerializeToString),
        "GetMetadataDelta": grpc.unary_stream_rpc_method_handler(
            service.GetMetadataDelta, request_deserializer=None,
            response_serializer=pb.GetMetadataDeltaResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("csi.v1.SnapshotMetadata", handlers),))


def _served(method: str, request_cls: Any, raw: Any, context: grpc.ServicerContext,
            start: Callable[[Any], tuple[Iterator[tuple[int, list[Range]]], Callable[[int, list[Range]], Any]]],
            id_fields: tuple[str, ...]) -> Iterator[Any]:
    """The stream as gRPC sends it, with what the unary interceptor (csi/interceptors.py, which wraps unary calls
    only) does for the others: the request parsed here (bad bytes: INVALID_ARGUMENT), typed errors mapped to codes
    (csi/errors.py), INTERNAL logged with its traceback, one log line and the request metrics per call. Secrets are
    never part of the line."""
    began = time.monotonic()
    code, message = grpc.StatusCode.OK, ""
    sent = tuples = 0
    request: Any = None
    messages: Optional[Iterator[tuple[int, list[Range]]]] = None
    try:
        request = decode(request_cls.FromString, raw)
        messages, build = start(request)
        for cap, batch in messages:
            yield build(cap, batch)
            sent += 1
            tuples += len(batch)
    except GeneratorExit:  # the caller went away: the claims are given back as `messages` closes
        code = grpc.StatusCode.CANCELLED
        if messages is not None:
            messages.close()  # type: ignore[attr-defined]
        raise
    except Exception as exc:  # every failure path: the stream must end in an error, never a clean end
        code, message = status_for(exc)
        if code == grpc.StatusCode.INTERNAL:
            rendered = clip(json.dumps(safe_bounded_dict(request), default=str), 4096) if request is not None else "?"
            log.exception("error in %s: %s", method, rendered)
        context.abort(code, message)
    finally:
        elapsed = time.monotonic() - began
        REQUESTS.labels(method, code.name).inc()
        LATENCY.labels(method, code.name).observe(elapsed)
        fields: dict[str, Any] = {"method": method}
        if request is not None:
            fields.update({f: clip(getattr(request, f), 256) for f in id_fields if getattr(request, f)})
            fields.update(starting_offset=request.starting_offset, max_results=request.max_results)
        fields.update(messages=sent, ranges=tuples, duration_ms=round(elapsed * 1000, 2), code=code.name)
        if message:
            fields["message"] = message
        log.log(logging.INFO if code in (grpc.StatusCode.OK, grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED)
                else logging.WARNING, json.dumps(fields))
