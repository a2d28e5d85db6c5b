"""Sanity profile `rbd`: the conformance suite against the RBD backend on the test Ceph cluster, node side
included, with the `fuse` mounter (rbd-fuse + a loop device) because the host kernel has no rbd/nbd modules.

    pytest tests/sanity --sanity-profile rbd

Needs the `ceph_mgr` fixture (tests/ceph/fixtures.py registered as a pytest plugin).
"""
from __future__ import annotations

import os

import pytest
import yaml

from tests.sanity.profiles import Profile, ProfileSetup, register


def _setup(request, workdir: str) -> ProfileSetup:
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
                "mounter": "fuse",
                "connectTimeout": 10,
                "opTimeout": 20,
            },
        },
    }
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return ProfileSetup(config=path, params={"backend": "ceph"})


register(Profile("rbd", setup=_setup, volume_size=64 << 20, marks=(pytest.mark.ceph,),
                 description="RBD backend on the throw-away Ceph cluster, fuse mounter on the host"))
