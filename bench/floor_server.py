#!/usr/bin/env python3
"""The floor of a Python CSI controller on RBD: a bare grpcio server (the same csi.v1 service, the same 32-worker
thread pool as `tessera-csi serve`) whose CreateVolume is one `RBD().create` and DeleteVolume one `RBD().remove`:
no validation, no locks, no commit, no logging. bench/bench_rbd.py runs it beside Tessera, so the figures split
Tessera's cost into what any Python gRPC server pays (this process against raw librbd) and what Tessera itself adds
(Tessera against this process). Not a driver: nothing here is safe to retry or to run twice.

    python bench/floor_server.py SOCKET CONF USER KEYRING POOL FEATURES
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from concurrent import futures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import grpc  # noqa: E402
import rados  # noqa: E402
import rbd  # noqa: E402

from csi._pb import csi_pb2 as pb  # noqa: E402
from csi._pb import csi_pb2_grpc as rpc  # noqa: E402


class FloorController(rpc.ControllerServicer):
    def __init__(self, io: rados.Ioctx, features: int) -> None:
        self.io = io
        self.features = features

    def CreateVolume(self, request, context):  # noqa: N802 - the gRPC method name
        image = "floor-" + request.name
        rbd.RBD().create(self.io, image, request.capacity_range.required_bytes, features=self.features)
        return pb.CreateVolumeResponse(volume=pb.Volume(volume_id=image,
                                                        capacity_bytes=request.capacity_range.required_bytes))

    def DeleteVolume(self, request, context):  # noqa: N802
        rbd.RBD().remove(self.io, request.volume_id)
        return pb.DeleteVolumeResponse()


def main() -> int:
    sock, conf, user, keyring, pool, features = sys.argv[1:7]
    cluster = rados.Rados(rados_id=user.removeprefix("client."), conffile=conf, conf={"keyring": keyring})
    cluster.connect(timeout=30)
    io = cluster.open_ioctx(pool)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    rpc.add_ControllerServicer_to_server(FloorController(io, int(features)), server)
    server.add_insecure_port("unix://" + sock)
    server.start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    server.stop(5).wait()
    io.close()
    cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
