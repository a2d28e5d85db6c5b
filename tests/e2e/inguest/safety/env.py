"""Two "nodes" in one guest: two `tessera-csi serve` processes with their own node IDs and state directories, the
first also serving the controller. Each node's calls go to its own plugin; whatever one stages, the other's
records know nothing about. A `Steps` stack undoes what a test made (in reverse), so a failing assertion leaves
nothing mounted or mapped for the next test."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Optional

import grpc

from csi._pb import csi_pb2 as pb
from tests.sanity.harness import Client, ServerProcess

MIB = 1 << 20
# the iSCSI backend listens on two loopback addresses: one portal per "node", so each has its own session and disk
PORTALS = ["127.0.0.1:3260", "127.0.0.2:3260"]


@dataclass
class Node:
    name: str
    server: ServerProcess
    client: Client
    node_id: str = ""

    @property
    def ctl(self):  # noqa: ANN201 - a grpc stub
        return self.client.controller

    @property
    def rpc(self):  # noqa: ANN201
        return self.client.node


@dataclass
class Pair:
    a: Node
    b: Node
    workdir: str
    steps: list[tuple[str, Callable[[], object]]] = field(default_factory=list)

    def undo(self, what: str, fn: Callable[[], object]) -> None:
        self.steps.append((what, fn))

    def mark(self) -> int:
        """A point in the undo stack: `cleanup(mark)` undoes only what came after it."""
        return len(self.steps)

    def cleanup(self, mark: int = 0) -> list[str]:
        problems = []
        while len(self.steps) > mark:
            what, fn = self.steps.pop()
            try:
                fn()
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND:
                    problems.append(f"{what}: {e.code().name}: {e.details()}")
            except Exception as e:  # noqa: BLE001 - report every leftover, not just the first
                problems.append(f"{what}: {e}")
        return problems

    def path(self, tag: str) -> str:
        return os.path.join(self.workdir, tag)

    # ---- the CO's calls ----------------------------------------------------------------------------------
    def create(self, name: str, size: int, cap: pb.VolumeCapability, parameters: Optional[dict] = None) -> pb.Volume:
        vol = self.a.ctl.CreateVolume(pb.CreateVolumeRequest(
            name=name, capacity_range=pb.CapacityRange(required_bytes=size), volume_capabilities=[cap],
            parameters=parameters or {}), timeout=120).volume
        self.undo(f"delete {vol.volume_id}", lambda: self.a.ctl.DeleteVolume(
            pb.DeleteVolumeRequest(volume_id=vol.volume_id), timeout=300))
        return vol

    def delete(self, vol: pb.Volume) -> None:
        self.a.ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id), timeout=300)

    def controller_publish(self, node: Node, vol: pb.Volume, cap: pb.VolumeCapability, readonly: bool) -> dict:
        pc = dict(self.a.ctl.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
            volume_id=vol.volume_id, node_id=node.node_id, volume_capability=cap, readonly=readonly),
            timeout=120).publish_context)
        self.undo(f"controller-unpublish {vol.volume_id} from {node.name}", lambda: self.controller_unpublish(node, vol))
        return pc

    def controller_unpublish(self, node: Node, vol: pb.Volume) -> None:
        self.a.ctl.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
            volume_id=vol.volume_id, node_id=node.node_id), timeout=120)

    def stage(self, node: Node, vol: pb.Volume, cap: pb.VolumeCapability, tag: str, pc: Optional[dict] = None,
              context: Optional[dict] = None) -> str:
        staging = self.path(f"{node.name}-stage-{tag}")
        os.makedirs(staging, exist_ok=True)
        node.rpc.NodeStageVolume(pb.NodeStageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=staging, volume_capability=cap, publish_context=pc or {},
            volume_context=context if context is not None else vol.volume_context), timeout=300)
        self.undo(f"unstage {vol.volume_id} on {node.name}", lambda: self.unstage(node, vol, staging))
        return staging

    def unstage(self, node: Node, vol: pb.Volume, staging: str) -> None:
        node.rpc.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vol.volume_id, staging_target_path=staging),
                                   timeout=300)

    def publish(self, node: Node, vol: pb.Volume, cap: pb.VolumeCapability, staging: str, tag: str,
                readonly: bool = False) -> str:
        target = self.path(f"{node.name}-pub-{tag}")
        node.rpc.NodePublishVolume(pb.NodePublishVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=staging, target_path=target, volume_capability=cap,
            readonly=readonly, volume_context=vol.volume_context), timeout=120)
        self.undo(f"unpublish {target}", lambda: self.unpublish(node, vol, target))
        return target

    def unpublish(self, node: Node, vol: pb.Volume, target: str) -> None:
        node.rpc.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=target),
                                     timeout=120)


def start_pair(config: str, prefix: str) -> Pair:
    """Node a serves controller and node, node b only the node service, each with its own state directory."""
    workdir = tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("TESSERA_SCRATCH") or None)
    nodes = []
    try:
        for name, mode in (("node-a", "all"), ("node-b", "node")):
            srv = ServerProcess(os.path.join(workdir, f"srv-{name}"), config, node_id=name,
                                extra_args=["--mode", mode]).start()
            client = Client(srv.endpoint)
            node = Node(name, srv, client)
            nodes.append(node)
            node.node_id = client.node.NodeGetInfo(pb.NodeGetInfoRequest(), timeout=30).node_id
    except BaseException:
        for n in nodes:
            n.client.close()
            n.server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return Pair(nodes[0], nodes[1], workdir)


def stop_pair(pair: Pair) -> list[str]:
    """Stop both plugins; the problems found (leftover steps, a plugin that died or exited badly)."""
    problems = pair.cleanup()
    for n in (pair.a, pair.b):
        alive = n.server.alive()
        n.client.close()
        rc = n.server.stop()
        if not alive or rc != 0:
            problems.append(f"{n.name} exited {rc}:\n{n.server.log_tail(60)}")
    shutil.rmtree(pair.workdir, ignore_errors=True)
    return problems


def mount_source(path: str) -> Optional[str]:
    """The device mounted at `path` (the top mount), from the kernel's mount table."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if parts[4] == path:
                found = parts[parts.index("-") + 2]
    return found


def mount_options(path: str) -> set[str]:
    found: set[str] = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if parts[4] == path:
                found = set(parts[5].split(","))
    return found


def digest(path: str, size: int) -> str:
    """sha256 of the first `size` bytes of a device or file, read with O_DIRECT (what is on the storage, not in
    this kernel's page cache)."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        view = memoryview(_aligned(MIB))
        off = 0
        while off < size:
            n = os.preadv(fd, [view], off)
            if n <= 0:
                break
            h.update(view[:n])
            off += n
    finally:
        os.close(fd)
    return h.hexdigest()


def _aligned(n: int) -> bytearray:
    import mmap
    return mmap.mmap(-1, n)  # type: ignore[return-value]  # page-aligned, as O_DIRECT wants


def pwrite_direct(path: str, data: bytes, offset: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        buf = _aligned(len(data))
        buf[:] = data
        assert os.pwritev(fd, [memoryview(buf)], offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def pread_direct(path: str, size: int, offset: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = _aligned(size)
        n = os.preadv(fd, [memoryview(buf)], offset)
        return bytes(buf[:n])
    finally:
        os.close(fd)


def write_refused(device: str) -> bool:
    """Whether a write through the device node fails (at open or at the write itself)."""
    try:
        pwrite_direct(device, b"\xaa" * 4096, 0)
    except OSError:
        return True
    return False
