"""Cross-cutting RPC behaviour in one interceptor: one structured log line per call, Prometheus metrics, and the
mapping of typed errors to gRPC status codes (via csi.errors). An unexpected exception becomes INTERNAL with its
traceback logged; it never reaches grpc's own handler or kills the server."""
from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable

import grpc
from prometheus_client import Counter, Histogram

from .errors import status_for
from .redact import safe_dict

log = logging.getLogger("tessera.rpc")

REQUESTS = Counter("tessera_csi_requests_total", "CSI requests handled", ["method", "code"])
LATENCY = Histogram("tessera_csi_request_duration_seconds", "CSI request latency", ["method", "code"],
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))

_ID_FIELDS = ("volume_id", "source_volume_id", "snapshot_id", "name", "node_id", "staging_target_path",
              "target_path", "volume_path")


def _ids(request: Any) -> dict[str, str]:
    out = {}
    for f in _ID_FIELDS:
        v = getattr(request, f, None)
        if v:
            out[f] = v
    return out


def _render(request: Any) -> str:
    try:
        return json.dumps(safe_dict(request), default=str)
    except Exception:  # logging must never turn one failure into another
        return '"<unrenderable request>"'


class RpcInterceptor(grpc.ServerInterceptor):
    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        inner = handler.unary_unary

        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            start = time.monotonic()
            code, message = grpc.StatusCode.OK, ""
            try:
                return inner(request, context)
            except Exception as exc:  # every failure path goes through here
                code, message = status_for(exc)
                if code == grpc.StatusCode.INTERNAL:
                    log.error("error in %s: %s", method, _render(request), exc_info=True)
                context.abort(code, message)
            finally:
                elapsed = time.monotonic() - start
                REQUESTS.labels(method, code.name).inc()
                LATENCY.labels(method, code.name).observe(elapsed)
                fields = {"method": method, **_ids(request), "duration_ms": round(elapsed * 1000, 2),
                          "code": code.name}
                if message:
                    fields["message"] = message
                log.log(logging.INFO if code in (grpc.StatusCode.OK, grpc.StatusCode.ABORTED) else logging.WARNING,
                        json.dumps(fields))
                if log.isEnabledFor(logging.DEBUG):
                    log.debug('{"method": "%s", "request": %s}', method, _render(request))

        return grpc.unary_unary_rpc_method_handler(wrapped, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)
