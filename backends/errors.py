"""Typed errors that backends raise.

Backends never import grpc: they say *what* went wrong with one of these classes, and `csi/errors.py` alone decides
which gRPC status code that becomes. Every message is shown to a person (kubectl describe pvc), so it names the
object and says what to do; it never contains a secret.
"""
from __future__ import annotations

from typing import Iterable


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


# ---- bounded text -------------------------------------------------------------------------------------------------
# A message travels back to the CO in the gRPC status (a trailer: grpc-python refuses metadata over 8-16 KiB with
# RESOURCE_EXHAUSTED, which would hide the real answer) and into one log line. Anything a request supplied (IDs,
# names, paths, parameter keys) may be arbitrarily long, so messages show it through these helpers.

MAX_SHOWN = 200  # characters of one user-supplied value shown in a message
MAX_LISTED = 5  # items of a user-supplied list shown in a message


def clip(value: object, limit: int = MAX_SHOWN) -> str:
    """`value` as text, cut to `limit` characters with an ellipsis that says how much was left out."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…(+{len(text) - limit:,} characters)"


def shown(value: object, limit: int = MAX_SHOWN) -> str:
    """`repr` of a user-supplied string, clipped (quotes make empty and odd values visible)."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + f"…(+{len(text) - limit:,} characters)"


def listing(items: Iterable[object], limit: int = MAX_LISTED) -> str:
    """'a, b, c' — or 'a, b, c, d, e and 9,995 more' — sorted, each item clipped."""
    names = sorted(str(i) for i in items)
    head = ", ".join(clip(n, 64) for n in names[:limit])
    rest = len(names) - limit
    return f"{head} and {rest:,} more" if rest > 0 else head
