"""CSI GroupController service (group snapshots): request translation; the logic is in csi/groupops.py.

Registered only when some backend cuts group snapshots (csi/server.py); GROUP_CONTROLLER_SERVICE is then advertised
by the Identity service. Every member of a group is also an ordinary snapshot carrying the group's ID in
`group_snapshot_id`: restorable, listed by ListSnapshots, deleted with its group only (DeleteSnapshot of a member
is INVALID_ARGUMENT, as the spec allows: "Snapshot is part of a group").
"""
from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from backends.base import GroupSnapshot
from backends.errors import InvalidArgument

from . import convert
from ._pb import csi_pb2 as pb
from ._pb import csi_pb2_grpc as rpc
from .groupops import GroupOps
from .ids import make_id

_Cap = pb.GroupControllerServiceCapability.RPC


def group_message(group_snapshot_id: str, group: GroupSnapshot) -> "pb.VolumeGroupSnapshot":
    backend = group_snapshot_id.partition(":")[0]
    ts = Timestamp()
    ts.FromNanoseconds(int(group.creation_time * 1e9))
    snaps = []
    for m in group.members:
        msg = convert.snapshot(make_id(backend, m.local_id), make_id(backend, m.source_volume_local_id), m)
        msg.group_snapshot_id = group_snapshot_id  # the spec: the same ID as the enclosing group's
        snaps.append(msg)
    return pb.VolumeGroupSnapshot(group_snapshot_id=group_snapshot_id, snapshots=snaps, creation_time=ts,
                                  ready_to_use=group.ready_to_use)


class GroupControllerService(rpc.GroupControllerServicer):
    def __init__(self, ops: GroupOps) -> None:
        self.ops = ops

    def GroupControllerGetCapabilities(self, request, context):
        return pb.GroupControllerGetCapabilitiesResponse(capabilities=[pb.GroupControllerServiceCapability(
            rpc=_Cap(type=_Cap.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT))])

    def CreateVolumeGroupSnapshot(self, request, context):
        if not request.name:
            raise InvalidArgument("name is required")
        if not request.source_volume_ids:
            raise InvalidArgument("source_volume_ids is required")
        gid, group = self.ops.create(request.name, list(request.source_volume_ids), dict(request.parameters),
                                     request.secrets)
        return pb.CreateVolumeGroupSnapshotResponse(group_snapshot=group_message(gid, group))

    def DeleteVolumeGroupSnapshot(self, request, context):
        if not request.group_snapshot_id:
            raise InvalidArgument("group_snapshot_id is required")
        self.ops.delete(request.group_snapshot_id, list(request.snapshot_ids), request.secrets)
        return pb.DeleteVolumeGroupSnapshotResponse()

    def GetVolumeGroupSnapshot(self, request, context):
        if not request.group_snapshot_id:
            raise InvalidArgument("group_snapshot_id is required")
        gid, group = self.ops.get(request.group_snapshot_id, list(request.snapshot_ids), request.secrets)
        return pb.GetVolumeGroupSnapshotResponse(group_snapshot=group_message(gid, group))
