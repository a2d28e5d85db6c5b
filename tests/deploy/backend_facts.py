"""What the code reads, in one place: StorageClass parameters, CSI secret keys, the reserved provisioner keys.

Everything here is taken from the code itself (csi.constants, the backend registry and the backend modules), so
the deploy files are checked against what the plugin really accepts, not against a copy that can drift.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Mapping

from backends import backend_class, backend_types  # noqa: F401  (re-exported for the tests)
from backends.base import Features
from backends.errors import InvalidArgument
from csi import constants

# Parameter prefix external-provisioner owns: it consumes these keys itself (fstype, secret references) and never
# passes them to CreateVolume; --extra-create-metadata adds constants.EXTRA_METADATA_PARAMS under the same prefix.
RESERVED_PREFIX = "csi.storage.k8s.io/"
SECRET_KINDS_PROVISIONER = ("provisioner", "controller-publish", "node-stage", "node-publish",
                            "controller-expand", "node-expand")
RESERVED_SC_KEYS = frozenset(
    {f"{RESERVED_PREFIX}fstype"}
    | {f"{RESERVED_PREFIX}{k}-secret-{f}" for k in SECRET_KINDS_PROVISIONER for f in ("name", "namespace")})
RESERVED_SNAPSHOT_KEYS = frozenset({f"{RESERVED_PREFIX}snapshotter-secret-{f}" for f in ("name", "namespace")})


def backend_module(type_name: str) -> ModuleType:
    """The module implementing a backend type (fails when the registry names a module that cannot load)."""
    return importlib.import_module(backend_class(type_name).__module__)


def validate_sc_parameters(type_name: str, parameters: Mapping[str, str]) -> None:
    """Run the backend's own validate_parameters on what CreateVolume would receive from this StorageClass.

    The provisioner strips the reserved keys; the controller pops `backend` and the extra-create-metadata keys
    (csi/controllerops.py). validate_parameters checks parameters only, so it runs on a bare instance: no
    connection to storage is made. Raises InvalidArgument for a parameter the backend does not read."""
    params = {k: v for k, v in parameters.items() if not k.startswith(RESERVED_PREFIX)}
    params.pop(constants.PARAM_BACKEND, None)
    cls = backend_class(type_name)
    cls.validate_parameters(cls.__new__(cls), params)


def backend_features(cfg: Any) -> Features:
    """The Features a configured backend (csi.config.BackendConfig) reports, from a bare instance holding its
    options: features() reads options only, so no connection to storage is made."""
    cls = backend_class(cfg.type)
    b = cls.__new__(cls)
    b.name, b.options = cfg.name, cfg.options
    return b.features()


def secret_keys(type_name: str) -> frozenset[str]:
    """The CSI secret keys a backend reads: its module's SECRET_* string constants (rbd: userID, userKey)."""
    mod = backend_module(type_name)
    return frozenset(v for k, v in vars(mod).items() if k.startswith("SECRET_") and isinstance(v, str))


__all__ = ["InvalidArgument", "RESERVED_PREFIX", "RESERVED_SC_KEYS", "RESERVED_SNAPSHOT_KEYS", "backend_features",
           "backend_module", "backend_types", "secret_keys", "validate_sc_parameters"]
