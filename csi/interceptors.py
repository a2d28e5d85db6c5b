"""Cross-cutting RPC behaviour in one interceptor: request decoding, one structured log line per call, Prometheus
metrics, and the mapping of typed errors to gRPC status codes (via csi.errors). An unexpected exception becomes
INTERNAL with its traceback logged; it never reaches grpc's own handler or kills the server.

Why the interceptor decodes requests itself: grpc-python's default deserializer turns a request protobuf cannot
parse (say a `string` field holding bytes that are not UTF-8) into INTERNAL "Exception deserializing request!"
before any plugin code runs, so the caller gets the wrong code and the plugin neither logs nor counts the call. Here
the method handlers are given raw bytes and the generated message class parses them inside the call, so such a
request is INVALID_ARGUMENT with a message, logged and counted like any other. The bytes on the wire are the same.

Log lines are bounded: IDs and paths are clipped, the request rendering is cut, the traceback of an INTERNAL is
kept to its last few kB. One hostile request must not cost megabytes of log."""
from __future__ import annotations

import json
import logging
import time
import traceback
from typing import Any, Callable, Optional

import grpc
from prometheus_client import Counter, Histogram

from backends.errors import InvalidArgument, clip

from . import memtrim
from .errors import status_for
from .redact import safe_bounded_dict

log = logging.getLogger("tessera.rpc")

REQUESTS = Counter("tessera_csi_requests_total", "CSI requests handled", ["method", "code"])
LATENCY = Histogram("tessera_csi_request_duration_seconds", "CSI request latency", ["method", "code"],
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))

_ID_FIELDS = ("volume_id", "source_volume_id", "snapshot_id", "name", "node_id", "staging_target_path",
              "target_path", "volume_path")
MAX_FIELD = 256  # characters of one ID or path in the per-call log line
MAX_RENDER = 4096  # characters of a rendered request (error and debug lines)
MAX_TRACEBACK = 4096  # characters of a logged traceback (its end: where it failed)


def _ids(request: Any) -> dict[str, str]:
    out = {}
    for f in _ID_FIELDS:
        v = getattr(request, f, None)
        if v:
            out[f] = clip(v, MAX_FIELD)
    return out


def _render(request: Any) -> str:
    try:
        return clip(json.dumps(safe_bounded_dict(request), default=str), MAX_RENDER)
    except Exception:  # logging must never turn one failure into another
        return '"<unrenderable request>"'


def _traceback(exc: BaseException) -> str:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip("\n")
    if len(text) <= MAX_TRACEBACK:
        return text
    return f"…({len(text) - MAX_TRACEBACK:,} characters left out)\n" + text[-MAX_TRACEBACK:]


def _message_name(deserializer: Optional[Callable]) -> str:
    cls = getattr(deserializer, "__self__", None)
    descriptor = getattr(cls, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", "") or "request message"


def decode(deserializer: Optional[Callable], raw: Any) -> Any:
    """The request message parsed from its wire bytes; InvalidArgument when protobuf cannot parse them."""
    if deserializer is None or not isinstance(raw, (bytes, bytearray, memoryview)):
        return raw
    try:
        return deserializer(bytes(raw))
    except Exception as exc:  # protobuf raises DecodeError, and on some versions other types, for bad input
        raise InvalidArgument(
            f"the request ({len(raw):,} bytes) is not a valid {_message_name(deserializer)}: "
            f"{clip(str(exc), 200)} (a string field holding bytes that are not UTF-8, or a malformed message)"
        ) from None


def _decoding_stream(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A server-streaming method (SnapshotMetadata, health Watch) decodes its request here too; its servicer logs,
    counts and maps errors itself (csi/snapshot_metadata.py), so only an undecodable request is logged and counted
    here."""
    inner, deserializer = handler.unary_stream, handler.request_deserializer

    def wrapped(raw: Any, context: grpc.ServicerContext) -> Any:
        start = time.monotonic()
        try:
            request = decode(deserializer, raw)
        except InvalidArgument as exc:
            code, message = status_for(exc)
            REQUESTS.labels(method, code.name).inc()
            LATENCY.labels(method, code.name).observe(time.monotonic() - start)
            log.warning(json.dumps({"method": method, "duration_ms": round((time.monotonic() - start) * 1000, 2),
                                    "code": code.name, "message": message}))
            context.abort(code, message)
        yield from inner(request, context)

    return grpc.unary_stream_rpc_method_handler(wrapped, request_deserializer=None,
                                                response_serializer=handler.response_serializer)


class RpcInterceptor(grpc.ServerInterceptor):
    """grpc asks for the handler of every call; the wrapped handler of a method is built once and kept (the
    services' methods are fixed when the server starts, so the kept set is bounded; a method no service has is
    answered UNIMPLEMENTED by grpc and never kept, so made-up names cannot grow it)."""

    def __init__(self) -> None:
        self._wrapped: dict[str, Any] = {}

    def intercept_service(self, continuation, handler_call_details):
        path = handler_call_details.method
        kept = self._wrapped.get(path)
        if kept is not None:
            return kept
        handler = continuation(handler_call_details)
        wrapped = self._wrap(handler, path.rsplit("/", 1)[-1])
        if handler is not None:
            self._wrapped[path] = wrapped
        return wrapped

    def _wrap(self, handler: Any, method: str) -> Any:
        if handler is not None and handler.unary_stream is not None and handler.request_deserializer is not None:
            return _decoding_stream(method, handler)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        deserializer = handler.request_deserializer

        def wrapped(raw: Any, context: grpc.ServicerContext) -> Any:
            start = time.monotonic()
            code, message = grpc.StatusCode.OK, ""
            request: Any = None
            try:
                request = decode(deserializer, raw)
                return inner(request, context)
            except Exception as exc:  # every failure path goes through here
                code, message = status_for(exc)
                if code == grpc.StatusCode.INTERNAL:
                    log.error("error in %s: %s\n%s", method, _render(request), _traceback(exc))
                context.abort(code, message)
            finally:
                ended = time.monotonic()
                elapsed = ended - start
                memtrim.note_call(ended)
                REQUESTS.labels(method, code.name).inc()
                LATENCY.labels(method, code.name).observe(elapsed)
                fields = {"method": method, **_ids(request), "duration_ms": round(elapsed * 1000, 2),
                          "code": code.name}
                if message:
                    fields["message"] = message
                log.log(logging.INFO if code in (grpc.StatusCode.OK, grpc.StatusCode.ABORTED) else logging.WARNING,
                        json.dumps(fields))
                if log.isEnabledFor(logging.DEBUG) and request is not None:
                    log.debug('{"method": "%s", "request": %s}', method, _render(request))

        # request_deserializer=None: grpc hands `wrapped` the raw bytes, which `decode` parses (see the docstring)
        return grpc.unary_unary_rpc_method_handler(wrapped, request_deserializer=None,
                                                   response_serializer=handler.response_serializer)
