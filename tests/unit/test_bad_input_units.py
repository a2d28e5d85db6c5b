"""Bad input, unit by unit (issue 10): enums out of range, bounded messages and log renderings, request decoding."""
from __future__ import annotations

import grpc
import pytest

from backends import errors as e
from csi import convert
from csi._pb import csi_pb2 as pb
from csi.errors import MAX_MESSAGE, status_for
from csi.interceptors import _render, decode
from csi.redact import REDACTED, safe_bounded_dict

Mode = pb.VolumeCapability.AccessMode


@pytest.mark.parametrize("mode", [99, -1, 2 ** 30, 8, -(2 ** 31), 2 ** 31 - 1])
def test_out_of_range_access_mode_is_invalid_argument_naming_the_field(mode):
    cap = pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(), access_mode=Mode(mode=mode))
    cap = pb.VolumeCapability.FromString(cap.SerializeToString())  # as it arrives: proto3 enums are open
    with pytest.raises(e.InvalidArgument) as err:
        convert.capability(cap, "volume_capabilities[2]")
    assert "volume_capabilities[2].access_mode" in str(err.value) and str(mode) in str(err.value)
    assert status_for(err.value)[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_every_defined_access_mode_still_converts():
    for name, number in Mode.Mode.items():
        if number == 0:
            continue
        spec = convert.capability(pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume(),
                                                      access_mode=Mode(mode=number)))
        assert spec.access_mode == name and spec.access_type == "block"


def test_clip_and_listing():
    assert e.clip("short") == "short"
    long = e.clip("x" * 10_000, 100)
    assert long.startswith("x" * 100) and "9,900" in long and len(long) < 130
    assert e.listing(["b", "a", "c"]) == "a, b, c"
    many = e.listing(f"k{i:05d}" for i in range(10_000))
    assert many == "k00000, k00001, k00002, k00003, k00004 and 9,995 more"
    assert len(e.listing(["y" * 100_000])) < 100
    assert e.shown("a\nb") == "'a\\nb'"


def test_every_status_message_is_bounded():
    for exc in (e.InvalidArgument("p" * 100_000), e.NotFound("n" * 70_000), e.Internal("i" * 9000)):
        code, msg = status_for(exc)
        assert len(msg) <= MAX_MESSAGE + 40
        assert msg.startswith(str(exc)[:50])
    code, msg = status_for(ValueError("v" * 100_000))
    assert code == grpc.StatusCode.INTERNAL and len(msg) < 200


def test_log_rendering_is_bounded_and_still_redacted():
    req = pb.NodeStageVolumeRequest(volume_id="v" * 100_000, staging_target_path="/" + "p" * 100_000,
                                    secrets={"key": "TOP-SECRET"}, publish_context={f"k{i}": "s" for i in range(10_000)},
                                    volume_context={f"c{i}": "x" * 1000 for i in range(5_000)})
    out = safe_bounded_dict(req)
    assert out["secrets"] == REDACTED
    assert len(out["publish_context"]) <= 21 and set(out["publish_context"].values()) <= {REDACTED, "9,980 more entries"}
    assert len(out["volume_id"]) < 300
    text = _render(req)
    assert len(text) <= 4200 and "TOP-SECRET" not in text


def test_decode_turns_undecodable_bytes_into_invalid_argument():
    good = pb.DeleteVolumeRequest(volume_id="local:vol-1").SerializeToString()
    assert decode(pb.DeleteVolumeRequest.FromString, good).volume_id == "local:vol-1"
    bad = good.replace(b"local", b"\xff\xfe\xc0\xaf\x80")
    with pytest.raises(e.InvalidArgument) as err:
        decode(pb.DeleteVolumeRequest.FromString, bad)
    assert "csi.v1.DeleteVolumeRequest" in str(err.value)
    with pytest.raises(e.InvalidArgument):
        decode(pb.GetPluginInfoRequest.FromString, b"\x0a\x05ab")  # a truncated field


def test_backends_declare_their_largest_volume(tmp_path):
    """What the controller refuses with OUT_OF_RANGE before any work (csi/controllerops.py `_size`)."""
    import os

    from backends.base import Runtime
    from backends.file import MAX_FILE_BYTES, FileBackend, FileOptions
    rt = Runtime("tessera.csi.dev", "n", str(tmp_path), "t")
    fb = FileBackend("local", FileOptions(directory=str(tmp_path / "f")), rt)
    st = os.statvfs(tmp_path)
    assert fb.max_volume_bytes() == min(st.f_blocks * st.f_frsize, MAX_FILE_BYTES)
    assert fb.get_capacity({}, None).maximum_volume_size == fb.max_volume_bytes()
    rbd = pytest.importorskip("rbd", reason="MISSING: python3-rbd")  # noqa: F841 - the backend module needs it
    from backends.rbd import RbdBackend, RbdOptions
    with_map = RbdBackend("ceph", RbdOptions(monitors=["127.0.0.1:6789"], pool="kube"), rt)
    assert with_map.max_volume_bytes() == 256_000_000 * (4 << 20)  # object-map: 256M objects of 4 MiB
    assert with_map.max_volume_bytes({"imageFeatures": "layering"}) is None
    without = RbdBackend("ceph", RbdOptions(monitors=["127.0.0.1:6789"], pool="kube", imageFeatures=["layering"]), rt)
    assert without.max_volume_bytes() is None
    assert without.max_volume_bytes({"imageFeatures": "layering,exclusive-lock,object-map"}) is not None
