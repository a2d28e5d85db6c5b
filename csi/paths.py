"""Checks on paths that arrive in requests, before anything is created or mounted there."""
from __future__ import annotations

import os
from typing import Sequence

from backends.errors import InvalidArgument

MAX_PATH = 4000


def check_path(path: str, field: str, allowed_prefixes: Sequence[str] = ()) -> str:
    """Return the path if it is absolute, normalized (no `..`, `.`, `//`) and, when the operator restricted them,
    under an allowed prefix. Refusing non-normalized paths (rather than normalizing them) means the path we act on
    is exactly the one the CO named."""
    if not path:
        raise InvalidArgument(f"{field} is required")
    if "\x00" in path or len(path) > MAX_PATH:
        raise InvalidArgument(f"{field} is not a usable path")
    if not os.path.isabs(path):
        raise InvalidArgument(f"{field} {path!r} must be an absolute path")
    trimmed = path.rstrip("/") or "/"
    if os.path.normpath(trimmed) != trimmed or "/../" in path + "/" or "/./" in path + "/":
        raise InvalidArgument(f"{field} {path!r} must be a normalized path (no '..', '.' or '//')")
    if trimmed == "/":
        raise InvalidArgument(f"{field} must not be /")
    if allowed_prefixes and not any(trimmed == p or trimmed.startswith(p.rstrip("/") + "/") for p in allowed_prefixes):
        raise InvalidArgument(f"{field} {path!r} is outside the allowed directories ({', '.join(allowed_prefixes)})")
    return trimmed
