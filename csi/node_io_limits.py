"""Node-enforced I/O limits (backends/io_limits.py) for one published target: put in place at NodePublishVolume,
brought up to date at NodeGetVolumeStats (kubelet asks for every mounted volume about once a minute, so a
ControllerModifyVolume reaches a running pod within that), lifted at NodeUnpublishVolume.

What the node touches: the `io.max` file of the cgroup of the pod the publish request names
(`csi.storage.k8s.io/pod.uid`, kubelet's podInfoOnMount), and in it only the line of the device the pod reads and
writes — the volume's staged device, or the read-only view the plugin made for a read-only block publish. The
pod's UID is recorded with the target, so the later calls touch the same cgroup and no other.

A limit that cannot be put in place (no cgroup v2, the pod's cgroup not found, the io controller off for it) never
fails the publish: the pod gets its volume, the log says why the limit is not enforced, and NodeGetVolumeStats's
volume condition carries the reason (a message; the volume itself is healthy).
"""
from __future__ import annotations

import logging
from typing import Mapping, Optional

from backends import io_limits
from backends.base import Attachment, Backend
from backends.io_limits import NotApplied

log = logging.getLogger(__name__)

POD_KEY = "pod_uid"          # in the target's record entry: the pod whose cgroup holds the limit
STATE_KEY = "io_max"         # the line last written ("" once lifted), or the reason it is not in place
PROBLEM_KEY = "io_max_problem"


def device_of(entry: Mapping, staged_rdev: int) -> int:
    """The device number the pod's I/O reaches: the read-only view of a read-only block publish, else the staged
    device."""
    return int(entry.get("view_rdev") or staged_rdev)


def _state(entry: Mapping) -> tuple:
    return entry.get(POD_KEY), entry.get(STATE_KEY), entry.get(PROBLEM_KEY)


def enforce(backend: Backend, local_id: str, entry: dict, staged_rdev: int, attachment: Optional[Attachment],
            context: Mapping[str, str] = {}, root: str = io_limits.CGROUP_ROOT) -> bool:
    """Put the volume's current limits in place for the target's pod (the pod from `context` at publish, the one
    recorded after). Returns whether the entry changed (the caller saves the record)."""
    before = _state(entry)
    pod = entry.get(POD_KEY) or context.get(io_limits.POD_UID_KEY, "")
    try:
        limits = io_limits.limits_of(backend.node_io_limits(local_id, attachment))
    except Exception as e:  # noqa: BLE001 - the storage unreachable now: keep what is in place, say why
        entry[PROBLEM_KEY] = f"I/O limits not refreshed: {e}"[:500]
        return True
    if not pod:
        if limits:
            entry[PROBLEM_KEY] = ("I/O limits are set but not enforced: the publish named no pod "
                                  "(the CSIDriver needs podInfoOnMount: true)")
        else:
            entry.pop(PROBLEM_KEY, None)
        return before != _state(entry)
    entry[POD_KEY] = pod
    rdev = device_of(entry, staged_rdev)
    line = io_limits.io_max_line(rdev, limits) if limits else ""
    if line == entry.get(STATE_KEY, "") and PROBLEM_KEY not in entry:
        return before != _state(entry)  # in place already (or never limited): no cgroup walk, no write
    try:
        io_limits.write(io_limits.pod_cgroup(pod, root), rdev, limits)
        entry[STATE_KEY] = line
        entry.pop(PROBLEM_KEY, None)
    except (NotApplied, OSError) as e:
        reason = f"I/O limits not enforced: {e}"
        if entry.get(PROBLEM_KEY) != reason:
            log.warning("volume %s: %s", local_id, reason)
        entry[PROBLEM_KEY] = reason
    return before != _state(entry)


def lift(entry: Mapping, staged_rdev: Optional[int], root: str = io_limits.CGROUP_ROOT) -> None:
    """At unpublish: the device's line in the pod's cgroup back to no limit, if the plugin wrote one and the cgroup
    is still there (a pod being torn down keeps its cgroup a while; the device number may be reused later)."""
    pod = entry.get(POD_KEY)
    if not pod or not entry.get(STATE_KEY) or staged_rdev is None:
        return
    try:
        io_limits.write(io_limits.pod_cgroup(pod, root), device_of(entry, staged_rdev), {})
    except (NotApplied, OSError) as e:
        log.info("lifting the I/O limit of pod %s: %s (left as it is)", pod, e)


def problem(entry: Mapping) -> str:
    return str(entry.get(PROBLEM_KEY, ""))

