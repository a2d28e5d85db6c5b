"""CSI Controller service: request validation and translation; the logic is in controllerops."""
from __future__ import annotations

import grpc
from google.protobuf.wrappers_pb2 import Int64Value

from backends.errors import InvalidArgument, NotFound

from . import convert
from . import mutable as mutable_params
from ._pb import csi_pb2 as pb
from ._pb import csi_pb2_grpc as rpc
from .controllerops import ControllerOps, check_capabilities
from .errors import RpcError
from .ids import make_id

_Cap = pb.ControllerServiceCapability.RPC


class ControllerService(rpc.ControllerServicer):
    def __init__(self, ops: ControllerOps) -> None:
        self.ops = ops

    def _features(self):
        return [b.features() for b in self.ops.backends]

    def _has(self, attr: str) -> bool:
        return any(getattr(f, attr) for f in self._features())

    def ControllerGetCapabilities(self, request, context):
        types = [_Cap.CREATE_DELETE_VOLUME, _Cap.GET_VOLUME, _Cap.VOLUME_CONDITION, _Cap.PUBLISH_READONLY,
                 _Cap.SINGLE_NODE_MULTI_WRITER]  # SINGLE_NODE_{SINGLE,MULTI}_WRITER are served by every backend
        if self._has("list_volumes"):
            types.append(_Cap.LIST_VOLUMES)
        if self._has("capacity"):
            types.append(_Cap.GET_CAPACITY)
        if self._has("snapshots"):
            types += [_Cap.CREATE_DELETE_SNAPSHOT, _Cap.LIST_SNAPSHOTS, _Cap.GET_SNAPSHOT]
        if self._has("clones"):
            types.append(_Cap.CLONE_VOLUME)
        if self._has("expand"):
            types.append(_Cap.EXPAND_VOLUME)
        if self._has("controller_publish"):
            types.append(_Cap.PUBLISH_UNPUBLISH_VOLUME)
            # all or nothing: once advertised, the CO takes an empty published_node_ids as "published nowhere"
            # (the spec), so every backend must know its volumes' publications, not only some
            if all(f.published_nodes for f in self._features()):
                types.append(_Cap.LIST_VOLUMES_PUBLISHED_NODES)
        if self._modifiable():
            types.append(_Cap.MODIFY_VOLUME)
        return pb.ControllerGetCapabilitiesResponse(capabilities=[
            pb.ControllerServiceCapability(rpc=pb.ControllerServiceCapability.RPC(type=t)) for t in types])

    def CreateVolume(self, request, context):
        if not request.name:
            raise InvalidArgument("name is required")
        caps = convert.capabilities(request.volume_capabilities)
        source = None
        src_msg = None
        if request.HasField("volume_content_source"):
            src_msg = request.volume_content_source
            kind = src_msg.WhichOneof("type")
            if kind == "snapshot":
                source = ("snapshot", src_msg.snapshot.snapshot_id)
            elif kind == "volume":
                source = ("volume", src_msg.volume.volume_id)
            else:
                raise InvalidArgument("volume_content_source must name a snapshot or a volume")
        requisite = preferred = []
        if request.HasField("accessibility_requirements"):
            requisite = convert.topologies(request.accessibility_requirements.requisite)
            preferred = convert.topologies(request.accessibility_requirements.preferred)
        cr = request.capacity_range
        volume_id, vol = self.ops.create_volume(request.name, cr.required_bytes, cr.limit_bytes, caps,
                                                dict(request.parameters), request.secrets, source, requisite, preferred,
                                                mutable=dict(request.mutable_parameters))
        return pb.CreateVolumeResponse(volume=convert.volume(volume_id, vol, src_msg))

    def DeleteVolume(self, request, context):
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        self.ops.delete_volume(request.volume_id, request.secrets)
        return pb.DeleteVolumeResponse()

    def ControllerPublishVolume(self, request, context):
        if not self._has("controller_publish"):
            raise RpcError(grpc.StatusCode.UNIMPLEMENTED, "no configured backend needs ControllerPublishVolume")
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        if not request.node_id:
            raise InvalidArgument("node_id is required")
        cap = convert.required_capability(request)
        pc = self.ops.publish(request.volume_id, request.node_id, request.readonly, cap, request.volume_context,
                              request.secrets)
        return pb.ControllerPublishVolumeResponse(publish_context=pc)

    def ControllerUnpublishVolume(self, request, context):
        if not self._has("controller_publish"):
            raise RpcError(grpc.StatusCode.UNIMPLEMENTED, "no configured backend needs ControllerUnpublishVolume")
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        self.ops.unpublish(request.volume_id, request.node_id, request.secrets)
        return pb.ControllerUnpublishVolumeResponse()

    def ValidateVolumeCapabilities(self, request, context):
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        caps = convert.capabilities(request.volume_capabilities)
        backend, vol = self.ops.get_volume(request.volume_id, request.secrets)
        problem = check_capabilities(backend, caps)
        if not problem:
            try:
                mutable_params.check(backend, request.mutable_parameters)
            except InvalidArgument as e:
                problem = str(e)
        if problem:
            return pb.ValidateVolumeCapabilitiesResponse(message=problem)
        return pb.ValidateVolumeCapabilitiesResponse(confirmed=pb.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=request.volume_context, volume_capabilities=request.volume_capabilities,
            parameters=request.parameters, mutable_parameters=request.mutable_parameters))

    def ListVolumes(self, request, context):
        page = self.ops.list_volumes(request.max_entries, request.starting_token)
        entries = []
        for vid, vol in page.entries:
            backend_name = vid.partition(":")[0]
            entries.append(pb.ListVolumesResponse.Entry(
                volume=convert.volume(vid, vol, convert.content_source(vol, backend_name)),
                status=pb.ListVolumesResponse.VolumeStatus(
                    published_node_ids=vol.published_nodes,
                    volume_condition=pb.VolumeCondition(abnormal=vol.abnormal, message=vol.condition_message))))
        return pb.ListVolumesResponse(entries=entries, next_token=page.next_token)

    def ControllerGetVolume(self, request, context):
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        backend, vol = self.ops.get_volume(request.volume_id)
        return pb.ControllerGetVolumeResponse(
            volume=convert.volume(request.volume_id, vol, convert.content_source(vol, backend.name)),
            status=pb.ControllerGetVolumeResponse.VolumeStatus(
                published_node_ids=vol.published_nodes,
                volume_condition=pb.VolumeCondition(abnormal=vol.abnormal, message=vol.condition_message)))

    def GetCapacity(self, request, context):
        caps = [convert.capability(c, f"volume_capabilities[{i}]") for i, c in enumerate(request.volume_capabilities)]
        seg = dict(request.accessible_topology.segments) if request.HasField("accessible_topology") else None
        cap = self.ops.get_capacity(dict(request.parameters), caps, seg)
        resp = pb.GetCapacityResponse(available_capacity=cap.available_bytes)
        if cap.maximum_volume_size is not None:
            resp.maximum_volume_size.CopyFrom(Int64Value(value=cap.maximum_volume_size))
        if cap.minimum_volume_size is not None:
            resp.minimum_volume_size.CopyFrom(Int64Value(value=cap.minimum_volume_size))
        return resp

    def CreateSnapshot(self, request, context):
        if not request.source_volume_id:
            raise InvalidArgument("source_volume_id is required")
        if not request.name:
            raise InvalidArgument("name is required")
        sid, snap = self.ops.create_snapshot(request.source_volume_id, request.name, dict(request.parameters),
                                             request.secrets)
        return pb.CreateSnapshotResponse(snapshot=convert.snapshot(sid, request.source_volume_id, snap))

    def DeleteSnapshot(self, request, context):
        if not request.snapshot_id:
            raise InvalidArgument("snapshot_id is required")
        self.ops.delete_snapshot(request.snapshot_id, request.secrets)
        return pb.DeleteSnapshotResponse()

    def ListSnapshots(self, request, context):
        page = self.ops.list_snapshots(request.max_entries, request.starting_token, request.snapshot_id,
                                       request.source_volume_id, request.secrets)
        entries = [pb.ListSnapshotsResponse.Entry(snapshot=convert.snapshot(
            sid, self.ops.source_volume_id(sid, snap), snap)) for sid, snap in page.entries]
        return pb.ListSnapshotsResponse(entries=entries, next_token=page.next_token)

    def ControllerExpandVolume(self, request, context):
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        if not request.HasField("capacity_range"):
            raise InvalidArgument("capacity_range is required")
        if request.HasField("volume_capability"):
            convert.required_capability(request)
        size, node_needed = self.ops.expand_volume(request.volume_id, request.capacity_range.required_bytes,
                                                   request.capacity_range.limit_bytes, request.secrets)
        return pb.ControllerExpandVolumeResponse(capacity_bytes=size, node_expansion_required=node_needed)

    def _modifiable(self) -> bool:
        return any(b.mutable_parameters() for b in self.ops.backends)

    def ControllerModifyVolume(self, request, context):
        if not self._modifiable():
            raise RpcError(grpc.StatusCode.UNIMPLEMENTED, "no configured backend has mutable parameters")
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        self.ops.modify_volume(request.volume_id, dict(request.mutable_parameters), request.secrets)
        return pb.ControllerModifyVolumeResponse()

    def GetSnapshot(self, request, context):
        if not self._has("snapshots"):
            raise RpcError(grpc.StatusCode.UNIMPLEMENTED, "no configured backend supports snapshots")
        if not request.snapshot_id:
            raise InvalidArgument("snapshot_id is required")
        sid, snap = self.ops.get_snapshot(request.snapshot_id, request.secrets)
        return pb.GetSnapshotResponse(snapshot=convert.snapshot(sid, self.ops.source_volume_id(sid, snap), snap))
