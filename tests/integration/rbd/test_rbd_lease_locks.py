"""The RBD controller's operation locks (backends/rbd_locks.py) on a real cluster, as an operator and a second
replica see them: `rados lock info` on the lock object, and what another holder's attempt gets.

Two LeaseLocks factories stand for two replicas (their cookies differ, as two processes' do). The lease is 2 s and
the operation holds it for 6 s: without renewal the lock would lapse after 2 s and the contender would get it."""
from __future__ import annotations

import json
import subprocess
import time

import pytest

from backends.locking import LockConflict, Operation
from backends.rbd_locks import LEASES_LOST, OBJECT_PREFIX, LeaseLocks, LockKey
from tests.ceph.fixtures import CephInfo

pytestmark = pytest.mark.ceph
TERM = 2


def _lockers(ceph: CephInfo, obj: str) -> list[dict]:
    out = subprocess.run(["rados", "-c", ceph.conf, "-k", ceph.admin_keyring, "-p", ceph.pool, "lock", "info", obj,
                          "tessera-op"], capture_output=True, text=True, check=True).stdout
    return json.loads(out)["lockers"]


def test_a_lease_held_past_its_term_stays_held_and_frees_at_release(ceph_cluster: CephInfo, admin_io) -> None:
    mine, theirs = LeaseLocks("lease-a", TERM), LeaseLocks("lease-b", TERM)
    key = [LockKey("img.tessera-vol-lease-test", "volume/lease:rbd.tessera-vol-lease-test")]
    lost_before = LEASES_LOST.labels("lease-a")._value.get()
    refusals: list[str] = []
    with mine.hold(admin_io, key, Operation("DeleteVolume", "lease:rbd.tessera-vol-lease-test")):
        lockers = _lockers(ceph_cluster, OBJECT_PREFIX + key[0].key)
        assert len(lockers) == 1 and "DeleteVolume of lease:rbd.tessera-vol-lease-test" in lockers[0]["description"]
        end = time.monotonic() + 3 * TERM
        while time.monotonic() < end:
            time.sleep(0.5)
            with pytest.raises(LockConflict) as e:
                with theirs.hold(admin_io, key, Operation("CreateVolume", "other")):
                    pass
            refusals.append(str(e.value))
    # every refusal named the holder from the record written with the lock
    assert len(refusals) >= 10 and all("DeleteVolume of lease:rbd.tessera-vol-lease-test" in r for r in refusals)
    assert LEASES_LOST.labels("lease-a")._value.get() == lost_before
    assert _lockers(ceph_cluster, OBJECT_PREFIX + key[0].key) == []
    with theirs.hold(admin_io, key, Operation("CreateVolume", "other")):  # free at once after the release
        assert "CreateVolume of other" in _lockers(ceph_cluster, OBJECT_PREFIX + key[0].key)[0]["description"]


def test_shared_holders_coexist_and_exclude_a_writer(ceph_cluster: CephInfo, admin_io) -> None:
    a, b = LeaseLocks("lease-a", TERM), LeaseLocks("lease-b", TERM)
    obj = "img.tessera-vol-shared-test"
    shared = [LockKey(obj, "volume/x", shared=True)]
    with a.hold(admin_io, shared, Operation("CreateSnapshot", "s1")):
        with b.hold(admin_io, shared, Operation("CreateSnapshot", "s2")):
            assert len(_lockers(ceph_cluster, OBJECT_PREFIX + obj)) == 2
            with pytest.raises(LockConflict):
                with b.hold(admin_io, [LockKey(obj, "volume/x")], Operation("DeleteVolume", "x")):
                    pass
    with a.hold(admin_io, [LockKey(obj, "volume/x")], Operation("DeleteVolume", "x")):
        assert len(_lockers(ceph_cluster, OBJECT_PREFIX + obj)) == 1
