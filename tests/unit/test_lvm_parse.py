"""LVM report parsing, name validation and tag encoding (host-only; no LVM needed).

The JSON fixtures in data/ are real `lvs`/`vgs --reportformat json --units b --nosuffix` output captured inside the
test guest (LVM 2.03.16, Debian 12) from a VG with a thin pool, a thin LV, a thin snapshot and a thick LV.
"""
from __future__ import annotations

import os

import pytest

from backends.errors import CapacityExceeded, InUse, InvalidArgument, NotFound
from backends.lvm import LvmBackend, LvmOptions
from backends.base import CreateVolumeSpec, Runtime
from backends.lvm_volumes import (_classify, escape_tag_value, fields_to_tags, parse_lvs, parse_vgs, tags_to_fields,
                                  unescape_tag_value, validate_name)
from backends.util import CommandError

DATA = os.path.join(os.path.dirname(__file__), "data")


def _read(name: str) -> str:
    with open(os.path.join(DATA, name)) as f:
        return f.read()


def test_parse_lvs_real_report() -> None:
    lvs = {lv.name: lv for lv in parse_lvs(_read("lvm_lvs_report.json"))}
    assert set(lvs) == {"[lvol0_pmspare]", "pool", "[pool_tdata]", "[pool_tmeta]", "thick1", "ts-s", "tv-a"}
    pool, thin, snap, thick = lvs["pool"], lvs["tv-a"], lvs["ts-s"], lvs["thick1"]
    assert pool.is_thin_pool and pool.size == 512 << 20 and pool.data_percent == 0.0
    assert thin.is_thin and thin.pool == "pool" and thin.size == 100 << 20 and thin.active and not thin.open
    assert thin.tags == ("tessera.kind=volume", "tessera.name=pvc+2Fx")
    assert thin.fields("tessera") == {"kind": "volume", "name": "pvc/x"}
    assert snap.origin == "tv-a" and snap.activation_skip and not snap.active
    assert not thick.is_thin and not thick.pool and thick.size == 64 << 20 and thick.path == "/dev/vg0/thick1"


def test_parse_vgs_real_report() -> None:
    (vg,) = parse_vgs(_read("lvm_vgs_report.json"))
    assert vg.name == "vg0"
    assert vg.extent_size == 4 << 20
    assert vg.free == vg.free_count * vg.extent_size == 1530920960
    assert vg.size == vg.extent_count * vg.extent_size


def test_parse_empty_and_garbage() -> None:
    assert parse_lvs('{"report": [{"lv": []}]}') == []
    with pytest.raises(Exception, match="cannot parse LVM JSON"):
        parse_lvs("  WARNING: something\n{")


@pytest.mark.parametrize("name", ["tv-5c1f4a8e-6d0b-4b7e-9d7a-2f1c3e8b9a10", "vg0", "a", "data_1.x+y"])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "-rf", ".", "..", "snapshot", "pvmove0", "a/b", "a b", "x_tmeta", "lv_rimage_1",
                                  "é", "a" * 121, "a;rm"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(InvalidArgument):
        validate_name(name)


@pytest.mark.parametrize("value", ["pvc-0123", "ns/name", "a b=c,d", "ünïcode ✓", "+2F", "", "x" * 300])
def test_tag_escaping_round_trips(value: str) -> None:
    esc = escape_tag_value(value)
    assert all(c.isalnum() and c.isascii() or c in "_.-+" for c in esc)
    assert unescape_tag_value(esc) == value


def test_fields_tags_round_trip_and_namespace() -> None:
    fields = {"name": "pvc/1", "p.fsType": "xfs", "source": "snapshot:ts-1"}
    tags = fields_to_tags("tessera", fields)
    assert "tessera.name=pvc+2F1" in tags
    assert tags_to_fields("tessera", tags + ["other.name=x", "tessera.bad=+zz", "plain"]) == fields


def test_tag_too_long_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="too long"):
        fields_to_tags("tessera", {"p.k": "é" * 400})


@pytest.mark.parametrize("stderr,cls", [
    ('  Volume group "vg0" has insufficient free space (365 extents): 2560 required.', CapacityExceeded),
    ('  Logical volume vg0/tv-a contains a filesystem in use.', InUse),
    ('  Failed to find logical volume "vg0/nonexist"', NotFound),
])
def test_lvm_errors_become_typed_errors(stderr: str, cls: type) -> None:
    assert isinstance(_classify(CommandError(["lvcreate"], 5, "", stderr), "x"), cls)


def test_options_validation() -> None:
    assert LvmOptions.model_validate({"volumeGroup": "vg0", "thinPool": "pool", "overcommitRatio": 2}).thinPool == "pool"
    with pytest.raises(Exception, match="overcommitRatio applies only"):
        LvmOptions.model_validate({"volumeGroup": "vg0", "overcommitRatio": 2})
    with pytest.raises(Exception, match="not valid"):
        LvmOptions.model_validate({"volumeGroup": "--help"})
    with pytest.raises(Exception):
        LvmOptions.model_validate({"volumeGroup": "vg0", "thinpool": "typo"})


def test_topology_requirements_refuse_other_nodes_without_touching_lvm() -> None:
    rt = Runtime(driver_name="tessera.csi.dev", node_name="n1", state_dir="/nonexistent",
                 topology_key="topology.tessera.csi.dev/node")
    b = LvmBackend("lvm", LvmOptions(volumeGroup="vg0"), rt)
    key = rt.topology_key
    spec = CreateVolumeSpec(name="v", size_bytes=1 << 20, limit_bytes=0, parameters={}, secrets={}, capabilities=[],
                            requisite=[{key: "n2"}], preferred=[{key: "n2"}])
    with pytest.raises(CapacityExceeded, match="Unable to provision in accessible_topology"):
        b.create_volume(spec)
    b._check_topology(CreateVolumeSpec(name="v", size_bytes=1, limit_bytes=0, parameters={}, secrets={},
                                       capabilities=[], requisite=[{key: "n2"}, {key: "n1"}]))
    b._check_topology(CreateVolumeSpec(name="v", size_bytes=1, limit_bytes=0, parameters={}, secrets={},
                                       capabilities=[], preferred=[{key: "n1"}]))
    assert b.get_capacity({}, {key: "n2"}).available_bytes == 0
    assert b.features().node_local and not b.features().snapshots
