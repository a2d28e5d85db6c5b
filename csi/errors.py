"""The one place where typed errors become gRPC status codes."""
from __future__ import annotations

import grpc

from backends import errors as e

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


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(code, message) for an exception. Unknown exceptions become INTERNAL; the caller logs the traceback."""
    if isinstance(exc, RpcError):
        return exc.code, str(exc)
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code, str(exc) or cls.__name__
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the plugin log"
