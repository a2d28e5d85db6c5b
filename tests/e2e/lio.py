"""Helpers for in-guest iSCSI tests: is LIO usable here, and a tessera config for the iscsi backend on LIO."""
from __future__ import annotations

import os
from typing import Optional

import yaml

LIO_PREFIX = "iqn.2026-11.dev.tessera.e2e"


def lio_available() -> bool:
    """True when this kernel can run the LIO iSCSI target and the open-iscsi initiator (the e2e guest)."""
    return (os.path.isdir("/sys/kernel/config/target") and os.path.isdir("/sys/module/iscsi_target_mod")
            and os.path.isdir("/sys/module/iscsi_tcp") and os.path.exists("/etc/iscsi/initiatorname.iscsi"))


def write_config(path: str, *, vg: Optional[str] = None, thin_pool: Optional[str] = None,
                 directory: Optional[str] = None, name: str = "san", **extra) -> str:
    store = {"lvm": {"volumeGroup": vg, **({"thinPool": thin_pool} if thin_pool else {})}} if vg else \
        {"file": {"directory": directory}}
    opts = {"type": "iscsi", "portals": ["127.0.0.1:3260"], "iqnPrefix": LIO_PREFIX, "targetDriver": "lio",
            "backingStore": store, **extra}
    with open(path, "w") as f:
        yaml.safe_dump({"backends": {name: opts}}, f)
    return path
