"""CSI Identity service."""
from __future__ import annotations

import json
import logging

from google.protobuf.wrappers_pb2 import BoolValue

from backends.errors import TesseraError

from . import constants
from ._pb import csi_pb2 as pb
from ._pb import csi_pb2_grpc as rpc
from .registry import Backends

_Svc = pb.PluginCapability.Service
log = logging.getLogger(__name__)


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
        if any(b.features().node_local for b in self.backends):
            caps.append(pb.PluginCapability(service=_Svc(type=_Svc.VOLUME_ACCESSIBILITY_CONSTRAINTS)))
        if any(b.features().expand for b in self.backends):
            online = all(b.features().online_expand for b in self.backends if b.features().expand)
            caps.append(pb.PluginCapability(volume_expansion=pb.PluginCapability.VolumeExpansion(
                type=pb.PluginCapability.VolumeExpansion.ONLINE if online else pb.PluginCapability.VolumeExpansion.OFFLINE)))
        return pb.GetPluginCapabilitiesResponse(capabilities=caps)

    def Probe(self, request, context):
        """Ready when every backend answers the probes of the services this process serves: the controller's
        (storage reachable) and/or the node's (this node can attach). A failure is logged and reported as not ready."""
        for b in self.backends:
            try:
                if self.controller:
                    b.probe()
                if self.node:
                    b.node_probe()
            except TesseraError as e:
                log.warning('{"event": "probe", "backend": "%s", "ready": false, "message": %s}', b.name,
                            json.dumps(str(e)))
                return pb.ProbeResponse(ready=BoolValue(value=False))
        return pb.ProbeResponse(ready=BoolValue(value=True))
