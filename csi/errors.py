"""The one place where typed errors become gRPC status codes, with messages of bounded size.

The status message travels in a trailer; grpc refuses trailers over its metadata limit (8 KiB by default) and the
client then sees RESOURCE_EXHAUSTED instead of the answer. Messages name what the request sent, which can be of any
length, so every message is cut to MAX_MESSAGE characters here, whatever raised it."""
from __future__ import annotations

import grpc

from backends import errors as e

MAX_MESSAGE = 1024  # characters; percent-encoded in the trailer, at most ~12 KiB even if every one is non-ASCII

_CODES: list[tuple[type[Exception], grpc.StatusCode]] = [
    (e.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (e.NotFound, grpc.StatusCode.NOT_FOUND),
    (e.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (e.OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
    (e.CapacityExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (e.InUse, grpc.StatusCode.FAILED_PRECONDITION),
    (e.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (e.Unsupported, grpc.StatusCode.INVALID_ARGUMENT),
    (e.Aborted, grpc.StatusCode.ABORTED),
    (e.BackendUnavailable, grpc.StatusCode.UNAVAILABLE),
    (e.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (e.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (e.Internal, grpc.StatusCode.INTERNAL),
]


class RpcError(Exception):
    """Raised by a servicer that wants a specific code not expressed by a typed error (e.g. UNIMPLEMENTED)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def bounded(message: str, limit: int = MAX_MESSAGE) -> str:
    """The message, cut to `limit` characters with a note of how much was left out."""
    return e.clip(message, limit)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(code, message) for an exception. Unknown exceptions become INTERNAL; the caller logs the traceback."""
    if isinstance(exc, RpcError):
        return exc.code, bounded(str(exc))
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code, bounded(str(exc) or cls.__name__)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the plugin log"
