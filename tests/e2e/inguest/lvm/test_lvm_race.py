"""64-way races of controller calls on the LVM backend (thick and thin) through the real server, inside the e2e
guest: creates, clones, snapshots (thin), restores (thin), expands and deletes on shared names and volumes. One
volume per name, no INTERNAL or UNKNOWN answer, no orphan LV, no lost volume (the checks are in tests/racing.py)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from tests.e2e.vg import _run
from tests.racing import run_rounds

if TYPE_CHECKING:
    from conftest import LvmEnv

# Every LVM command takes the VG's lock, so a round of 64 calls costs a minute or more in a UML guest sharing two
# cores: one round per flavour keeps the lvm-data suite inside its timeout (the file race runs many more rounds).
ROUNDS = 1


def _our_lvs(env: "LvmEnv") -> list[str]:
    out = _run(["lvs", "--noheadings", "-o", "lv_name", env.vg.name])
    return sorted(n for n in out.split() if n != env.vg.thin_pool)


def test_64_way_races_leave_one_volume_per_name_and_no_orphan_lv(lvm_server: "LvmEnv"):
    before = _our_lvs(lvm_server)
    assert not before, f"the VG is not empty before the race: {before}"
    counts = run_rounds(lvm_server.client, ROUNDS, snapshots=lvm_server.thin, leftovers=lambda: _our_lvs(lvm_server))
    assert lvm_server.server.alive(), lvm_server.server.log_tail()
    assert counts.get("ABORTED", 0) > 0, counts
    log = lvm_server.server.written_log()
    assert '"code": "INTERNAL"' not in log and '"code": "UNKNOWN"' not in log, lvm_server.server.log_tail(80)
