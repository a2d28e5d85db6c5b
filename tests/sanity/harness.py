"""Talking to a CSI plugin as a container orchestrator does: a server process we start (or an endpoint we are given),
gRPC stubs on a unix socket, and a per-test ledger of what was created so that teardown undoes it in reverse order.

Used by the sanity suite, the file-backend data tests and the benchmark; it knows nothing about Tessera's insides
except how to start `tessera-csi serve`.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import grpc
import pytest

from csi import logfmt
from csi._pb import csi_pb2 as pb
from csi._pb import csi_pb2_grpc as rpc

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MIB = 1 << 20
MODE = pb.VolumeCapability.AccessMode.Mode
CTRL = pb.ControllerServiceCapability.RPC.Type
NODE = pb.NodeServiceCapability.RPC.Type
PLUGIN = pb.PluginCapability.Service.Type


def tessera_command() -> list[str]:
    """The console script of the project's venv when present (what a user runs), else the module."""
    script = os.path.join(REPO, ".venv", "bin", "tessera-csi")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-m", "csi.cli"]


class ServerProcess:
    """`tessera-csi serve` as a child process, with all its state under `workdir`; stopped by PID with SIGTERM."""

    def __init__(self, workdir: str, config: Optional[str] = None, node_id: str = "sanity-node",
                 extra_args: Sequence[str] = ()) -> None:
        self.workdir = workdir
        self.socket = os.path.join(workdir, "csi.sock")
        self.endpoint = "unix://" + self.socket
        self.state_dir = os.path.join(workdir, "state")
        self.log_path = os.path.join(workdir, "server.log")
        argv = tessera_command() + ["serve", "--endpoint", self.endpoint, "--node-id", node_id,
                                    "--state-dir", self.state_dir]
        if config:
            argv += ["--config", config]
        self.argv = argv + list(extra_args)
        self.proc: Optional[subprocess.Popen] = None
        self._log = None

    def start(self, timeout: float = 30.0) -> "ServerProcess":
        os.makedirs(self.workdir, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tessera-csi serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            if os.path.exists(self.socket):
                ch = grpc.insecure_channel(self.endpoint)
                try:
                    grpc.channel_ready_future(ch).result(timeout=1)
                    return self
                except grpc.FutureTimeoutError:
                    pass
                finally:
                    ch.close()
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"tessera-csi serve did not listen on {self.endpoint} within {timeout}s:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def written_log(self) -> str:
        """The live server's whole log so far, once its writer thread has written what the calls made until now
        logged (it writes in batches, BATCH_DELAY late at most)."""
        time.sleep(logfmt.BATCH_DELAY * 4)
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return b"\n".join(f.read().splitlines()[-lines:]).decode(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 40.0) -> Optional[int]:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log:
            self._log.close()
        return self.proc.returncode


@dataclass
class Client:
    """Stubs on one channel plus what the plugin says about itself (asked once)."""
    endpoint: str
    timeout: float = 120.0
    channel: grpc.Channel = field(init=False)
    identity: rpc.IdentityStub = field(init=False)
    controller: rpc.ControllerStub = field(init=False)
    node: rpc.NodeStub = field(init=False)

    def __post_init__(self) -> None:
        self.channel = grpc.insecure_channel(self.endpoint)
        grpc.channel_ready_future(self.channel).result(timeout=30)
        self.identity = rpc.IdentityStub(self.channel)
        self.controller = rpc.ControllerStub(self.channel)
        self.node = rpc.NodeStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def call(self, stub, method: str, request):
        return getattr(stub, method)(request, timeout=self.timeout)

    # ---- what the plugin advertises ------------------------------------------------------------------
    def plugin_caps(self) -> set[int]:
        resp = self.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest(), timeout=self.timeout)
        return {c.service.type for c in resp.capabilities if c.WhichOneof("type") == "service"}

    def expansion_type(self) -> Optional[int]:
        resp = self.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest(), timeout=self.timeout)
        for c in resp.capabilities:
            if c.WhichOneof("type") == "volume_expansion":
                return c.volume_expansion.type
        return None

    def controller_caps(self) -> set[int]:
        if PLUGIN.Value("CONTROLLER_SERVICE") not in self.plugin_caps():
            return set()
        resp = self.controller.ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest(), timeout=self.timeout)
        return {c.rpc.type for c in resp.capabilities}

    def node_caps(self) -> set[int]:
        resp = self.node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest(), timeout=self.timeout)
        return {c.rpc.type for c in resp.capabilities}


def mount_cap(fs_type: str = "", mode: str = "SINGLE_NODE_WRITER", flags: Sequence[str] = ()) -> pb.VolumeCapability:
    return pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(fs_type=fs_type, mount_flags=list(flags)),
                               access_mode=pb.VolumeCapability.AccessMode(mode=MODE.Value(mode)))


def block_cap(mode: str = "SINGLE_NODE_WRITER") -> pb.VolumeCapability:
    return pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume(),
                               access_mode=pb.VolumeCapability.AccessMode(mode=MODE.Value(mode)))


def is_block(cap: pb.VolumeCapability) -> bool:
    return cap.WhichOneof("access_type") == "block"


@dataclass
class Staged:
    volume_id: str
    staging_path: str


@dataclass
class Published:
    volume_id: str
    target_path: str


class Ledger:
    """Everything a test made on the plugin, undone in reverse order at the end (errors collected, not hidden)."""

    def __init__(self, client: Client, node_id: str, use_controller_publish: bool) -> None:
        self.client = client
        self.node_id = node_id
        self.use_controller_publish = use_controller_publish
        self._undo: list[tuple[str, Callable[[], None]]] = []

    def push(self, what: str, undo: Callable[[], None]) -> None:
        self._undo.append((what, undo))

    def forget(self, what: str) -> None:
        self._undo = [(w, u) for (w, u) in self._undo if w != what]

    def cleanup(self) -> list[str]:
        problems = []
        while self._undo:
            what, undo = self._undo.pop()
            try:
                undo()
            except grpc.RpcError as e:
                problems.append(f"{what}: {e.code().name} {e.details()}")
        return problems

    # ---- creators that register their own undo ----------------------------------------------------------
    def create_volume(self, request: pb.CreateVolumeRequest) -> pb.Volume:
        vol = self.client.controller.CreateVolume(request, timeout=self.client.timeout).volume
        vid = vol.volume_id
        key = "volume " + vid
        self.forget(key)
        self.push(key, lambda: self.client.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid),
                                                                   timeout=self.client.timeout))
        return vol

    def create_snapshot(self, request: pb.CreateSnapshotRequest) -> pb.Snapshot:
        snap = self.client.controller.CreateSnapshot(request, timeout=self.client.timeout).snapshot
        sid = snap.snapshot_id
        key = "snapshot " + sid
        self.forget(key)
        self.push(key, lambda: self.client.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=sid),
                                                                     timeout=self.client.timeout))
        return snap

    def controller_publish(self, volume_id: str, cap: pb.VolumeCapability, readonly: bool = False) -> dict:
        if not self.use_controller_publish:
            return {}
        resp = self.client.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
            volume_id=volume_id, node_id=self.node_id, volume_capability=cap, readonly=readonly),
            timeout=self.client.timeout)
        key = "controller-publish " + volume_id
        self.forget(key)
        self.push(key, lambda: self.client.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
            volume_id=volume_id, node_id=self.node_id), timeout=self.client.timeout))
        return dict(resp.publish_context)

    def stage(self, vol: pb.Volume, staging_path: str, cap: pb.VolumeCapability,
              publish_context: Optional[dict] = None) -> None:
        self.client.node.NodeStageVolume(pb.NodeStageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=staging_path, volume_capability=cap,
            publish_context=publish_context or {}, volume_context=vol.volume_context), timeout=self.client.timeout)
        key = "stage " + vol.volume_id
        self.forget(key)
        self.push(key, lambda: self.client.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=staging_path), timeout=self.client.timeout))

    def publish(self, vol: pb.Volume, staging_path: str, target_path: str, cap: pb.VolumeCapability,
                readonly: bool = False, publish_context: Optional[dict] = None) -> None:
        self.client.node.NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=staging_path, target_path=target_path,
            volume_capability=cap, readonly=readonly, publish_context=publish_context or {},
            volume_context=vol.volume_context), timeout=self.client.timeout)
        key = f"publish {vol.volume_id} {target_path}"
        self.forget(key)
        self.push(key, lambda: self.client.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(
            volume_id=vol.volume_id, target_path=target_path), timeout=self.client.timeout))

    def unpublish(self, volume_id: str, target_path: str) -> None:
        self.client.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=volume_id,
                                                                           target_path=target_path),
                                             timeout=self.client.timeout)
        self.forget(f"publish {volume_id} {target_path}")

    def unstage(self, volume_id: str, staging_path: str) -> None:
        self.client.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=volume_id,
                                                                       staging_target_path=staging_path),
                                           timeout=self.client.timeout)
        self.forget("stage " + volume_id)

    def controller_unpublish(self, volume_id: str) -> None:
        if not self.use_controller_publish:
            return
        self.client.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
            volume_id=volume_id, node_id=self.node_id), timeout=self.client.timeout)
        self.forget("controller-publish " + volume_id)

    def delete_volume(self, volume_id: str) -> None:
        self.client.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id), timeout=self.client.timeout)
        self.forget("volume " + volume_id)

    def delete_snapshot(self, snapshot_id: str) -> None:
        self.client.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=snapshot_id),
                                              timeout=self.client.timeout)
        self.forget("snapshot " + snapshot_id)


def expect_code(call, request, code: grpc.StatusCode, timeout: float = 180.0) -> grpc.RpcError:
    """Call and insist on the error `code` with a non-empty message (the spec wants errors a user can act on)."""
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=timeout)
    err = info.value
    assert err.code() == code, f"expected {code.name}, got {err.code().name}: {err.details()}"
    assert err.details(), f"{code.name} without a message"
    return err
