"""What an operator sees of an LVM backend, checked against LVM's own report (in the e2e guest): the usage figures
the metrics endpoint exports (VG or thin pool size and room, thin data and metadata percent, counts), and
`tessera-csi volumes list|orphans` with the plugin's config — an unfinished create is listed, never removed."""
from __future__ import annotations

import json
import subprocess
import sys

from backends.lvm_volumes import fields_to_tags
from csi._pb import csi_pb2 as pb
from csi.config import load_config
from csi.registry import Backends
from tests.e2e.vg import LVM_ENV
from tests.sanity.harness import MIB, mount_cap

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conftest import LvmEnv


def _lvs(vg: str, fields: str) -> dict[str, dict]:
    out = subprocess.run(["lvs", "-a", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", fields, vg],
                         capture_output=True, text=True, check=True, env=LVM_ENV).stdout
    return {lv["lv_name"]: lv for lv in json.loads(out)["report"][0]["lv"]}


def _cli(env: LvmEnv, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "csi.cli", "volumes", *args, "--config", env.config],
                          capture_output=True, text=True, timeout=120)


def test_usage_matches_lvm_report(lvm: LvmEnv) -> None:
    vol = lvm.ledger.create_volume(pb.CreateVolumeRequest(
        name="usage-a", capacity_range=pb.CapacityRange(required_bytes=64 * MIB), volume_capabilities=[mount_cap()]))
    backend = next(iter(Backends(load_config(lvm.config), lvm.node)))
    usage = backend.usage()  # what the metrics thread exports
    assert usage.problems == []
    assert usage.volumes == 1
    if lvm.thin:
        pool = _lvs(lvm.vg.name, "lv_name,lv_size,data_percent,metadata_percent")[lvm.vg.thin_pool]
        assert usage.total_bytes == int(pool["lv_size"])  # overcommitRatio 1
        assert usage.free_bytes == int(pool["lv_size"]) - vol.capacity_bytes
        assert usage.gauges["thin_data_percent"] == float(pool["data_percent"])
        assert usage.gauges["thin_metadata_percent"] == float(pool["metadata_percent"]) > 0
    else:
        vgs = subprocess.run(["vgs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o",
                              "vg_size,vg_free", lvm.vg.name], capture_output=True, text=True, check=True,
                             env=LVM_ENV).stdout
        vg = json.loads(vgs)["report"][0]["vg"][0]
        assert (usage.total_bytes, usage.free_bytes) == (int(vg["vg_size"]), int(vg["vg_free"]))
        assert "thin_data_percent" not in usage.gauges


def test_list_and_orphans_read_lvm_and_remove_nothing(lvm: LvmEnv) -> None:
    vol = lvm.ledger.create_volume(pb.CreateVolumeRequest(
        name="listed", capacity_range=pb.CapacityRange(required_bytes=32 * MIB), volume_capabilities=[mount_cap()]))
    listed = _cli(lvm, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {r["name"]: r["volume_id"] for r in json.loads(listed.stdout)} == {"listed": vol.volume_id}
    assert _cli(lvm, "orphans").stdout.strip() == "no orphans"
    # A create that crashed before its last step leaves its LV tagged pending: make one the way the backend does
    # (an LV with the pending tag in this backend's place) and check it is reported, and left.
    name = "tv-00000000-0000-4000-8000-0000000000aa"
    argv = ["lvcreate", "--yes", "-n", name]
    for tag in fields_to_tags("tessera", {"kind": "volume", "name": "crashed", "state": "pending"}):
        argv += ["--addtag", tag]
    argv += (["-V", "16m", "--thinpool", lvm.vg.thin_pool] if lvm.thin else ["-L", "16m"]) + [lvm.vg.name]
    subprocess.run(argv, capture_output=True, text=True, check=True, env=LVM_ENV)
    try:
        orphans = _cli(lvm, "orphans", "--json")
        assert orphans.returncode == 0, orphans.stderr
        rows = json.loads(orphans.stdout)
        assert [r["object"] for r in rows] == [f"{lvm.vg.name}/{name}"]
        assert "did not finish" in rows[0]["reason"]
        assert name in _lvs(lvm.vg.name, "lv_name")  # read-only: still there
    finally:
        subprocess.run(["lvremove", "--yes", f"{lvm.vg.name}/{name}"], capture_output=True, env=LVM_ENV)
