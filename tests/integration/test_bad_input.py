"""Bad input gets the code the CSI spec names, over the real socket of a running `tessera-csi serve` (issue 10).

Each case was an INTERNAL, an UNKNOWN or a client-side RESOURCE_EXHAUSTED before: out-of-range enums, sizes past
what the storage can hold, requests protobuf cannot decode, 10,000-key parameter maps, NodeExpandVolume to a size
the device never reaches (which used to hold the volume's lock for 30 s). Log lines stay bounded."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request

import grpc
import pytest

from csi import logfmt
from csi._pb import csi_pb2 as pb
from csi._pb import csi_pb2_grpc as rpc

TESSERA = [sys.executable, "-m", "csi.cli"]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
Mode = pb.VolumeCapability.AccessMode
MIB = 1 << 20


def _log_lines(server) -> list[str]:
    """The live server's log so far: its writer thread writes lines in batches, BATCH_DELAY late at most."""
    time.sleep(logfmt.BATCH_DELAY * 4)
    with open(server["log"]) as f:
        return f.readlines()


def cap(mode: int = Mode.SINGLE_NODE_WRITER, block: bool = False) -> pb.VolumeCapability:
    if block:
        return pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume(), access_mode=Mode(mode=mode))
    return pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(fs_type="ext4"), access_mode=Mode(mode=mode))


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("badinput")
    sock, port = str(tmp / "csi.sock"), _free_port()
    log = open(tmp / "server.log", "w+")
    proc = subprocess.Popen(TESSERA + ["serve", "--endpoint", f"unix://{sock}", "--state-dir", str(tmp / "state"),
                                       "--node-id", "bad-input-node", "--metrics-address", f"127.0.0.1:{port}"],
                            stdout=log, stderr=log, text=True, cwd=REPO)
    ch = grpc.insecure_channel(f"unix://{sock}")
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            assert proc.poll() is None and time.monotonic() < deadline, "server did not come up"
            time.sleep(0.05)
        grpc.channel_ready_future(ch).result(timeout=20)
        yield {"channel": ch, "tmp": tmp, "port": port, "log": tmp / "server.log", "proc": proc}
    finally:
        ch.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        log.close()


@pytest.fixture(scope="module")
def volume(server):
    ctl = rpc.ControllerStub(server["channel"])
    vid = ctl.CreateVolume(pb.CreateVolumeRequest(name="bad-input-vol", volume_capabilities=[cap()],
                                                  capacity_range=pb.CapacityRange(required_bytes=16 * MIB)),
                           timeout=60).volume.volume_id
    yield vid
    ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid), timeout=60)


def code_of(fn, request, timeout: float = 60) -> tuple[grpc.StatusCode, str]:
    try:
        fn(request, timeout=timeout)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""


@pytest.mark.parametrize("mode", [99, -1, 2 ** 30, -(2 ** 31)])
def test_access_mode_out_of_range_is_invalid_argument(server, volume, mode):
    ch = server["channel"]
    ctl, node = rpc.ControllerStub(ch), rpc.NodeStub(ch)
    stage = str(server["tmp"] / "stage-enum")
    os.makedirs(stage, exist_ok=True)
    calls = [
        (ctl.CreateVolume, pb.CreateVolumeRequest(name="enum", volume_capabilities=[cap(mode)])),
        (ctl.CreateVolume, pb.CreateVolumeRequest(name="enum", volume_capabilities=[cap(), cap(mode, block=True)])),
        (ctl.ValidateVolumeCapabilities, pb.ValidateVolumeCapabilitiesRequest(volume_id=volume,
                                                                               volume_capabilities=[cap(mode)])),
        (ctl.GetCapacity, pb.GetCapacityRequest(volume_capabilities=[cap(mode)])),
        (ctl.ControllerExpandVolume, pb.ControllerExpandVolumeRequest(
            volume_id=volume, capacity_range=pb.CapacityRange(required_bytes=32 * MIB), volume_capability=cap(mode))),
        (node.NodeStageVolume, pb.NodeStageVolumeRequest(volume_id=volume, staging_target_path=stage,
                                                         volume_capability=cap(mode))),
        (node.NodePublishVolume, pb.NodePublishVolumeRequest(volume_id=volume, staging_target_path=stage,
                                                             target_path=stage + "-t", volume_capability=cap(mode))),
        (node.NodeExpandVolume, pb.NodeExpandVolumeRequest(volume_id=volume, volume_path=stage,
                                                           volume_capability=cap(mode))),
    ]
    for fn, req in calls:
        code, msg = code_of(fn, req)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (type(req).__name__, code, msg)
        assert "access_mode" in msg and str(mode) in msg, msg
    assert not os.path.exists(stage + "-t")


@pytest.mark.parametrize("size", [16 << 40, 2 ** 62, 2 ** 63 - 1])
def test_sizes_past_the_backend_are_out_of_range(server, volume, size):
    ctl = rpc.ControllerStub(server["channel"])
    code, msg = code_of(ctl.ControllerExpandVolume, pb.ControllerExpandVolumeRequest(
        volume_id=volume, capacity_range=pb.CapacityRange(required_bytes=size)))
    assert code == grpc.StatusCode.OUT_OF_RANGE, (code, msg)
    assert "largest volume" in msg
    got = ctl.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=volume), timeout=30)
    assert got.volume.capacity_bytes == 16 * MIB and not got.status.volume_condition.abnormal
    code, msg = code_of(ctl.CreateVolume, pb.CreateVolumeRequest(
        name=f"huge-{size}", volume_capabilities=[cap()], capacity_range=pb.CapacityRange(required_bytes=size)))
    assert code == grpc.StatusCode.OUT_OF_RANGE, (code, msg)
    names = [e.volume.volume_id for e in ctl.ListVolumes(pb.ListVolumesRequest(), timeout=30).entries]
    assert names == [volume], "a refused CreateVolume left a volume behind"


def test_get_capacity_names_the_largest_volume_create_accepts(server):
    ctl = rpc.ControllerStub(server["channel"])
    most = ctl.GetCapacity(pb.GetCapacityRequest(volume_capabilities=[cap()]), timeout=30).maximum_volume_size.value
    assert most > 0
    code, _ = code_of(ctl.CreateVolume, pb.CreateVolumeRequest(
        name="just-over", volume_capabilities=[cap()], capacity_range=pb.CapacityRange(required_bytes=most + 1)))
    assert code == grpc.StatusCode.OUT_OF_RANGE


def test_node_expand_past_the_storage_answers_at_once(server, volume):
    """The device of an unstaged volume is never waited for: OUT_OF_RANGE without holding the lock (a second call on
    the same volume right after is not ABORTED)."""
    node = rpc.NodeStub(server["channel"])
    path = str(server["tmp"] / "expand-path")
    os.makedirs(path, exist_ok=True)
    for size in (2 ** 62, 64 * MIB):  # past the backend; past what the storage holds now (16 MiB)
        code, msg = code_of(node.NodeExpandVolume, pb.NodeExpandVolumeRequest(
            volume_id=volume, volume_path=path, capacity_range=pb.CapacityRange(required_bytes=size)), timeout=10)
        assert code == grpc.StatusCode.OUT_OF_RANGE, (size, code, msg)
    code, msg = code_of(node.NodeExpandVolume, pb.NodeExpandVolumeRequest(
        volume_id=volume, volume_path=path, capacity_range=pb.CapacityRange(required_bytes=-5)), timeout=10)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, msg)


def _raw(channel: grpc.Channel, method: str):
    return channel.unary_unary(method, request_serializer=None, response_deserializer=None)


def _metric(port: int, method: str, code: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    key = f'tessera_csi_requests_total{{code="{code}",method="{method}"}} '
    for line in text.splitlines():
        if line.startswith(key):
            return float(line[len(key):])
    return 0.0


@pytest.mark.parametrize("method,message", [
    ("/csi.v1.Controller/DeleteVolume", pb.DeleteVolumeRequest(volume_id="MARK")),
    ("/csi.v1.Controller/CreateVolume", pb.CreateVolumeRequest(name="x", parameters={"MARK": "v"})),
    ("/csi.v1.Node/NodeUnpublishVolume", pb.NodeUnpublishVolumeRequest(volume_id="v", target_path="/tmp/MARK")),
    ("/csi.v1.Identity/GetPluginInfo", None),
])
def test_undecodable_request_is_invalid_argument_logged_and_counted(server, method, message):
    short = method.rsplit("/", 1)[1]
    before = _metric(server["port"], short, "INVALID_ARGUMENT")
    if message is None:
        raw = b"\x0a\x02\xff\xfe" + b"\xff" * 3  # field 1 of an empty message: junk that does not parse
    else:
        raw = message.SerializeToString().replace(b"MARK", b"\xff\xfe\xc0\x80")  # not UTF-8 in a string field
    try:
        _raw(server["channel"], method)(raw, timeout=10)
        code, msg = grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        code, msg = e.code(), e.details()
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, msg)
    assert "not a valid csi.v1." in msg
    assert _metric(server["port"], short, "INVALID_ARGUMENT") == before + 1
    lines = [l for l in _log_lines(server) if f'"method": "{short}"' in l and "not a valid csi.v1." in l]
    assert lines, "the undecodable request was not logged"


def test_valid_bytes_still_decode(server):
    """The raw-bytes handlers keep the wire format: a request serialized by hand is answered like a stub's."""
    raw = pb.GetPluginInfoRequest().SerializeToString()
    reply = pb.GetPluginInfoResponse.FromString(_raw(server["channel"], "/csi.v1.Identity/GetPluginInfo")(raw, timeout=10))
    assert reply.name == "tessera.csi.dev"


def test_huge_maps_and_strings_get_short_answers(server, volume):
    ch = server["channel"]
    ctl, node = rpc.ControllerStub(ch), rpc.NodeStub(ch)
    many = {f"key-{i:05d}": "v" * 10 for i in range(10_000)}
    code, msg = code_of(ctl.CreateVolume, pb.CreateVolumeRequest(name="params", volume_capabilities=[cap()],
                                                                  parameters=many))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, msg[:300])
    assert "and 9,995 more" in msg and len(msg) < 1100
    code, msg = code_of(ctl.GetCapacity, pb.GetCapacityRequest(parameters=many))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and len(msg) < 1100, (code, msg[:300])
    long_id = "local:" + "x" * 200_000
    long_path = "/" + "d" * 100_000
    for fn, req in [
        (ctl.DeleteVolume, pb.DeleteVolumeRequest(volume_id=long_id)),
        (ctl.ControllerGetVolume, pb.ControllerGetVolumeRequest(volume_id=long_id)),
        (ctl.CreateVolume, pb.CreateVolumeRequest(name="n" * 200_000, volume_capabilities=[cap()])),
        (ctl.CreateSnapshot, pb.CreateSnapshotRequest(name="s", source_volume_id=long_id)),
        (node.NodeUnpublishVolume, pb.NodeUnpublishVolumeRequest(volume_id=volume, target_path=long_path)),
        (node.NodeStageVolume, pb.NodeStageVolumeRequest(volume_id=long_id, staging_target_path=long_path,
                                                         volume_capability=cap(), volume_context=many)),
    ]:
        code, msg = code_of(fn, req)
        assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                            grpc.StatusCode.RESOURCE_EXHAUSTED), (type(req).__name__, code, msg[:300])
        assert len(msg) <= 1100, (type(req).__name__, len(msg))
    longest = max(len(l) for l in _log_lines(server))
    assert longest < 8192, f"a log line of {longest} characters"


def test_busy_unmount_is_failed_precondition_naming_the_holder(tmp_path):
    """`umount` refused with EBUSY: InUse (FAILED_PRECONDITION), naming the process that holds the mount. Runs in a
    private mount namespace on a tmpfs under a temporary directory."""
    if subprocess.run(["unshare", "--mount", "--propagation", "private", "true"]).returncode != 0:
        pytest.skip("MISSING: unshare --mount (root in a private mount namespace)")
    script = textwrap.dedent(f"""
        import os, subprocess, sys
        sys.path.insert(0, {REPO!r})
        from backends.errors import InUse
        from csi import mounts
        from csi.errors import status_for
        target = {str(tmp_path / "busy")!r}
        os.makedirs(target)
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", target], check=True)
        holder = subprocess.Popen(["sleep", "60"], cwd=target)
        try:
            mounts.unmount_all(target)
            print("UNMOUNTED")
        except InUse as e:
            code, msg = status_for(e)
            print(code.name, msg)
        finally:
            holder.kill()
            holder.wait()
            subprocess.run(["umount", target])
    """)
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c", script],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("FAILED_PRECONDITION"), out.stdout + out.stderr
    assert "busy" in out.stdout and "sleep[" in out.stdout, out.stdout


def _loops_of(path_prefix: str) -> list[str]:
    out = subprocess.run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"], capture_output=True,
                         text=True, timeout=30).stdout
    return [l for l in out.splitlines() if path_prefix in l]


def test_xfs_on_a_volume_too_small_for_it_is_invalid_argument(server):
    ch = server["channel"]
    ctl, node = rpc.ControllerStub(ch), rpc.NodeStub(ch)
    xfs = pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(fs_type="xfs"),
                              access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER))
    vid = ctl.CreateVolume(pb.CreateVolumeRequest(name="small-xfs", volume_capabilities=[xfs],
                                                  capacity_range=pb.CapacityRange(required_bytes=16 * MIB)),
                           timeout=60).volume.volume_id
    stage = str(server["tmp"] / "stage-xfs")
    os.makedirs(stage)
    try:
        code, msg = code_of(node.NodeStageVolume, pb.NodeStageVolumeRequest(
            volume_id=vid, staging_target_path=stage, volume_capability=xfs))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, msg)
        assert "300 MiB" in msg
        assert not _loops_of(str(server["tmp"])), "the refused stage left a loop device attached"
    finally:
        ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid), timeout=60)


def test_expanding_a_read_only_staged_volume_is_failed_precondition(server):
    ch = server["channel"]
    ctl, node = rpc.ControllerStub(ch), rpc.NodeStub(ch)
    reader = pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(fs_type="ext4"),
                                 access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER))
    vid = ctl.CreateVolume(pb.CreateVolumeRequest(name="ro-grow", volume_capabilities=[reader],
                                                  capacity_range=pb.CapacityRange(required_bytes=16 * MIB)),
                           timeout=60).volume.volume_id
    stage = str(server["tmp"] / "stage-ro")
    os.makedirs(stage)
    try:
        node.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id=vid, staging_target_path=stage,
                                                       volume_capability=reader), timeout=60)  # formats it
        node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=stage), timeout=60)
        reader.mount.mount_flags.append("ro")
        node.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id=vid, staging_target_path=stage,
                                                       volume_capability=reader), timeout=60)
        ctl.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
            volume_id=vid, capacity_range=pb.CapacityRange(required_bytes=32 * MIB)), timeout=60)
        code, msg = code_of(node.NodeExpandVolume, pb.NodeExpandVolumeRequest(
            volume_id=vid, volume_path=stage, capacity_range=pb.CapacityRange(required_bytes=32 * MIB)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION, (code, msg)
        assert "read-only" in msg
    finally:
        node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=stage), timeout=60)
        ctl.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid), timeout=60)


def test_undecodable_streaming_request_is_invalid_argument(server):
    """Server-streaming methods decode in the plugin too (the health service's Watch here)."""
    watch = server["channel"].unary_stream("/grpc.health.v1.Health/Watch", request_serializer=None,
                                           response_deserializer=None)
    with pytest.raises(grpc.RpcError) as err:
        next(iter(watch(b"\x0a\x03\xff\xfe\xfd", timeout=10)))  # field 1 (service, a string) not UTF-8
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "grpc.health.v1.HealthCheckRequest" in err.value.details()
