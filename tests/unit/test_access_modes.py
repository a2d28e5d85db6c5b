"""Which capabilities the controller serves: multi-node writer modes are raw block only (ext4 and xfs are
single-host filesystems), whatever the backend would accept."""
from __future__ import annotations

import pytest

from backends.base import ALL_MODES, CapabilitySpec, Runtime, mount_writer_problem
from backends.iscsi import IscsiBackend, IscsiOptions
from csi.controllerops import check_capabilities


@pytest.fixture
def iscsi(tmp_path) -> IscsiBackend:
    """A backend that accepts every access mode (nothing is contacted: only its features are read)."""
    opts = IscsiOptions(portals=["127.0.0.1:3260"], iqnPrefix="iqn.2026-11.dev.tessera.unit",
                        backingStore={"file": {"directory": str(tmp_path / "store")}})
    return IscsiBackend("san", opts, Runtime("tessera.csi.dev", "n1", str(tmp_path), "t"))


@pytest.mark.parametrize("mode", ["MULTI_NODE_MULTI_WRITER", "MULTI_NODE_SINGLE_WRITER"])
@pytest.mark.parametrize("fs", ["", "ext4", "xfs"])
def test_multi_node_writer_mounts_refused_with_a_reason(iscsi: IscsiBackend, mode: str, fs: str) -> None:
    problem = check_capabilities(iscsi, [CapabilitySpec("mount", mode, fs)])
    assert problem and "block" in problem and mode in problem


@pytest.mark.parametrize("mode", sorted(ALL_MODES))
def test_every_mode_served_for_raw_block(iscsi: IscsiBackend, mode: str) -> None:
    assert check_capabilities(iscsi, [CapabilitySpec("block", mode)]) is None


@pytest.mark.parametrize("mode", ["SINGLE_NODE_WRITER", "SINGLE_NODE_SINGLE_WRITER", "SINGLE_NODE_MULTI_WRITER",
                                  "SINGLE_NODE_READER_ONLY", "MULTI_NODE_READER_ONLY"])
def test_single_node_and_reader_mounts_served(iscsi: IscsiBackend, mode: str) -> None:
    assert mount_writer_problem(CapabilitySpec("mount", mode, "ext4")) is None
    assert check_capabilities(iscsi, [CapabilitySpec("mount", mode, "ext4")]) is None


def test_reader_only_stage_mounts_read_only_without_journal_replay() -> None:
    from csi import stagemode
    assert stagemode.mount_options("ext4", ["noatime", "rw"], True) == ["noatime", "ro", "noload"]
    assert stagemode.mount_options("xfs", [], True) == ["nouuid", "ro", "norecovery"]
    assert stagemode.mount_options("ext4", ["noatime"], False) == ["noatime"]


@pytest.mark.parametrize("mode,ro,multi", [("SINGLE_NODE_READER_ONLY", True, False),
                                           ("MULTI_NODE_READER_ONLY", True, False),
                                           ("MULTI_NODE_MULTI_WRITER", False, True),
                                           ("SINGLE_NODE_WRITER", False, False)])
def test_attach_intent_follows_the_mode(mode: str, ro: bool, multi: bool) -> None:
    from csi import stagemode
    cap = CapabilitySpec("block", mode)
    assert stagemode.attach_args(cap) == {"readonly": ro, "multi_writer": multi}
    assert stagemode.read_only(cap, {}) is ro
    assert stagemode.read_only(CapabilitySpec("block", "SINGLE_NODE_WRITER"), {"readonly": True})


def test_node_refuses_multi_node_writer_mount() -> None:
    from backends.errors import InvalidArgument
    from csi import stagemode
    with pytest.raises(InvalidArgument):
        stagemode.check(CapabilitySpec("mount", "MULTI_NODE_MULTI_WRITER", "ext4"))
    stagemode.check(CapabilitySpec("block", "MULTI_NODE_MULTI_WRITER"))
