"""RBD quality of service as mutable parameters (ControllerModifyVolume, VolumeAttributesClass).

librbd throttles an image's I/O itself when the image carries `rbd_qos_*` configuration: an image-level override
is image metadata named `conf_<option>` (what `rbd config image set` writes), and every librbd client that has the
image open (rbd-nbd, rbd-fuse, QEMU) re-reads it when the header changes, so a new limit takes effect at once,
without a remap. The values live on the image, like every other parameter Tessera keeps, so they survive a
controller restart and travel with no database.

The kernel client (krbd) reads none of librbd's configuration: for a krbd-mapped image the node plugin applies the
limits itself, with cgroup v2 `io.max` on the device in the pod's cgroup (backends/io_limits.py: each direction at
most its own limit or the combined one, no bursts). The volume context says who enforces (`qosEnforcement`), so an
operator reading ControllerGetVolume or the PV sees it.

Keys are the librbd option names (0 = no limit, librbd's default): `rbd_qos_{,read_,write_}{iops,bps}_limit`,
`..._burst` (a bucket above the limit) and `..._burst_seconds` (how long a burst may last, at least 1).
"""
from __future__ import annotations

from typing import Mapping

from .base import MutableParameter, non_negative_int

CONF_PREFIX = "conf_"  # librbd's image-metadata prefix for per-image configuration overrides


def _at_least_one(text: str) -> str:
    value = non_negative_int(text)
    if value == "0":
        raise ValueError("must be at least 1 (seconds)")
    return value


def _table() -> dict[str, MutableParameter]:
    out: dict[str, MutableParameter] = {}
    for direction, dwords in (("", ""), ("read_", "read "), ("write_", "write ")):
        for unit, uwords in (("iops", "I/O operations per second"), ("bps", "bytes per second")):
            base = f"rbd_qos_{direction}{unit}"
            out[base + "_limit"] = MutableParameter(f"{dwords}{uwords} limit (0: none)", non_negative_int)
            out[base + "_burst"] = MutableParameter(f"{dwords}{uwords} allowed in a burst above the limit",
                                                    non_negative_int)
            out[base + "_burst_seconds"] = MutableParameter(f"how long a {dwords}{unit} burst may last, seconds",
                                                            _at_least_one)
    return out


QOS_PARAMETERS: Mapping[str, MutableParameter] = _table()

ENFORCEMENT_KEY = "qosEnforcement"
ENFORCEMENT = {
    "krbd": "node: the kernel rbd client ignores librbd QoS, so the node limits the device in the pod's cgroup "
            "(io.max: reads and writes each at most the limit, no bursts)",
    "nbd": "librbd (rbd-nbd applies changes at once)",
    "fuse": "librbd (rbd-fuse applies changes at once)",
}


def metadata_key(key: str) -> str:
    return CONF_PREFIX + key


def from_metadata(pairs: Mapping[str, str]) -> dict[str, str]:
    """The QoS values an image's metadata holds, by mutable-parameter key (only keys Tessera declares)."""
    return {k[len(CONF_PREFIX):]: v for k, v in pairs.items()
            if k.startswith(CONF_PREFIX) and k[len(CONF_PREFIX):] in QOS_PARAMETERS}


def context_note(mounter: str, values: Mapping[str, str]) -> dict[str, str]:
    """The volume context entry saying who enforces the limits, when any limit is set (not all zero)."""
    if not any(v != "0" for v in values.values()):
        return {}
    return {ENFORCEMENT_KEY: ENFORCEMENT.get(mounter, "librbd")}
