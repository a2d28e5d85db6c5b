"""Sanity profiles `lvm-thick` and `lvm-thin`: the conformance suite against the LVM backend on a loop-backed volume
group. They need device-mapper, which the host kernel of CI machines lacks, so they are registered only where it
exists — inside the e2e guest (tests/e2e/suites.py runs them there):

    tests/e2e/guest.py -- .venv/bin/python -m pytest tests/sanity --sanity-profile lvm-thick --sanity-profile lvm-thin
"""
from __future__ import annotations

import os

import yaml

from tests.e2e.vg import device_mapper_available, make_loop_vg
from tests.sanity.profiles import IO_MAX_MUTABLE, Profile, ProfileSetup, register

MIB = 1 << 20


def _setup(thin: bool):
    def setup(request, workdir: str) -> ProfileSetup:
        vg = make_loop_vg(4 << 30, thin_pool_size=(3 << 30) if thin else None, prefix="sanity")
        opts = {"type": "lvm", "volumeGroup": vg.name}
        if thin:
            opts.update({"thinPool": vg.thin_pool, "overcommitRatio": 4.0})
        path = os.path.join(workdir, "config.yaml")
        with open(path, "w") as f:
            yaml.safe_dump({"backends": {"lvm": opts}}, f)
        return ProfileSetup(config=path, teardown=vg.destroy)
    return setup


if device_mapper_available():
    register(Profile("lvm-thick", setup=_setup(False), volume_size=64 * MIB,
                     description="LVM backend, thick LVs in a loop-backed VG (needs device-mapper: e2e guest)",
                     mutable_parameters=IO_MAX_MUTABLE))
    register(Profile("lvm-thin", setup=_setup(True), volume_size=64 * MIB,
                     description="LVM backend, thin LVs in a thin pool of a loop-backed VG (e2e guest)",
                     mutable_parameters=IO_MAX_MUTABLE))
