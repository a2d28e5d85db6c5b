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
    import os_brick.privileged

    # iscsiadm locks its node database under /run/lock/iscsi; open-iscsi's tmpfiles.d makes it at boot, but a
    # container (or a node booted without systemd) starts with an empty /run.
    os.makedirs("/run/lock/iscsi", exist_ok=True)
    lock_dir = os.path.join(state_dir, "iscsi-locks")
    os.makedirs(lock_dir, exist_ok=True)
    lockutils.set_defaults(lock_dir)
    os_brick.privileged.default.set_client_mode(False)  # we are root already: no privsep-helper daemon
    # os-brick's debug logs carry connection properties (it masks passwords, but keep them out regardless)
    logging.getLogger("os_brick").setLevel(logging.INFO)
    import os_brick
    from oslo_config import cfg
    os_brick.setup(cfg.CONF)
    from os_brick.initiator.connectors.iscsi import ISCSIConnector
    return ISCSIConnector(root_helper="", use_multipath=multipath, device_scan_attempts=5)
