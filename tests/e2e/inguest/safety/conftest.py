"""In-guest data-safety fixtures: two node plugins over the RBD backend (krbd, Ceph started in the guest), over the
iSCSI backend (LIO on a thin VG, two portals so each node has its own session and disk), and one plugin over a
thick LVM VG."""
from __future__ import annotations

import os
import tempfile
from typing import Iterator

import pytest
import yaml

from tests.conftest import require
from tests.e2e.inguest.safety.env import PORTALS, Pair, start_pair, stop_pair
from tests.e2e.lio import lio_available, write_config
from tests.e2e.vg import LoopVg, device_mapper_available, make_loop_vg


def _finish(pair: Pair) -> None:
    problems = stop_pair(pair)
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def rbd_pair(request) -> Iterator[Pair]:
    from tests.sanity.profile_rbd import _kernel_has
    require(_kernel_has("rbd", "/sys/bus/rbd"), "the rbd kernel module (these tests run inside the e2e guest)")
    ceph_cluster = request.getfixturevalue("ceph_cluster")  # started only where krbd can run
    config = os.path.join(tempfile.mkdtemp(prefix="ds-rbd-cfg-", dir=os.environ.get("TESSERA_SCRATCH") or None),
                          "config.yaml")
    with open(config, "w") as f:
        yaml.safe_dump({"backends": {"ceph": {
            "type": "rbd", "monitors": [ceph_cluster.monitors], "user": ceph_cluster.csi_user,
            "keyringPath": ceph_cluster.csi_keyring, "pool": ceph_cluster.pool, "mounter": "krbd",
            "connectTimeout": 10, "opTimeout": 20}}}, f)
    pair = start_pair(config, "ds-rbd-")
    try:
        yield pair
    finally:
        _finish(pair)


@pytest.fixture
def rbd(rbd_pair: Pair) -> Iterator[Pair]:
    yield rbd_pair
    problems = rbd_pair.cleanup()
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def iscsi_vg() -> Iterator[LoopVg]:
    require(lio_available() and device_mapper_available(),
            "LIO target + iscsi_tcp + device-mapper (these tests run inside the e2e guest: tests/e2e)")
    vg = make_loop_vg(1 << 30, thin_pool_size=768 << 20, prefix="dsiscsi")
    try:
        yield vg
    finally:
        vg.destroy()


@pytest.fixture(scope="module")
def iscsi_pair(iscsi_vg: LoopVg) -> Iterator[Pair]:
    cfgdir = tempfile.mkdtemp(prefix="ds-iscsi-cfg-", dir=os.environ.get("TESSERA_SCRATCH") or None)
    config = write_config(os.path.join(cfgdir, "config.yaml"), vg=iscsi_vg.name, thin_pool=iscsi_vg.thin_pool,
                          portals=PORTALS)
    pair = start_pair(config, "ds-iscsi-")
    try:
        yield pair
    finally:
        _finish(pair)


@pytest.fixture
def iscsi(iscsi_pair: Pair) -> Iterator[Pair]:
    yield iscsi_pair
    problems = iscsi_pair.cleanup()
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def thick_vg() -> Iterator[LoopVg]:
    require(device_mapper_available(), "device-mapper (these tests run inside the e2e guest: tests/e2e)")
    vg = make_loop_vg(512 << 20, prefix="dsthick")
    try:
        yield vg
    finally:
        vg.destroy()


@pytest.fixture
def thick(thick_vg: LoopVg) -> Iterator[Pair]:
    cfgdir = tempfile.mkdtemp(prefix="ds-lvm-cfg-", dir=os.environ.get("TESSERA_SCRATCH") or None)
    config = os.path.join(cfgdir, "config.yaml")
    with open(config, "w") as f:
        yaml.safe_dump({"backends": {"lvm": {"type": "lvm", "volumeGroup": thick_vg.name}}}, f)
    pair = start_pair(config, "ds-lvm-")
    try:
        yield pair
    finally:
        _finish(pair)
