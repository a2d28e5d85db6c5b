"""What an access mode means for a NodeStageVolume: how the device is attached, whether it may be formatted, how the
staging mount is made. Kept apart from nodeops so the rules sit in one small place, the same for every backend.

- Reader-only modes (SINGLE_NODE_READER_ONLY, MULTI_NODE_READER_ONLY) attach read-only at the device (the backend
  decides how: krbd --read-only, a write-protected LUN, losetup -r, a read-only LV), never format (a blank device
  has nothing to read: FAILED_PRECONDITION), and mount `ro` plus what keeps the filesystem from writing anyway: ext4
  replays a dirty journal even on a read-only mount unless told `noload`; xfs the same unless `norecovery`. Several
  nodes mounting one volume like that each replay — and so write — the journal the crashed writer left.
- A backend may answer a read-write request with a read-only attachment (a PV published `readOnly: true` gets a
  write-protected LUN); the stage is then read-only too, rather than failing half-way through mkfs or a journal replay.
- Multi-node writer modes only for raw block (`backends.base.mount_writer_problem`).
"""
from __future__ import annotations

from typing import Mapping, Sequence

from backends.base import READER_ONLY_MODES, CapabilitySpec, mount_writer_problem
from backends.errors import FailedPrecondition, InvalidArgument

from . import filesystems


def check(cap: CapabilitySpec) -> None:
    """INVALID_ARGUMENT for a capability no node may serve (a multi-node writer mount)."""
    problem = mount_writer_problem(cap)
    if problem:
        raise InvalidArgument(problem)


def attach_args(cap: CapabilitySpec) -> dict[str, bool]:
    """The keyword arguments of `Backend.node_attach` for this capability."""
    return {"readonly": cap.access_mode in READER_ONLY_MODES,
            "multi_writer": cap.access_mode == "MULTI_NODE_MULTI_WRITER"}


def read_only(cap: CapabilitySpec, attachment_data: Mapping[str, object]) -> bool:
    """Whether the stage is read-only: a reader-only mode, or a device the backend attached read-only."""
    return cap.access_mode in READER_ONLY_MODES or bool(attachment_data.get("readonly"))


def prepare(device: str, fs_type: str, readonly: bool) -> None:
    """Make sure the device holds `fs_type`: format a blank one for a writer; a reader only checks."""
    if not readonly:
        filesystems.ensure_formatted(device, fs_type)
        return
    found, table = filesystems.probe(device)
    if not found:
        raise FailedPrecondition(f"device {device} is blank{f' (a {table} partition table)' if table else ''}: a "
                                 "read-only stage never formats; stage it read-write once (or restore a snapshot "
                                 "into it) to give it a filesystem")
    if found != fs_type:
        raise FailedPrecondition(f"device {device} holds a {found} filesystem, not the {fs_type} requested")


def mount_options(fs_type: str, mount_flags: Sequence[str], readonly: bool) -> list[str]:
    """The staging mount's options (see `filesystems.stage_options`), read-only ones for a reader."""
    opts = filesystems.stage_options(fs_type, mount_flags)
    if readonly:
        opts = [o for o in opts if o != "rw"] + ["ro", "noload" if fs_type == "ext4" else "norecovery"]
    return opts
