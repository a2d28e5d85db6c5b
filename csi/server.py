"""The gRPC server: services by mode, health service, unix socket handling, graceful shutdown."""
from __future__ import annotations

import logging
import os
import signal
import socket
import stat
import sys
import threading
from concurrent import futures
from dataclasses import dataclass
from typing import Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from . import groupops, logfmt, memtrim, snapshot_metadata
from ._pb import csi_pb2_grpc as rpc
from .config import Config
from .controller import ControllerService
from .controllerops import ControllerOps
from .group_controller import GroupControllerService
from .identity import IdentityService
from .interceptors import RpcInterceptor
from .locks import KeyedLocks
from .node import NodeService
from .nodeops import NodeOps
from .registry import Backends

log = logging.getLogger(__name__)
MODES = ("all", "controller", "node")


class EndpointError(Exception):
    pass


def socket_path(endpoint: str) -> str:
    if not endpoint.startswith("unix://"):
        raise EndpointError(f"endpoint {endpoint!r} must be unix:///absolute/path")
    path = endpoint[len("unix://"):]
    if not path.startswith("/"):
        raise EndpointError(f"endpoint {endpoint!r} must name an absolute socket path (unix:///...)")
    return path


def clear_stale_socket(path: str) -> None:
    """Remove a socket file left by a crashed server; refuse if a live server still answers on it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise EndpointError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1)
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: stale
        return
    finally:
        probe.close()
    raise EndpointError(f"another server is already listening on {path}")


@dataclass
class Server:
    grpc_server: grpc.Server
    path: str
    backends: Backends
    health: health.HealthServicer

    def stop(self, grace: float = 30.0) -> None:
        """Stop accepting calls, let in-flight calls finish (up to `grace` seconds), remove the socket."""
        self.health.enter_graceful_shutdown()
        self.grpc_server.stop(grace).wait()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.backends.close()


def build(config: Config, endpoint: str, node_name: str, mode: str = "all", workers: int = 32) -> Server:
    if mode not in MODES:
        raise EndpointError(f"mode must be one of {', '.join(MODES)}")
    path = socket_path(endpoint)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    clear_stale_socket(path)
    backends = Backends(config, node_name)
    locks = KeyedLocks()  # shared: controller and node calls on one volume exclude each other too
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
                         interceptors=[RpcInterceptor()])
    controller = mode in ("all", "controller")
    rpc.add_IdentityServicer_to_server(IdentityService(backends, controller, mode in ("all", "node")), server)
    if controller:
        rpc.add_ControllerServicer_to_server(ControllerService(ControllerOps(backends, locks, serving=True)), server)
        if groupops.supported(backends):  # else absent: UNIMPLEMENTED, and GROUP_CONTROLLER_SERVICE not advertised
            rpc.add_GroupControllerServicer_to_server(
                GroupControllerService(groupops.GroupOps(backends, locks)), server)
        if snapshot_metadata.supported(backends):  # else absent: a caller meets UNIMPLEMENTED, as for any service
            snapshot_metadata.add_to_server(snapshot_metadata.SnapshotMetadataService(
                snapshot_metadata.SnapshotMetadataOps(backends, locks)), server)
    if mode in ("all", "node"):
        nodeops = NodeOps(backends, config.node.maxVolumesPerNode, config.node.allowedPathPrefixes, locks)
        nodeops.reconcile()  # records whose mounts and devices are gone (a reboot) are dropped, and logged
        rpc.add_NodeServicer_to_server(NodeService(nodeops), server)
    memtrim.start()  # freed memory of a burst of calls goes back to the kernel once the burst is over
    hs = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    if server.add_insecure_port(endpoint) == 0:
        raise EndpointError(f"could not listen on {endpoint}")
    server.start()
    os.chmod(path, 0o660)
    hs.set("", health_pb2.HealthCheckResponse.SERVING)
    return Server(server, path, backends, hs)


def serve_forever(srv: Server, grace: float = 30.0) -> None:
    """Block until SIGTERM/SIGINT, then shut down gracefully."""
    done = threading.Event()

    def on_signal(signum, frame):
        log.info('{"event": "shutdown", "signal": "%s"}', signal.Signals(signum).name)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    done.wait()
    srv.stop(grace)
    log.info('{"event": "stopped"}')
    logging.shutdown()
    logfmt.flush()  # the log writer's queue: os._exit below runs no exit handlers
    sys.stdout.flush()
    sys.stderr.flush()
    # Every RPC has finished (or was cancelled after the grace period) and the backends are closed. Threads that
    # storage libraries leave behind must not keep a stopped plugin alive (seen: after failed iSCSI logins the
    # interpreter's exit-time join of a worker thread never returned), so leave without the interpreter's teardown.
    os._exit(0)
