"""Sanity profiles `iscsi-lio-thin` and `iscsi-lio-file`: the conformance suite against the iSCSI backend with the
LIO target and the open-iscsi initiator on the same machine (ControllerPublish grants the node's IQN with CHAP, the
node logs in through os-brick). They need LIO, iscsi_tcp and device-mapper, so they are registered only inside the
e2e guest (tests/e2e/suites.py runs them there)."""
from __future__ import annotations

import os
import shutil
import tempfile

from tests.e2e.lio import lio_available, write_config
from tests.e2e.vg import device_mapper_available, make_loop_vg
from tests.sanity.profiles import Profile, ProfileSetup, register

MIB = 1 << 20


def _thin(request, workdir: str) -> ProfileSetup:
    vg = make_loop_vg(4 << 30, thin_pool_size=(3 << 30), prefix="sanityiscsi")
    path = write_config(os.path.join(workdir, "config.yaml"), vg=vg.name, thin_pool=vg.thin_pool)
    return ProfileSetup(config=path, teardown=vg.destroy)


def _file(request, workdir: str) -> ProfileSetup:
    # the store on the guest's scratch disk: the guest's /tmp is RAM, too small for a default-size (1 GiB) volume
    base = os.environ.get("TESSERA_SCRATCH") or workdir
    store = tempfile.mkdtemp(prefix="sanity-iscsi-store-", dir=base)
    path = write_config(os.path.join(workdir, "config.yaml"), directory=store)
    return ProfileSetup(config=path, teardown=lambda: shutil.rmtree(store, ignore_errors=True))


if lio_available() and device_mapper_available():
    register(Profile("iscsi-lio-thin", setup=_thin, volume_size=64 * MIB,
                     description="iSCSI backend: LIO target on thin LVs, open-iscsi via os-brick (e2e guest)"))
if lio_available():
    register(Profile("iscsi-lio-file", setup=_file, volume_size=64 * MIB,
                     description="iSCSI backend: LIO fileio target on sparse files, open-iscsi via os-brick (e2e guest)"))
