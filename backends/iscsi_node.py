"""os-brick set-up for the iSCSI backend's node side.

os-brick assumes an OpenStack service: privileged calls go through oslo.privsep (a helper daemon started via sudo)
and its locks need oslo.concurrency's lock_path. The node plugin already runs as root in its own container, so
privsep runs in-process (client mode off) and locks live under the plugin's state dir (shared with nothing else
on the node; os-brick's external locks keep concurrent attach/detach from racing inside this process tree).
"""
from __future__ import annotations

import logging
import os
from typing import Any


def make_connector(state_dir: str, multipath: bool) -> Any:
    from oslo_concurrency import lockutils
    from oslo_privsep import priv_context

    lock_dir = os.path.join(state_dir, "iscsi-locks")
    os.makedirs(lock_dir, exist_ok=True)
    lockutils.set_defaults(lock_dir)
    priv_context.set_client_mode(False)
    # os-brick's debug logs carry connection properties (it masks passwords, but keep them out regardless)
    logging.getLogger("os_brick").setLevel(logging.INFO)
    from os_brick.initiator.connectors.iscsi import ISCSIConnector
    return ISCSIConnector(root_helper="", use_multipath=multipath, device_scan_attempts=5)
