"""Typed errors that backends raise.

Backends never import grpc: they say *what* went wrong with one of these classes, and `csi/errors.py` alone decides
which gRPC status code that becomes. Every message is shown to a person (kubectl describe pvc), so it names the
object and says what to do; it never contains a secret.
"""
from __future__ import annotations


class TesseraError(Exception):
    """Base of every error the driver raises on purpose."""


class InvalidArgument(TesseraError):
    """The request itself is wrong (missing field, bad parameter, unsupported capability)."""


class NotFound(TesseraError):
    """The named volume, snapshot, node or path does not exist."""


class AlreadyExists(TesseraError):
    """An object with this name exists but is incompatible with the request."""


class OutOfRange(TesseraError):
    """The capacity range cannot be satisfied (too small for the source, over the limit, ...)."""


class CapacityExceeded(TesseraError):
    """The backend has no room for the request (RESOURCE_EXHAUSTED)."""


class InUse(TesseraError):
    """The object is in use (published, has dependants) and the operation would harm it (FAILED_PRECONDITION)."""


class FailedPrecondition(TesseraError):
    """The system is not in a state where the operation can run (FAILED_PRECONDITION)."""


class Unsupported(TesseraError):
    """The backend does not implement this operation or option for this volume."""


class Aborted(TesseraError):
    """Another operation on the same object is in progress; the caller should retry."""


class BackendUnavailable(TesseraError):
    """The storage system cannot be reached (UNAVAILABLE); a retry later may succeed."""


class PermissionDenied(TesseraError):
    """The storage system refused the credentials."""


class DeadlineExceeded(TesseraError):
    """The storage system did not answer within the configured timeout."""


class Internal(TesseraError):
    """A bug or an unexpected state; the message says where."""
