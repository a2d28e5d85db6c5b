"""CSI Identity service."""
from __future__ import annotations

from google.protobuf.wrappers_pb2 import BoolValue

from . import constants, groupops, snapshot_metadata
from ._pb import csi_pb2 as pb
from ._pb import csi_pb2_grpc as rpc
from .health import probe
from .registry import Backends

_Svc = pb.PluginCapability.Service


class IdentityService(rpc.IdentityServicer):
    def __init__(self, backends: Backends, controller: bool, node: bool = True) -> None:
        self.backends = backends
        self.controller = controller
        self.node = node

    def GetPluginInfo(self, request, context):
        return pb.GetPluginInfoResponse(name=self.backends.config.driver_name, vendor_version=constants.VENDOR_VERSION,
                                        manifest={"backends": ",".join(self.backends.names())})

    def GetPluginCapabilities(self, request, context):
        caps = []
        if self.controller:
            caps.append(pb.PluginCapability(service=_Svc(type=_Svc.CONTROLLER_SERVICE)))
        if self.controller and groupops.supported(self.backends):
            caps.append(pb.PluginCapability(service=_Svc(type=_Svc.GROUP_CONTROLLER_SERVICE)))
        if self.controller and snapshot_metadata.supported(self.backends):
            caps.append(pb.PluginCapability(service=_Svc(type=_Svc.SNAPSHOT_METADATA_SERVICE)))
        if any(b.features().node_local for b in self.backends):
            caps.append(pb.PluginCapability(service=_Svc(type=_Svc.VOLUME_ACCESSIBILITY_CONSTRAINTS)))
        if any(b.features().expand for b in self.backends):
            online = all(b.features().online_expand for b in self.backends if b.features().expand)
            caps.append(pb.PluginCapability(volume_expansion=pb.PluginCapability.VolumeExpansion(
                type=pb.PluginCapability.VolumeExpansion.ONLINE if online else pb.PluginCapability.VolumeExpansion.OFFLINE)))
        return pb.GetPluginCapabilitiesResponse(capabilities=caps)

    def Probe(self, request, context):
        """Ready when every backend answers the probes of the services this process serves (csi.health: the same
        check answers the HTTP /healthz and /readyz)."""
        return pb.ProbeResponse(ready=BoolValue(value=probe(self.backends, self.controller, self.node) is None))
