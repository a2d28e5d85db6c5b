"""I/O limits on the node with cgroup v2 `io.max`: the mutable parameters of the node-local backends (file, lvm).

Why `io.max`: the file and LVM backends hand a pod a kernel block device (a loop device, a device-mapper LV), and
the kernel's block throttling limits what one cgroup may submit to one device. The pod's cgroup is the unit
Kubernetes gives every pod; the CO names the pod on NodePublishVolume when the CSIDriver says `podInfoOnMount`
(`csi.storage.k8s.io/pod.uid` in the volume context). The node writes one line for the volume's device into that
cgroup's `io.max`, and only there: a device number of its own volume, in the cgroup of the pod the request names.

Keys (decimal integers, 0 = no limit, the kernel's "max"): `io_max_riops`, `io_max_wiops` (read/write I/O operations
per second) and `io_max_rbps`, `io_max_wbps` (read/write bytes per second) — the kernel's own names.
"""
from __future__ import annotations

import errno
import os
import re
from typing import Mapping

from .base import MutableParameter, non_negative_int

KERNEL_KEYS = ("riops", "wiops", "rbps", "wbps")
PREFIX = "io_max_"
IO_MAX_PARAMETERS: Mapping[str, MutableParameter] = {
    PREFIX + "riops": MutableParameter("read I/O operations per second on the node (cgroup io.max; 0: none)",
                                       non_negative_int),
    PREFIX + "wiops": MutableParameter("write I/O operations per second on the node (cgroup io.max; 0: none)",
                                       non_negative_int),
    PREFIX + "rbps": MutableParameter("read bytes per second on the node (cgroup io.max; 0: none)", non_negative_int),
    PREFIX + "wbps": MutableParameter("write bytes per second on the node (cgroup io.max; 0: none)", non_negative_int),
}
POD_UID_KEY = "csi.storage.k8s.io/pod.uid"
CGROUP_ROOT = "/sys/fs/cgroup"
_UID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class NotApplied(Exception):
    """The limits could not be put in place; the message says why, for the log and the volume's condition."""


def limits_of(values: Mapping[str, str]) -> dict[str, int]:
    """The kernel keys with their limits (0 dropped: no limit) from a volume's mutable parameters."""
    out: dict[str, int] = {}
    for k in KERNEL_KEYS:
        v = values.get(PREFIX + k, "")
        if v.isdigit() and int(v) > 0:
            out[k] = int(v)
    return out


def io_max_line(rdev: int, limits: Mapping[str, int]) -> str:
    """The `io.max` line for one device: every key named, `max` where there is no limit (so a line also lifts an
    earlier limit)."""
    words = " ".join(f"{k}={limits.get(k) or 'max'}" for k in KERNEL_KEYS)
    return f"{os.major(rdev)}:{os.minor(rdev)} {words}"


def pod_cgroup(pod_uid: str, root: str = CGROUP_ROOT) -> str:
    """The cgroup v2 directory of the pod with this UID, as kubelet makes it: `kubepods*/…/*pod<uid>*` with the
    systemd driver (dashes as underscores, `kubepods-burstable-pod<uid_>.slice`) or the cgroupfs driver
    (`kubepods/burstable/pod<uid>`), at most three levels under the root. NotApplied when it is not there."""
    if not _UID.match(pod_uid):
        raise NotApplied(f"pod UID {pod_uid[:64]!r} is not a UID")
    if not os.path.exists(os.path.join(root, "cgroup.controllers")):
        raise NotApplied(f"no cgroup v2 hierarchy at {root}")
    wanted = ("pod" + pod_uid, "pod" + pod_uid.replace("-", "_"))
    level = [os.path.join(root, d) for d in _subdirs(root) if d.startswith("kubepods")]
    for _ in range(3):
        nxt: list[str] = []
        for d in level:
            name = os.path.basename(d)
            if any(w in name for w in wanted) and not os.path.islink(d):
                return d
            nxt.extend(os.path.join(d, s) for s in _subdirs(d))
        level = nxt
    raise NotApplied(f"no cgroup for pod {pod_uid} under {root}/kubepods*")


def _subdirs(path: str) -> list[str]:
    try:
        with os.scandir(path) as it:
            return sorted(e.name for e in it if e.is_dir(follow_symlinks=False))
    except OSError:
        return []


def write(cgroup: str, rdev: int, limits: Mapping[str, int]) -> None:
    """Write the device's line into the cgroup's io.max (the kernel keeps one line per device)."""
    path = os.path.join(cgroup, "io.max")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotApplied(f"{cgroup} has no io.max (the io controller is not enabled for it)") from None
    try:
        os.write(fd, io_max_line(rdev, limits).encode())
    except OSError as e:
        if e.errno in (errno.ENODEV, errno.EINVAL):
            raise NotApplied(f"the kernel refused an io.max limit for device {os.major(rdev)}:{os.minor(rdev)} "
                             f"({os.strerror(e.errno)})") from None
        raise
    finally:
        os.close(fd)


def from_rbd_qos(values: Mapping[str, str]) -> dict[str, str]:
    """librbd's QoS keys (backends/rbd_qos.py) as io.max keys, for a krbd-mapped image, which librbd's limits do not
    reach: a read or write limit as it is; a combined limit (`rbd_qos_iops_limit`, `rbd_qos_bps_limit`) for each
    direction that has none of its own — io.max has no combined limit, so reads and writes together may reach twice
    it. Bursts have no io.max counterpart and are not applied."""
    out: dict[str, str] = {}
    for unit in ("iops", "bps"):
        both = values.get(f"rbd_qos_{unit}_limit", "0")
        for direction, short in (("read", "r"), ("write", "w")):
            own = values.get(f"rbd_qos_{direction}_{unit}_limit", "0")
            value = own if own not in ("", "0") else both
            if value not in ("", "0"):
                out[f"{PREFIX}{short}{unit}"] = value
    return out
