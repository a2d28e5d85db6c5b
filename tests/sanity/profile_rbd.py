"""Sanity profile `rbd`: the conformance suite against the RBD backend on the test Ceph cluster, node side
included, with the `fuse` mounter (rbd-fuse + a loop device) because the host kernel has no rbd/nbd modules.

    pytest tests/sanity --sanity-profile rbd

Needs the `ceph_mgr` fixture (tests/ceph/fixtures.py registered as a pytest plugin).
"""
from __future__ import annotations

import glob
import os
import platform

import pytest
import yaml

from tests.sanity.profiles import Profile, ProfileSetup, register

# librbd QoS (backends/rbd_qos.py): what ControllerModifyVolume sets on an rbd volume
RBD_MUTABLE = ({"rbd_qos_iops_limit": "100", "rbd_qos_write_bps_limit": "10485760"},
               {"rbd_qos_iops_limit": "250", "rbd_qos_write_bps_limit": "0"})


def _kernel_has(module: str, sysfs: str) -> bool:
    """The module is loaded, or can be (its .ko exists for the running kernel): inside the real-kernel guest."""
    return os.path.exists(sysfs) or bool(glob.glob(f"/lib/modules/{platform.release()}/**/{module}.ko*", recursive=True))


def _setup_for(mounter: str):
    def setup(request, workdir: str) -> ProfileSetup:
        return _setup(request, workdir, mounter)
    return setup


def _setup(request, workdir: str, mounter: str = "fuse") -> ProfileSetup:
    ceph = request.getfixturevalue("ceph_mgr")  # GetCapacity needs pool statistics, which come from a mgr
    path = os.path.join(workdir, "config.yaml")
    config = {
        "backends": {
            "ceph": {
                "type": "rbd",
                "monitors": [ceph.monitors],
                "user": ceph.csi_user,
                "keyringPath": ceph.csi_keyring,
                "pool": ceph.pool,
                "mounter": mounter,
                "connectTimeout": 10,
                "opTimeout": 20,
            },
        },
    }
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return ProfileSetup(config=path, params={"backend": "ceph"})


register(Profile("rbd", setup=_setup_for("fuse"), volume_size=64 << 20, marks=(pytest.mark.ceph,),
                 description="RBD backend on the throw-away Ceph cluster, fuse mounter on the host", default=True,
                 mutable_parameters=RBD_MUTABLE))
# The kernel mounters need the rbd / nbd modules, which only the real-kernel guest has (tests/e2e):
#   pytest tests/sanity --sanity-profile rbd-krbd --sanity-profile rbd-nbd
if _kernel_has("rbd", "/sys/bus/rbd"):
    register(Profile("rbd-krbd", setup=_setup_for("krbd"), volume_size=64 << 20, marks=(pytest.mark.ceph,),
                     description="RBD backend, kernel RBD client (rbd map); needs the rbd module",
                     mutable_parameters=RBD_MUTABLE))
if _kernel_has("nbd", "/sys/module/nbd"):
    register(Profile("rbd-nbd", setup=_setup_for("nbd"), volume_size=64 << 20, marks=(pytest.mark.ceph,),
                     description="RBD backend, rbd-nbd; needs the nbd module",
                     mutable_parameters=RBD_MUTABLE))
