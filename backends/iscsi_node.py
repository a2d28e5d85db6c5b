"""os-brick set-up for the iSCSI backend's node side.

os-brick assumes an OpenStack service: privileged calls go through oslo.privsep (a helper daemon started via sudo)
and its locks need oslo.concurrency's lock_path. The node plugin already runs as root in its own container, so
privsep runs in-process (client mode off) and locks live under the plugin's state dir (shared with nothing else
on the node; os-brick's external locks keep concurrent attach/detach from racing inside this process tree).
"""
from __future__ import annotations

import logging
import os
import time
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
    return ISCSIConnector(root_helper="", execute=execute, use_multipath=multipath, device_scan_attempts=5)


def execute(*cmd: str, **kwargs: Any) -> tuple[str, str]:
    """os-brick's `execute` contract (stdout, stderr; ProcessExecutionError on a disallowed exit code) on top of
    `backends.util.run`. Why not os-brick's own: oslo.concurrency forks with a preexec_fn, and a plain fork() inside
    the multi-threaded gRPC server trips gRPC's fork handlers; subprocess without preexec_fn spawns instead."""
    from oslo_concurrency.processutils import ProcessExecutionError

    from .util import run

    check = kwargs.get("check_exit_code", True)
    allowed = [0] if check is True else ([] if check is False else ([check] if isinstance(check, int) else list(check)))
    attempts = max(int(kwargs.get("attempts", 1) or 1), 1)
    env = kwargs.get("env_variables") or None
    argv = [str(c) for c in cmd]
    for attempt in range(attempts):
        proc = run(argv, check=False, timeout=float(kwargs.get("timeout") or 120.0),
                   input=kwargs.get("process_input"), env=env)
        if not allowed or proc.returncode in allowed:
            return proc.stdout, proc.stderr
        if attempt + 1 < attempts:
            time.sleep(min(0.2 * (2 ** attempt), 2.0))
    raise ProcessExecutionError(stdout=proc.stdout, stderr=proc.stderr, exit_code=proc.returncode,
                                cmd=" ".join(argv))


def set_read_only(device: str) -> None:
    """Mark a block device read-only in the kernel (BLKROSET): every later open for writing fails, whatever the
    target allows. The flag lives as long as the device: a logout removes it with the disk."""
    from .util import run

    run(["blockdev", "--setro", device], timeout=30)
