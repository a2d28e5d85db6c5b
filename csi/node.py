"""CSI Node service: request validation and translation; the logic is in nodeops."""
from __future__ import annotations

from backends.errors import InvalidArgument, NotFound, OutOfRange, TesseraError

from . import convert
from ._pb import csi_pb2 as pb
from ._pb import csi_pb2_grpc as rpc
from .ids import parse_id
from .nodeops import NodeOps

_Cap = pb.NodeServiceCapability.RPC
_Unit = pb.VolumeUsage.Unit


def _require(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(f"{field} is required")
    return value


class NodeService(rpc.NodeServicer):
    def __init__(self, ops: NodeOps) -> None:
        self.ops = ops

    def NodeGetCapabilities(self, request, context):
        types = [_Cap.STAGE_UNSTAGE_VOLUME, _Cap.GET_VOLUME_STATS, _Cap.EXPAND_VOLUME, _Cap.VOLUME_CONDITION,
                 _Cap.SINGLE_NODE_MULTI_WRITER]  # publish enforces SINGLE_NODE_SINGLE_WRITER's one target
        return pb.NodeGetCapabilitiesResponse(capabilities=[
            pb.NodeServiceCapability(rpc=pb.NodeServiceCapability.RPC(type=t)) for t in types])

    def NodeGetInfo(self, request, context):
        return pb.NodeGetInfoResponse(node_id=self.ops.node_id(), max_volumes_per_node=self.ops.max_volumes,
                                      accessible_topology=pb.Topology(segments=self.ops.topology()))

    def NodeStageVolume(self, request, context):
        _require(request.volume_id, "volume_id")
        _require(request.staging_target_path, "staging_target_path")
        cap = convert.required_capability(request)
        self.ops.stage(request.volume_id, request.staging_target_path, cap, request.volume_context,
                       request.publish_context, request.secrets)
        return pb.NodeStageVolumeResponse()

    def NodeUnstageVolume(self, request, context):
        _require(request.volume_id, "volume_id")
        _require(request.staging_target_path, "staging_target_path")
        self.ops.unstage(request.volume_id, request.staging_target_path)
        return pb.NodeUnstageVolumeResponse()

    def NodePublishVolume(self, request, context):
        _require(request.volume_id, "volume_id")
        _require(request.target_path, "target_path")
        cap = convert.required_capability(request)
        self.ops.publish(request.volume_id, request.staging_target_path, request.target_path, cap, request.readonly,
                         request.volume_context)
        return pb.NodePublishVolumeResponse()

    def NodeUnpublishVolume(self, request, context):
        _require(request.volume_id, "volume_id")
        _require(request.target_path, "target_path")
        self.ops.unpublish(request.volume_id, request.target_path)
        return pb.NodeUnpublishVolumeResponse()

    def NodeGetVolumeStats(self, request, context):
        _require(request.volume_id, "volume_id")
        _require(request.volume_path, "volume_path")
        s = self.ops.stats(request.volume_id, request.volume_path)
        usage = [pb.VolumeUsage(unit=_Unit.BYTES, total=s.bytes_total, available=s.bytes_available, used=s.bytes_used)]
        if not s.block:
            usage.append(pb.VolumeUsage(unit=_Unit.INODES, total=s.inodes_total, available=s.inodes_free,
                                        used=s.inodes_used))
        return pb.NodeGetVolumeStatsResponse(usage=usage, volume_condition=pb.VolumeCondition(
            abnormal=s.abnormal, message=s.message))

    def NodeExpandVolume(self, request, context):
        _require(request.volume_id, "volume_id")
        _require(request.volume_path, "volume_path")
        if request.HasField("volume_capability"):
            convert.required_capability(request)
        required, limit = request.capacity_range.required_bytes, request.capacity_range.limit_bytes
        if required < 0 or limit < 0:
            raise InvalidArgument("capacity_range must not be negative")
        if limit and required > limit:
            raise InvalidArgument(f"capacity_range.required_bytes ({required}) exceeds limit_bytes ({limit})")
        if required:
            self._check_reachable(request.volume_id, required)
        size = self.ops.expand(request.volume_id, request.volume_path, request.staging_target_path, required)
        return pb.NodeExpandVolumeResponse(capacity_bytes=size)

    def _check_reachable(self, volume_id: str, required: int) -> None:
        """OUT_OF_RANGE at once, before the volume's lock is taken, for a size its device can never reach: past the
        backend's largest volume, or — where the storage lives on this node and answers here without credentials —
        past what the storage holds now (ControllerExpandVolume has not grown it). Otherwise NodeOps.expand would
        wait for the device to grow, holding the volume's lock, and answer UNAVAILABLE only after its timeout."""
        try:
            oid = parse_id(volume_id)
            backend = self.ops.backends.for_id(oid.backend, f"volume {volume_id!r}")
        except NotFound:
            return  # NodeOps answers for a volume that cannot exist
        most = backend.max_volume_bytes()
        if most is not None and required > most:
            raise OutOfRange(f"capacity_range.required_bytes {required} is more than the largest volume backend "
                             f"{backend.name!r} can hold ({most} bytes)")
        if not backend.features().node_local:
            return
        try:
            vol = backend.get_volume(oid.local, {})
        except TesseraError:
            return  # NodeOps reports an unknown or unreachable volume in its own words
        if vol.capacity_bytes < required:
            raise OutOfRange(f"volume {volume_id} holds {vol.capacity_bytes} bytes in its storage, less than the "
                             f"{required} bytes asked; grow it with ControllerExpandVolume first")
