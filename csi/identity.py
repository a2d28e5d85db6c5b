"""CSI Identity service."""
from __future__ import annotations

from google.protobuf.wrappers_pb2 import BoolValue

from backends.errors import TesseraError

from . import constants
from ._pb import csi_pb2 as pb
from ._pb import csi_pb2_grpc as rpc
from .registry import Backends

_Svc = pb.PluginCapability.Service


class IdentityService(rpc.IdentityServicer):
    def __init__(self, backends: Backends, controller: bool) -> None:
        self.backends = backends
        self.controller = controller

    def GetPluginInfo(self, request, context):
        return pb.GetPluginInfoResponse(name=self.backends.config.driver_name, vendor_version=constants.VENDOR_VERSION,
                                        manifest={"backends": ",".join(self.backends.names())})

    def GetPluginCapabilities(self, request, context):
        caps = []
        if self.controller:
            caps.append(pb.PluginCapability(service=_Svc(type=_Svc.CONTROLLER_SERVICE)))
        if any(b.features().node_local for b in self.backends):
            caps.append(pb.PluginCapability(service=_Svc(type=_Svc.VOLUME_ACCESSIBILITY_CONSTRAINTS)))
        if any(b.features().expand for b in self.backends):
            online = all(b.features().online_expand for b in self.backends if b.features().expand)
            caps.append(pb.PluginCapability(volume_expansion=pb.PluginCapability.VolumeExpansion(
                type=pb.PluginCapability.VolumeExpansion.ONLINE if online else pb.PluginCapability.VolumeExpansion.OFFLINE)))
        return pb.GetPluginCapabilitiesResponse(capabilities=caps)

    def Probe(self, request, context):
        """Ready when every backend answers its probe; a failing backend is reported as not ready (the message of
        the failure goes to the log through the interceptor when it raises)."""
        for b in self.backends:
            try:
                b.probe()
            except TesseraError:
                return pb.ProbeResponse(ready=BoolValue(value=False))
        return pb.ProbeResponse(ready=BoolValue(value=True))
