"""Backend registry: type name → implementing module, imported only when a config uses it.

Lazy import keeps `tessera-csi` (and the FlexVolume shim's `init`) fast and lets a node without librbd run the
other backends. Adding a backend is one module plus one line here.
"""
from __future__ import annotations

import importlib

from .base import Backend

_MODULES: dict[str, str] = {
    "file": "backends.file",
    "rbd": "backends.rbd",
    "lvm": "backends.lvm",
    "iscsi": "backends.iscsi",
}


def backend_types() -> list[str]:
    return sorted(_MODULES)


def backend_class(type_name: str) -> type[Backend]:
    """The Backend subclass for a type name; KeyError for an unknown type, ImportError if its libraries are missing."""
    module = importlib.import_module(_MODULES[type_name])
    cls = getattr(module, "BACKEND")
    assert cls.type_name == type_name, f"{module.__name__}.BACKEND has type {cls.type_name!r}"
    return cls
