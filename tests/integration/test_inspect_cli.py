"""`tessera-csi volumes list|show|orphans` as an operator runs it against the file backend: what exists by request
name, one volume with this node's records, and what a crashed create left — listed, never deleted."""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys

import grpc

from csi._pb import csi_pb2 as pb
from csi._pb import csi_pb2_grpc as rpc
from tests.integration.test_server import CAP, _start, _stop

TESSERA = [sys.executable, "-m", "csi.cli"]


def _cli(tmp_path, *args: str) -> subprocess.CompletedProcess:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"stateDir: {tmp_path / 'state'}\nbackends:\n  local: {{type: file, directory: {tmp_path / 'data'}}}\n")
    return subprocess.run(TESSERA + ["volumes", *args, "--config", str(cfg)], capture_output=True, text=True,
                          timeout=60)


def _create(tmp_path, names: list[str]) -> dict[str, str]:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"stateDir: {tmp_path / 'state'}\nbackends:\n  local: {{type: file, directory: {tmp_path / 'data'}}}\n")
    proc, sock = _start(tmp_path, "--config", str(cfg))
    ids = {}
    try:
        with grpc.insecure_channel(f"unix://{sock}") as ch:
            ctl = rpc.ControllerStub(ch)
            for n in names:
                v = ctl.CreateVolume(pb.CreateVolumeRequest(name=n, volume_capabilities=[CAP],
                                                            capacity_range=pb.CapacityRange(required_bytes=2 << 20)),
                                     timeout=30).volume
                ids[n] = v.volume_id
            snap = ctl.CreateSnapshot(pb.CreateSnapshotRequest(name="snap-a", source_volume_id=ids[names[0]]),
                                      timeout=30).snapshot
            ids["snap-a"] = snap.snapshot_id
    finally:
        _stop(proc)
    return ids


def test_list_and_show(tmp_path):
    ids = _create(tmp_path, ["pvc-one", "pvc-two"])
    r = _cli(tmp_path, "list", "--snapshots", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    vols = {row["name"]: row for row in rows if "volume_id" in row}
    assert set(vols) == {"pvc-one", "pvc-two"}
    assert vols["pvc-one"]["volume_id"] == ids["pvc-one"] and vols["pvc-one"]["capacity_bytes"] == 2 << 20
    snaps = [row for row in rows if "snapshot_id" in row]
    assert [s["snapshot_id"] for s in snaps] == [ids["snap-a"]]
    assert snaps[0]["source_volume_id"] == ids["pvc-one"]
    table = _cli(tmp_path, "list")
    assert table.returncode == 0 and "pvc-two" in table.stdout and table.stdout.startswith("VOLUME_ID")
    shown = _cli(tmp_path, "show", ids["pvc-two"])
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["name"] == "pvc-two" and json.loads(shown.stdout)["node_records"] == []
    missing = _cli(tmp_path, "show", "local:vol-00000000-0000-0000-0000-000000000000")
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def test_orphans_are_listed_and_left_alone(tmp_path):
    _create(tmp_path, ["pvc-one"])
    vol_dir = tmp_path / "data" / "volumes"
    assert _cli(tmp_path, "orphans").stdout.strip() == "no orphans"
    # what crashes leave: an image whose record was never written, a temporary copy nobody holds, and one that a
    # live writer still holds (not an orphan)
    crashed = vol_dir / "11111111-1111-1111-1111-111111111111.img"
    crashed.write_bytes(b"\0" * 4096)
    stale_tmp = vol_dir / "22222222-2222-2222-2222-222222222222.img.tmp"
    stale_tmp.write_bytes(b"x")
    live_tmp = vol_dir / "33333333-3333-3333-3333-333333333333.img.tmp"
    live_tmp.write_bytes(b"y")
    holder = os.open(live_tmp, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        before = sorted(os.listdir(vol_dir))
        r = _cli(tmp_path, "orphans", "--json")
        assert r.returncode == 0, r.stderr
        found = {row["object"]: row["reason"] for row in json.loads(r.stdout)}
        assert set(found) == {str(crashed), str(stale_tmp)}
        assert "without its record" in found[str(crashed)]
        assert sorted(os.listdir(vol_dir)) == before  # read-only
    finally:
        os.close(holder)


def test_members_of_an_unfinished_group_create_are_orphans(tmp_path):
    """A group create killed before its commit point leaves member snapshots (image + record naming the group)
    and no group record: nobody sees them as snapshots, and `volumes orphans` names them."""
    _create(tmp_path, ["pvc-one"])
    snap_dir = tmp_path / "data" / "snapshots"
    member = "snap-44444444-4444-4444-4444-444444444444"
    (snap_dir / f"{member}.img").write_bytes(b"\0" * 4096)
    (snap_dir / f"{member}.json").write_text(json.dumps({
        "name": "g/vol", "source_volume": "vol-x", "size": 4096, "created": 1.0,
        "group": "group-55555555-5555-5555-5555-555555555555"}))
    r = _cli(tmp_path, "orphans", "--json")
    assert r.returncode == 0, r.stderr
    found = {row["object"]: row["reason"] for row in json.loads(r.stdout)}
    assert set(found) == {str(snap_dir / f"{member}.json")}
    assert "group-55555555-5555-5555-5555-555555555555" in found[str(snap_dir / f"{member}.json")]
    assert (snap_dir / f"{member}.img").exists()  # listed, never deleted
