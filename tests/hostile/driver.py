"""The hostile run, executed inside a private mount namespace (`unshare --mount --propagation private`).

    python tests/hostile/driver.py --root DIR --requests N --seed S --report FILE

1. plants decoys under DIR (tests/hostile/world.py) and starts `tessera-csi serve --mode all` with the default
   configuration (file backend under DIR/state, no allowedPathPrefixes);
2. makes real volumes through the RPCs: two published ones whose staging and target paths and backing files are
   decoys too, and a free one that valid requests may stage and publish at fresh paths;
3. sends at least N Hypothesis-generated requests (tests/hostile/calls.py), valid and hostile mixed, over the unix
   socket, checking every answer's code and size, the server's liveness and the mount table as it goes;
4. cleans up every volume, snapshot, stage and publish the plugin accepted, through the RPCs, then compares the
   decoys with their first snapshot and looks for leaked loop devices, stage records and mounts;
5. stops the server with SIGTERM, checks it left cleanly and that its log lines are bounded and secret-free;
6. writes a JSON report: counts per method and code, and findings per kind, each with a short repro.

Nothing here judges by timing. The run is deterministic (fixed Hypothesis seed)."""
from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [REPO, HERE]

import grpc  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

import calls as C  # noqa: E402
import world as W  # noqa: E402
from csi._pb import csi_pb2 as pb  # noqa: E402
from google.protobuf.json_format import MessageToDict  # noqa: E402

NODE = "hostile-node"
TOPOLOGY_KEY = "topology.tessera.csi.dev/node"
RPC_TIMEOUT = 60.0
CHECK_EVERY = 100
MAX_ANSWER = 2048  # characters of a status message: anything longer is a finding (csi/errors.py cuts at 1024)
MAX_LOG_LINE = 8192
MARK = "HOSTILE-MARK"  # a string field set to this is sent with these bytes replaced by invalid UTF-8
BAD_UTF8 = b"\xff\xfe\xc0\xaf\x80\xff\xfe\xc0\xaf\x80\xff\xfe"
BAD_CODES = ("INTERNAL", "UNKNOWN")
SPECIAL_MAPS = {
    "{}": {},
    "@HUGE_MAP": {f"key-{i:05d}": "v" for i in range(10_000)},
    "@WIDE_MAP": {"k": "v" * 100_000},
    "@LONG_KEY": {"k" * 5000: "v"},
    "@BACKEND_LOCAL": {"backend": "local"},
    "@BACKEND_NOPE": {"backend": "nope"},
    "@BACKEND_LONG": {"backend": "b" * 5000},
    "@PVC_META": {"csi.storage.k8s.io/pvc/name": "claim", "csi.storage.k8s.io/pvc/namespace": "ns"},
    "@ONE_UNKNOWN": {"fsType": "ext4"},
    "@SECRET": {"userKey": C.SECRET, "password": C.SECRET},
}
LONG = {"@LONG5000": "local:" + "x" * 5000, "@LONG200000": "x" * 200_000}


def _short(value: Any) -> Any:
    """A request rendering fit for a report line: long strings, maps and lists cut."""
    if isinstance(value, str):
        return value if len(value) <= 120 else f"{value[:120]}...(+{len(value) - 120} characters)"
    if isinstance(value, dict):
        out = {_short(k): _short(v) for k, v in list(value.items())[:6]}
        if len(value) > 6:
            out["..."] = f"{len(value) - 6} more entries"
        return out
    if isinstance(value, list):
        return [_short(v) for v in value[:6]] + ([f"{len(value) - 6} more"] if len(value) > 6 else [])
    return value


class Findings:
    """Findings per kind: a count and the first few examples."""

    def __init__(self, keep: int = 25) -> None:
        self.keep = keep
        self.kinds: dict[str, dict] = {}

    def add(self, kind: str, what: str) -> None:
        k = self.kinds.setdefault(kind, {"count": 0, "examples": []})
        k["count"] += 1
        if len(k["examples"]) < self.keep:
            k["examples"].append(what[:1500])


class Run:
    def __init__(self, root: str) -> None:
        self.layout = W.Layout(root)
        self.findings = Findings()
        self.counts: collections.Counter = collections.Counter()
        self.sent = 0
        self.proc: Optional[subprocess.Popen] = None
        self.channel: Optional[grpc.Channel] = None
        self.free = ""
        self.free_serial = 0
        self.created: list[str] = []
        self.snapshots: list[str] = []
        self.groups: dict[str, list[str]] = {}  # group snapshot ID -> its member snapshot IDs
        self.protected: dict[str, str] = {}
        self.own_paths: dict[str, set[str]] = {}
        self.staged: dict[str, str] = {}
        self.staged_block: dict[str, bool] = {}
        self.published: set[tuple[str, str]] = set()
        self.requested: set[str] = set()
        self.decoys: list[W.Decoy] = []
        self.names: dict[str, str] = {}
        self.baseline_mounts: dict[int, W.Mount] = {}
        self.forbidden: set[str] = set()
        self.dead = False
        self.reported: set[tuple[int, str]] = set()  # (mount ID, finding) already reported

    # ---- server ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        L = self.layout
        os.makedirs(os.path.join(L.root, "cwd"), exist_ok=True)
        log = open(L.log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "csi.cli", "serve", "--endpoint", f"unix://{L.socket}",
                                      "--state-dir", L.state, "--node-id", NODE, "--mode", "all"],
                                     stdout=log, stderr=log, cwd=os.path.join(L.root, "cwd"),
                                     env={**os.environ, "PYTHONPATH": REPO})
        deadline = time.monotonic() + 60
        while not os.path.exists(L.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{open(L.log).read()[-3000:]}")
            time.sleep(0.05)
        self.channel = grpc.insecure_channel(f"unix://{L.socket}", options=[
            ("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)])
        grpc.channel_ready_future(self.channel).result(timeout=30)

    def stop(self, report: dict) -> None:
        assert self.proc is not None
        if self.channel is not None:
            self.channel.close()
        if self.proc.poll() is not None:
            self.findings.add("stop", f"server had already exited with {self.proc.returncode}")
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            self.findings.add("stop", "server still running 60 s after SIGTERM (killed)")
            return
        report["exit_code"] = rc
        if rc != 0:
            self.findings.add("stop", f"server exited with {rc} after SIGTERM")
        if os.path.exists(self.layout.socket):
            self.findings.add("stop", "socket left behind after SIGTERM")

    def rpc(self, method: str, request: Any = None, raw: Optional[bytes] = None) -> tuple[str, str, Optional[bytes]]:
        """(code name, message, response bytes) of one call."""
        assert self.channel is not None
        body = raw if raw is not None else request.SerializeToString()
        path = C.full_method(method) if not method.startswith("/") else method
        if method in C.STREAMING:  # read the whole stream (bounded), as a backup tool would
            stream = self.channel.unary_stream(path, request_serializer=None, response_deserializer=None)
            try:
                call = stream(body, timeout=RPC_TIMEOUT)
                for i, _ in enumerate(call):
                    if i >= 10_000:
                        call.cancel()
                        break
                return "OK", "", b""
            except grpc.RpcError as e:
                return e.code().name, e.details() or "", None
        fn = self.channel.unary_unary(path, request_serializer=None, response_deserializer=None)
        try:
            return "OK", "", fn(body, timeout=RPC_TIMEOUT)
        except grpc.RpcError as e:
            return e.code().name, e.details() or "", None

    # ---- setup ----------------------------------------------------------------------------------------------
    def must(self, method: str, request: Any) -> bytes:
        code, msg, body = self.rpc(method, request)
        if code != "OK":
            raise RuntimeError(f"setup {method} failed: {code} {msg}")
        assert body is not None
        return body

    def cap(self, block: bool = False) -> pb.VolumeCapability:
        mode = pb.VolumeCapability.AccessMode(mode=C.Mode.SINGLE_NODE_WRITER)
        if block:
            return pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume(), access_mode=mode)
        return pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(fs_type="ext4"), access_mode=mode)

    def create(self, name: str, size: int) -> pb.Volume:
        body = self.must("CreateVolume", pb.CreateVolumeRequest(
            name=name, volume_capabilities=[self.cap()], capacity_range=pb.CapacityRange(required_bytes=size)))
        return pb.CreateVolumeResponse.FromString(body).volume

    def new_free(self) -> None:
        """A new free volume after a request deleted the last one (the old ID stays if the create fails)."""
        self.free_serial += 1
        try:
            self.free = self.create(f"free-{self.free_serial}", 32 * C.MIB).volume_id
        except RuntimeError as e:
            if not self.free:
                raise
            self.findings.add("cleanup", f"could not make a new free volume: {e}")

    def setup(self) -> None:
        L = self.layout
        self.decoys = W.plant(L)
        self.new_free()
        paths: dict[str, str] = {}
        for key, block in (("P1", False), ("P2", True)):
            vol = self.create(f"protected-{key}", 32 * C.MIB)
            stage = os.path.join(L.kubelet, "plugins", key.lower(), "globalmount")
            target = os.path.join(L.kubelet, "pods", key.lower(), "volumes", "dev" if block else "mount")
            os.makedirs(stage)
            os.makedirs(os.path.dirname(target))
            self.must("NodeStageVolume", pb.NodeStageVolumeRequest(volume_id=vol.volume_id, staging_target_path=stage,
                                                                   volume_capability=self.cap(block)))
            self.must("NodePublishVolume", pb.NodePublishVolumeRequest(
                volume_id=vol.volume_id, staging_target_path=stage, target_path=target,
                volume_capability=self.cap(block)))
            if not block:
                with open(os.path.join(target, "data.txt"), "w") as f:
                    f.write("a protected volume's data\n")
            self.protected["@" + key] = vol.volume_id
            self.own_paths[vol.volume_id] = {stage, target}
            paths.update({f"{key}stage": stage, f"{key}target": target, f"{key}img": vol.volume_context["path"]})
            self.decoys += [W.Decoy(stage, "volume-stage", False), W.Decoy(target, "volume-target", False),
                            W.Decoy(vol.volume_context["path"], "image", True, hash_content=False)]
        self.names = {"root": L.root, "state": L.state, "kubelet": L.kubelet, "scratch": L.scratch, **paths,
                      **{f"stage{i}": p for i, p in enumerate(L.stage_dirs())},
                      **{f"target{i}": p for i, p in enumerate(L.target_paths())}}
        self.baseline_mounts = {m.mount_id: m for m in W.mount_table()}  # by ID: a renamed directory renames its mounts
        for d in self.decoys:
            if d.kind != "empty-dir":
                self.forbidden.add(d.path)
        # and every file and non-empty directory that exists now (the run's own tree included): a volume is never
        # mounted over something that is not its own; empty directories may serve as staging or target paths
        for dirpath, dirnames, filenames in os.walk(L.root):
            if dirnames or filenames:
                self.forbidden.add(dirpath)
            self.forbidden.update(os.path.join(dirpath, n) for n in filenames)

    # ---- resolving symbolic values ----------------------------------------------------------------------------
    def text(self, token: str) -> str:
        if token in LONG:
            return LONG[token]
        if token == "@LONGPATH":
            return self.layout.scratch + ("/" + "d" * 200) * 25
        if token == "@NODE":
            return NODE
        if "{" in token:
            return token.format(**self.names)
        if token.startswith("@P") and token.endswith("img"):
            return self.names[token[1:]]
        return token

    def vid(self, token: str) -> str:
        if token == "@F":
            return self.free
        if token == "@STAGED_VOL":
            return sorted(self.staged)[self.sent % len(self.staged)] if self.staged else self.free
        if token.startswith("@C"):
            return self.created[int(token[2:]) % len(self.created)] if self.created else self.free
        if token in self.protected:
            return self.protected[token]
        if token.startswith("@S"):
            return self.snapshots[int(token[2:]) % len(self.snapshots)] if self.snapshots else "local:snap-none"
        if token.startswith("@G"):
            groups = sorted(self.groups)
            return groups[int(token[2:]) % len(groups)] if groups else "local:group-none"
        if token == "@M0":
            members = sorted(m for ms in self.groups.values() for m in ms)
            return members[self.sent % len(members)] if members else "local:snap-none"
        return self.text(token)

    def path(self, token: str, vid: str = "") -> str:
        if token == "@STAGED":
            token = self.staged.get(vid, "{stage0}")
        elif token == "@PUBLISHED":
            token = next((t for v, t in sorted(self.published) if v == vid), "{target0}")
        p = self.text(token)
        if p:
            self.requested.add(p)
        return p

    def mapping(self, token: str) -> dict[str, str]:
        if token in SPECIAL_MAPS:
            return dict(SPECIAL_MAPS[token])
        return {"@CTX_P1IMG": {"path": self.names["P1img"]},
                "@CTX_DECOY": {"path": os.path.join(self.layout.kubelet, "decoys", "passwd")},
                "@CTX_RELATIVE": {"path": "../../decoys/passwd"}}[token]

    def capability(self, cap: Any, vid: str = "") -> pb.VolumeCapability:
        if cap == "@STAGED_CAP":
            block = self.staged_block.get(vid, False)
            return pb.VolumeCapability(
                access_mode=pb.VolumeCapability.AccessMode(mode=C.Mode.SINGLE_NODE_WRITER),
                **({"block": pb.VolumeCapability.BlockVolume()} if block else
                   {"mount": pb.VolumeCapability.MountVolume()}))
        out = pb.VolumeCapability()
        out.CopyFrom(cap)
        if out.HasField("mount"):
            out.mount.fs_type = self.text(out.mount.fs_type) if out.mount.fs_type.startswith("@") else out.mount.fs_type
            flags = [self.text(f) if f.startswith("@") else f for f in out.mount.mount_flags]
            del out.mount.mount_flags[:]
            out.mount.mount_flags.extend(flags)
            if out.mount.volume_mount_group.startswith("@"):
                out.mount.volume_mount_group = self.text(out.mount.volume_mount_group)
        return out

    @staticmethod
    def capacity(value: Optional[tuple[int, int]]) -> Optional[pb.CapacityRange]:
        return None if value is None else pb.CapacityRange(required_bytes=value[0], limit_bytes=value[1])

    def topology(self, token: Optional[str]) -> Optional[Any]:
        if token is None:
            return None
        if token == "@WIDE_TOPOLOGY":
            return [pb.Topology(segments={TOPOLOGY_KEY: f"n{i}", f"k{i}": "v" * 50}) for i in range(200)]
        return [pb.Topology(segments={TOPOLOGY_KEY: self.text(token)})]

    def build(self, call: C.Call) -> Any:
        """The request message of a call, its symbolic values resolved against the live world."""
        f = call.fields
        m = call.method
        vid = self.vid(f["volume_id"]) if "volume_id" in f else ""
        if vid in self.own_paths:  # a protected volume's own paths are not a hostile target: act on the free one
            named = {self.text(f[k]) for k in ("staging", "target", "path") if k in f and not f[k].startswith("@")}
            if m.startswith("Node") and named & self.own_paths[vid] or m == "ControllerExpandVolume":
                vid = self.free
        if m in ("GetPluginInfo", "GetPluginCapabilities", "Probe", "ControllerGetCapabilities",
                 "NodeGetCapabilities", "NodeGetInfo"):
            return getattr(pb, m + "Request")()
        if m == "CreateVolume":
            req = pb.CreateVolumeRequest(name=self.text(f["name"]), parameters=self.mapping(f["parameters"]),
                                         secrets=self.mapping(f["secrets"]),
                                         volume_capabilities=[self.capability(c) for c in f["caps"]])
            if f["capacity"] is not None:
                req.capacity_range.CopyFrom(self.capacity(f["capacity"]))
            if f["source"] is not None:
                kind, token = f["source"]
                if kind == "snapshot":
                    req.volume_content_source.snapshot.snapshot_id = self.vid(token)
                else:
                    req.volume_content_source.volume.volume_id = self.vid(token)
            topo = self.topology(f["topology"])
            if topo is not None:
                req.accessibility_requirements.requisite.extend(topo)
            return req
        if m == "DeleteVolume":
            return pb.DeleteVolumeRequest(volume_id=vid, secrets=self.mapping(f["secrets"]))
        if m == "ControllerPublishVolume":
            req = pb.ControllerPublishVolumeRequest(volume_id=vid, node_id=self.text(f["node_id"]),
                                                    readonly=f["readonly"], volume_context=self.mapping(f["context"]),
                                                    secrets=self.mapping(f["secrets"]))
            if f["cap"] is not None:
                req.volume_capability.CopyFrom(self.capability(f["cap"]))
            return req
        if m == "ControllerUnpublishVolume":
            return pb.ControllerUnpublishVolumeRequest(volume_id=vid, node_id=self.text(f["node_id"]),
                                                       secrets=self.mapping(f["secrets"]))
        if m == "ValidateVolumeCapabilities":
            return pb.ValidateVolumeCapabilitiesRequest(
                volume_id=vid, volume_capabilities=[self.capability(c) for c in f["caps"]],
                volume_context=self.mapping(f["context"]), parameters=self.mapping(f["parameters"]),
                secrets=self.mapping(f["secrets"]))
        if m == "ListVolumes":
            return pb.ListVolumesRequest(max_entries=f["max_entries"], starting_token=self.text(f["token"]))
        if m == "GetCapacity":
            req = pb.GetCapacityRequest(volume_capabilities=[self.capability(c) for c in f["caps"]],
                                        parameters=self.mapping(f["parameters"]))
            topo = self.topology(f["topology"])
            if topo:
                req.accessible_topology.CopyFrom(topo[0])
            return req
        if m == "CreateSnapshot":
            return pb.CreateSnapshotRequest(source_volume_id=self.vid(f["source"]), name=self.text(f["name"]),
                                            parameters=self.mapping(f["parameters"]),
                                            secrets=self.mapping(f["secrets"]))
        if m == "DeleteSnapshot":
            return pb.DeleteSnapshotRequest(snapshot_id=self.vid(f["snapshot_id"]), secrets=self.mapping(f["secrets"]))
        if m == "ListSnapshots":
            return pb.ListSnapshotsRequest(max_entries=f["max_entries"], starting_token=self.text(f["token"]),
                                           snapshot_id=self.vid(f["snapshot_id"]) if f["snapshot_id"] else "",
                                           source_volume_id=self.vid(f["source"]) if f["source"] else "")
        if m == "GetSnapshot":
            return pb.GetSnapshotRequest(snapshot_id=self.vid(f["snapshot_id"]))
        if m == "ControllerExpandVolume":
            req = pb.ControllerExpandVolumeRequest(volume_id=vid, secrets=self.mapping(f["secrets"]))
            if f["capacity"] is not None:
                req.capacity_range.CopyFrom(self.capacity(f["capacity"]))
            if f["cap"] is not None:
                req.volume_capability.CopyFrom(self.capability(f["cap"]))
            return req
        if m == "ControllerGetVolume":
            return pb.ControllerGetVolumeRequest(volume_id=vid)
        if m == "ControllerModifyVolume":
            return pb.ControllerModifyVolumeRequest(volume_id=vid, mutable_parameters=self.mapping(f["mutable"]))
        if m == "NodeStageVolume":
            req = pb.NodeStageVolumeRequest(volume_id=vid, staging_target_path=self.path(f["staging"], vid),
                                            volume_context=self.mapping(f["context"]),
                                            publish_context=self.mapping(f["publish_context"]),
                                            secrets=self.mapping(f["secrets"]))
            if f["cap"] is not None:
                req.volume_capability.CopyFrom(self.capability(f["cap"]))
            return req
        if m == "NodeUnstageVolume":
            return pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=self.path(f["staging"], vid))
        if m == "NodePublishVolume":
            req = pb.NodePublishVolumeRequest(volume_id=vid, staging_target_path=self.path(f["staging"], vid),
                                              target_path=self.path(f["target"], vid), readonly=f["readonly"],
                                              volume_context=self.mapping(f["context"]),
                                              publish_context=self.mapping(f["publish_context"]),
                                              secrets=self.mapping(f["secrets"]))
            if f["cap"] is not None:
                req.volume_capability.CopyFrom(self.capability(f["cap"], vid))
            return req
        if m == "NodeUnpublishVolume":
            return pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=self.path(f["target"], vid))
        if m == "NodeGetVolumeStats":
            return pb.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=self.path(f["path"], vid),
                                                staging_target_path=self.path(f["staging"], vid))
        if m == "NodeExpandVolume":
            req = pb.NodeExpandVolumeRequest(volume_id=vid, volume_path=self.path(f["path"], vid),
                                             staging_target_path=self.path(f["staging"], vid))
            if f["capacity"] is not None:
                req.capacity_range.CopyFrom(self.capacity(f["capacity"]))
            if f["cap"] is not None:
                req.volume_capability.CopyFrom(self.capability(f["cap"]))
            return req
        if m == "GetMetadataAllocated":
            return pb.GetMetadataAllocatedRequest(snapshot_id=self.vid(f["snapshot_id"]), starting_offset=f["offset"],
                                                  max_results=f["max_results"], secrets=self.mapping(f["secrets"]))
        if m == "GetMetadataDelta":
            return pb.GetMetadataDeltaRequest(base_snapshot_id=self.vid(f["base"]), target_snapshot_id=self.vid(f["target"]),
                                              starting_offset=f["offset"], max_results=f["max_results"],
                                              secrets=self.mapping(f["secrets"]))
        if m == "GroupControllerGetCapabilities":
            return pb.GroupControllerGetCapabilitiesRequest()
        if m == "CreateVolumeGroupSnapshot":
            return pb.CreateVolumeGroupSnapshotRequest(name=self.text(f["name"]),
                                                       source_volume_ids=[self.vid(t) for t in f["sources"]],
                                                       parameters=self.mapping(f["parameters"]),
                                                       secrets=self.mapping(f["secrets"]))
        if m in ("DeleteVolumeGroupSnapshot", "GetVolumeGroupSnapshot"):
            return getattr(pb, m + "Request")(group_snapshot_id=self.vid(f["group"]),
                                              snapshot_ids=[self.vid(t) for t in f["snapshot_ids"]],
                                              secrets=self.mapping(f["secrets"]))
        raise AssertionError(f"no builder for {m}")

    # ---- one call --------------------------------------------------------------------------------------------
    @staticmethod
    def corrupt(request: Any) -> bytes:
        """The request's bytes with its first non-empty string field (top level) made invalid UTF-8."""
        for fd in request.DESCRIPTOR.fields:
            if fd.type == fd.TYPE_STRING and not getattr(fd, "is_repeated", False) and getattr(request, fd.name):
                setattr(request, fd.name, MARK)
                return request.SerializeToString().replace(MARK.encode(), BAD_UTF8)
        return request.SerializeToString() + b"\x0a\x05ab"  # a truncated field: undecodable all the same

    @staticmethod
    def describe(call: C.Call, request: Any) -> str:
        if call.raw is not None:
            return f"{call.method} raw bytes {call.raw!r}"
        try:
            text = json.dumps(_short(MessageToDict(request, preserving_proto_field_name=True)))
        except Exception:  # noqa: BLE001 - a description must not stop the run
            text = repr(call.fields)
        return f"{call.method}{' (one string field not UTF-8)' if call.corrupt else ''} {text[:900]}"

    def execute(self, call: C.Call) -> None:
        if self.dead:
            return
        request = None
        if call.raw is not None:
            method, body = call.method, call.raw
            name = call.method.rsplit("/", 1)[1]
        else:
            request = self.build(call)
            name = method = call.method
            body = self.corrupt(request) if call.corrupt else None
        code, msg, reply = self.rpc(method, request, raw=body)
        self.sent += 1
        self.counts[f"{name} {code}"] += 1
        if code in BAD_CODES:
            self.findings.add("internal", f"{code} {msg[:300]!r} <- {self.describe(call, request)}")
        if len(msg) > MAX_ANSWER or (code == "RESOURCE_EXHAUSTED" and "metadata" in msg.lower()):
            self.findings.add("long-answer", f"{code} message of {len(msg)} characters <- {self.describe(call, request)}")
        if code == "DEADLINE_EXCEEDED" or (code == "UNAVAILABLE" and ("connect" in msg.lower() or "socket" in msg.lower())):
            self.findings.add("unresponsive", f"{code} {msg[:200]!r} <- {self.describe(call, request)}")
        if call.corrupt and code not in ("INVALID_ARGUMENT", "UNIMPLEMENTED"):
            self.findings.add("undecodable", f"{code} {msg[:200]!r} <- {self.describe(call, request)}")
        if code == "OK" and reply is not None and request is not None:
            self.track(name, request, reply)
        if self.sent % CHECK_EVERY == 0:
            self.check_alive()
            self.check_mounts()

    def track(self, method: str, req: Any, reply: bytes) -> None:
        """Remember what the plugin accepted, to undo it through the RPCs at the end."""
        if method == "CreateVolume":
            vid = pb.CreateVolumeResponse.FromString(reply).volume.volume_id
            if vid not in self.created and vid != self.free and vid not in self.protected.values():
                self.created.append(vid)
        elif method == "DeleteVolume" and req.volume_id == self.free:
            self.new_free()
        elif method == "CreateSnapshot":
            sid = pb.CreateSnapshotResponse.FromString(reply).snapshot.snapshot_id
            if sid not in self.snapshots:
                self.snapshots.append(sid)
        elif method == "CreateVolumeGroupSnapshot":
            group = pb.CreateVolumeGroupSnapshotResponse.FromString(reply).group_snapshot
            self.groups[group.group_snapshot_id] = [s.snapshot_id for s in group.snapshots]
        elif method == "DeleteVolumeGroupSnapshot":
            self.groups.pop(req.group_snapshot_id, None)
        elif method == "NodeStageVolume":
            self.staged[req.volume_id] = req.staging_target_path
            self.staged_block[req.volume_id] = req.volume_capability.HasField("block")
        elif method == "NodeUnstageVolume":
            if self.staged.get(req.volume_id) == req.staging_target_path:
                del self.staged[req.volume_id]
        elif method == "NodePublishVolume":
            self.published.add((req.volume_id, req.target_path))
        elif method == "NodeUnpublishVolume":
            self.published.discard((req.volume_id, req.target_path))

    # ---- checks while running ----------------------------------------------------------------------------------
    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            self.findings.add("unresponsive", f"server exited with {self.proc.returncode} after {self.sent} requests")
            self.dead = True
            return
        code, msg, body = self.rpc("Probe", pb.ProbeRequest())
        if code != "OK":
            self.findings.add("unresponsive", f"Probe answered {code} {msg[:200]!r} after {self.sent} requests")

    def check_mounts(self) -> None:
        L = self.layout
        now = {m.mount_id: m for m in W.mount_table()}
        for mid, m in sorted(self.baseline_mounts.items()):
            if mid not in now and m.mountpoint.startswith(L.root + "/") and (mid, "removed") not in self.reported:
                self.reported.add((mid, "removed"))
                self.findings.add("mount-outside", f"mount {m.fstype} {m.source} at {m.mountpoint} (a decoy or a "
                                                    f"protected volume's) was removed (after {self.sent} requests)")
        for mid, m in sorted(now.items()):
            if mid in self.baseline_mounts:
                continue
            mp, why = m.mountpoint, None
            if mp == L.state or mp.startswith(L.state + "/"):
                why = "inside the plugin's own state directory"
            elif not mp.startswith(L.root + "/"):
                why = "outside the run's directory"
            elif mp in self.forbidden:
                why = "over a decoy or another volume's path"
            elif mp not in self.requested:
                why = "at a path no request named"
            if why and (mid, why) not in self.reported:
                self.reported.add((mid, why))
                self.findings.add("mount-outside", f"{m.fstype} {m.source} mounted at {mp}: {why} "
                                                    f"(after {self.sent} requests)")

    # ---- the end -----------------------------------------------------------------------------------------------
    def cleanup(self) -> None:
        """Undo through the RPCs everything the plugin accepted; a failure is a finding."""
        def undo(method: str, request: Any, ok: tuple[str, ...] = ("OK",)) -> None:
            code, msg, _ = self.rpc(method, request)
            if code not in ok:
                self.findings.add("cleanup", f"{method} {code} {msg[:300]!r} <- {self.describe(C.Call(method), request)}")

        for vid, target in sorted(self.published):
            undo("NodeUnpublishVolume", pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target))
        for vid, stage in sorted(self.staged.items()):
            undo("NodeUnstageVolume", pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=stage))
        for key, vid in sorted(self.protected.items()):
            stage, target = (self.names[f"{key[1:]}stage"], self.names[f"{key[1:]}target"])
            undo("NodeUnpublishVolume", pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target))
            undo("NodeUnstageVolume", pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=stage))
        for gid in sorted(self.groups):
            undo("DeleteVolumeGroupSnapshot", pb.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=gid))
        for sid in self.snapshots:
            undo("DeleteSnapshot", pb.DeleteSnapshotRequest(snapshot_id=sid))
        for vid in self.created + [self.free] + list(self.protected.values()):
            undo("DeleteVolume", pb.DeleteVolumeRequest(volume_id=vid))
        code, msg, body = self.rpc("ListVolumes", pb.ListVolumesRequest())
        if code == "OK" and body is not None:
            left = [e.volume.volume_id for e in pb.ListVolumesResponse.FromString(body).entries]
            if left:
                self.findings.add("cleanup", f"volumes left after deleting every one the run made: {left[:5]}")
        code, msg, body = self.rpc("ListSnapshots", pb.ListSnapshotsRequest())
        if code == "OK" and body is not None:
            left = [e.snapshot.snapshot_id for e in pb.ListSnapshotsResponse.FromString(body).entries]
            if left:
                self.findings.add("cleanup", f"snapshots left after deleting every group and snapshot the run made: "
                                             f"{left[:5]}")

    def check_leaks(self) -> None:
        L = self.layout
        for dev, back in sorted(W.loop_devices().items()):
            if back.startswith(L.root + "/"):
                self.findings.add("leak", f"loop device {dev} still attached to {back}")
        node_dir = os.path.join(L.state, "node")
        for dirpath, _, files in os.walk(node_dir):
            for n in files:
                if n.endswith(".json"):
                    self.findings.add("leak", f"stage record left: {os.path.join(dirpath, n)}")
        decoy_mounts = {d.path for d in self.decoys if d.kind == "tmpfs"}
        for m in W.mount_table():
            if m.mountpoint.startswith(L.root + "/") and m.mountpoint not in decoy_mounts:
                self.findings.add("leak", f"mount left after cleanup: {m.fstype} {m.source} at {m.mountpoint}")

    def check_log(self, report: dict) -> None:
        longest, total, secret = 0, 0, 0
        with open(self.layout.log, errors="replace") as f:
            for line in f:
                total += len(line)
                longest = max(longest, len(line))
                if len(line) > MAX_LOG_LINE:
                    self.findings.add("log", f"log line of {len(line)} characters: {line[:300]!r}")
                if C.SECRET in line:
                    secret += 1
        if secret:
            self.findings.add("log", f"the secret value reached the log on {secret} lines")
        report["log_bytes"], report["log_longest_line"] = total, longest

    def force_clean(self) -> None:
        """Whatever the outcome, leave no loop device or process behind (mounts die with the namespace)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for m in reversed(W.mount_table()):
            if m.mountpoint.startswith(self.layout.root + "/"):
                subprocess.run(["umount", "-l", m.mountpoint], capture_output=True, timeout=30)
        for dev, back in W.loop_devices().items():
            if back.startswith(self.layout.root + "/"):
                subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=20261206)
    ap.add_argument("--report", required=True)
    a = ap.parse_args()
    run = Run(a.root)
    report: dict[str, Any] = {"seed": a.seed}
    t0 = time.monotonic()
    try:
        report["foreign_fuse_mounts_dropped"] = W.drop_foreign_fuse_mounts(a.root)
        report["foreign_tmp_mounts_dropped"] = W.drop_foreign_tmp_mounts(a.root)
        run.start()
        run.setup()
        before = W.snapshot(run.decoys)
        report["decoys"] = {d.path: d.kind for d in run.decoys}
        settings_ = settings(max_examples=a.requests, deadline=None, database=None, phases=[Phase.generate],
                             suppress_health_check=list(HealthCheck), derandomize=False)
        for round_ in range(5):  # Hypothesis may stop a round early; top up with the next seed
            if run.sent >= a.requests or run.dead:
                break

            @seed(a.seed + round_)
            @settings_
            @given(C.CALLS)
            def hostile(call: C.Call) -> None:
                if run.sent < a.requests:
                    run.execute(call)

            hostile()
        report["requests"] = run.sent
        run.check_alive()
        run.check_mounts()
        after_run = W.snapshot(run.decoys)
        volume_decoys = {d.path for d in run.decoys if d.kind.startswith("volume") or d.kind == "image"}
        for diff, _ in W.differences({p: v for p, v in before.items() if p in volume_decoys}, after_run):
            run.findings.add("decoy", f"a protected volume changed: {diff}")
        if not run.dead:
            run.cleanup()
        after = W.snapshot(run.decoys)
        empty_dirs = {d.path for d in run.decoys if d.kind == "empty-dir"}
        for diff, changed in W.differences({p: v for p, v in before.items() if p not in volume_decoys}, after):
            # an empty directory removed and made anew (same name, mode, owner, content; another inode) is told
            # apart from every other change, so that its known cause can be tracked on its own
            replaced = diff.split(":")[0] in empty_dirs and changed == ["ino"]
            run.findings.add("decoy-empty-dir-replaced" if replaced else "decoy", diff)
        run.check_leaks()
        run.stop(report)
        run.check_log(report)
    except Exception:  # noqa: BLE001 - the report says what broke
        report["error"] = traceback.format_exc()[-4000:]
    finally:
        run.force_clean()
    report["seconds"] = round(time.monotonic() - t0, 1)
    report["counts"] = dict(sorted(run.counts.items()))
    report["findings"] = run.findings.kinds
    with open(a.report, "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
