"""Protobuf ↔ plain values, for the gRPC services."""
from __future__ import annotations

from typing import Iterable, Optional

from google.protobuf.timestamp_pb2 import Timestamp

from backends.base import CapabilitySpec, Snapshot, Volume
from backends.errors import InvalidArgument

from ._pb import csi_pb2 as pb

_MODE = pb.VolumeCapability.AccessMode.Mode


def capability(cap: "pb.VolumeCapability", field: str = "volume_capability") -> CapabilitySpec:
    kind = cap.WhichOneof("access_type")
    if kind is None:
        raise InvalidArgument(f"{field}.access_type is required (block or mount)")
    mode = cap.access_mode.mode if cap.HasField("access_mode") else 0
    if mode == _MODE.UNKNOWN:
        raise InvalidArgument(f"{field}.access_mode is required")
    if mode not in _MODE.values():  # proto3 enums are open: any int32 arrives as it was sent
        raise InvalidArgument(f"{field}.access_mode.mode {mode} is not a CSI access mode "
                              f"(one of {', '.join(n for n in _MODE.keys() if n != 'UNKNOWN')})")
    if kind == "mount":
        return CapabilitySpec("mount", _MODE.Name(mode), cap.mount.fs_type, tuple(cap.mount.mount_flags))
    return CapabilitySpec("block", _MODE.Name(mode))


def capabilities(caps: Iterable["pb.VolumeCapability"]) -> list[CapabilitySpec]:
    out = [capability(c, f"volume_capabilities[{i}]") for i, c in enumerate(caps)]
    if not out:
        raise InvalidArgument("volume_capabilities is required")
    return out


def required_capability(req, field: str = "volume_capability") -> CapabilitySpec:
    if not req.HasField(field):
        raise InvalidArgument(f"{field} is required")
    return capability(getattr(req, field), field)


def volume(volume_id: str, vol: Volume, source: Optional["pb.VolumeContentSource"] = None) -> "pb.Volume":
    # the mutable parameters in force are shown beside the backend's context (they never override its keys)
    context = {**vol.mutable_parameters, **vol.context}
    msg = pb.Volume(capacity_bytes=vol.capacity_bytes, volume_id=volume_id, volume_context=context,
                    accessible_topology=[pb.Topology(segments=t) for t in vol.topology])
    if source is not None:
        msg.content_source.CopyFrom(source)
    return msg


def content_source(vol: Volume, backend_name: str) -> Optional["pb.VolumeContentSource"]:
    if vol.source is None:
        return None
    full = f"{backend_name}:{vol.source.local_id}"
    if vol.source.kind == "snapshot":
        return pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=full))
    return pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id=full))


def snapshot(snapshot_id: str, source_volume_id: str, snap: Snapshot) -> "pb.Snapshot":
    ts = Timestamp()
    ts.FromNanoseconds(int(snap.creation_time * 1e9))
    # a member of a group snapshot names its group (the CO then deletes it with the group only)
    group = f"{snapshot_id.partition(':')[0]}:{snap.group_local_id}" if snap.group_local_id else ""
    return pb.Snapshot(size_bytes=snap.size_bytes, snapshot_id=snapshot_id, source_volume_id=source_volume_id,
                       creation_time=ts, ready_to_use=snap.ready_to_use, group_snapshot_id=group)


def topologies(items: Iterable["pb.Topology"]) -> list[dict[str, str]]:
    return [dict(t.segments) for t in items]
