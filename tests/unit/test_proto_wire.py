"""Wire identity with csi.v1: the spec's own protobuf (the ```protobuf blocks of the spec markdown, which is how the
upstream csi.proto is produced) compiled here, compared element by element with the descriptor of our generated
module. Names, numbers, types, labels, oneofs, map entries, services and custom options must all match; comments
and ordering of declarations may differ."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.internal import decoder

from csi._pb import csi_pb2

SPEC = os.environ.get("CSI_SPEC_MD", "/work/shared/reference/csi-spec-v1.12.0.md")
_BLOCK = re.compile(r"^```protobuf\n(.*?)^```", re.S | re.M)


def spec_proto_text(markdown: str) -> str:
    blocks = _BLOCK.findall(markdown)
    assert blocks, "no ```protobuf blocks found in the spec"
    return "\n".join(blocks)


@pytest.fixture(scope="module")
def spec_fd(tmp_path_factory) -> descriptor_pb2.FileDescriptorProto:
    if not os.path.exists(SPEC):
        pytest.fail(f"the CSI spec markdown is missing at {SPEC} (set CSI_SPEC_MD)")
    pytest.importorskip("grpc_tools", reason="MISSING: grpcio-tools (pip install grpcio-tools)")
    import grpc_tools
    work = tmp_path_factory.mktemp("specproto")
    src = work / "csi.proto"
    with open(SPEC) as f:
        src.write_text(spec_proto_text(f.read()))
    out = work / "spec.pb"
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    proc = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{work}", f"-I{include}",
                           f"--descriptor_set_out={out}", "csi.proto"], capture_output=True, text=True)
    assert proc.returncode == 0, f"the spec's protobuf does not compile:\n{proc.stderr}"
    fds = descriptor_pb2.FileDescriptorSet()
    fds.ParseFromString(out.read_bytes())
    (fd,) = [f for f in fds.file if f.name == "csi.proto"]
    return fd


@pytest.fixture(scope="module")
def our_fd() -> descriptor_pb2.FileDescriptorProto:
    fd = descriptor_pb2.FileDescriptorProto()
    csi_pb2.DESCRIPTOR.CopyToProto(fd)
    return fd


def _opt_fields(options) -> dict[int, list[bytes]]:
    """Option fields by number (raw values), so an extension known on one side and unknown on the other compares
    equal: both sides carry only the csi.v1 extensions (secret/alpha markers) and a few standard options."""
    fields: dict[int, list[bytes]] = {}
    raw = options.SerializeToString(deterministic=True)
    # re-parse as a bare message set of (field number → bytes) so known vs unknown extensions compare equal
    i = 0
    while i < len(raw):
        tag, i = decoder._DecodeVarint(raw, i)
        num, wt = tag >> 3, tag & 7
        start = i
        if wt == 0:
            _, i = decoder._DecodeVarint(raw, i)
        elif wt == 2:
            ln, i = decoder._DecodeVarint(raw, i)
            i += ln
        elif wt == 1:
            i += 8
        elif wt == 5:
            i += 4
        fields.setdefault(num, []).append(raw[start:i])
    return fields


def _opts(options) -> bytes:
    return repr(sorted(_opt_fields(options).items())).encode()


def field_sig(msg: descriptor_pb2.DescriptorProto, f: descriptor_pb2.FieldDescriptorProto) -> tuple:
    oneof = msg.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") else None
    # json_name is derived from the name and not kept by the python runtime's CopyToProto; not compared
    return (f.number, f.label, f.type, f.type_name, oneof, f.proto3_optional, f.extendee,
            _opts(f.options) if f.HasField("options") else b"")


def messages(fd_or_msg, prefix: str) -> dict[str, descriptor_pb2.DescriptorProto]:
    out = {}
    for m in fd_or_msg.message_type if hasattr(fd_or_msg, "message_type") else fd_or_msg.nested_type:
        full = f"{prefix}.{m.name}"
        out[full] = m
        out.update(messages(m, full))
    return out


def enums(fd: descriptor_pb2.FileDescriptorProto) -> dict[str, descriptor_pb2.EnumDescriptorProto]:
    out = {f".{fd.package}.{e.name}": e for e in fd.enum_type}
    for full, m in messages(fd, "." + fd.package).items():
        out.update({f"{full}.{e.name}": e for e in m.enum_type})
    return out


def test_file_level(spec_fd, our_fd):
    assert our_fd.package == spec_fd.package == "csi.v1"
    assert our_fd.syntax == spec_fd.syntax
    assert sorted(our_fd.dependency) == sorted(spec_fd.dependency)
    assert our_fd.options.go_package == spec_fd.options.go_package


def test_messages_and_fields(spec_fd, our_fd):
    spec_msgs = messages(spec_fd, "." + spec_fd.package)
    ours = messages(our_fd, "." + our_fd.package)
    assert sorted(ours) == sorted(spec_msgs), "message sets differ"
    problems = []
    for name, sm in spec_msgs.items():
        om = ours[name]
        sf = {f.name: field_sig(sm, f) for f in sm.field}
        of = {f.name: field_sig(om, f) for f in om.field}
        if sf != of:
            for k in sorted(set(sf) | set(of)):
                if sf.get(k) != of.get(k):
                    problems.append(f"{name}.{k}: spec {sf.get(k)} ours {of.get(k)}")
        if [o.name for o in sm.oneof_decl] != [o.name for o in om.oneof_decl]:
            problems.append(f"{name}: oneofs spec {[o.name for o in sm.oneof_decl]} ours "
                            f"{[o.name for o in om.oneof_decl]}")
        if sm.options.map_entry != om.options.map_entry:
            problems.append(f"{name}: map_entry differs")
        if _opts(sm.options) != _opts(om.options):
            problems.append(f"{name}: message options differ")
        if list(sm.reserved_range) != list(om.reserved_range) or list(sm.reserved_name) != list(om.reserved_name):
            problems.append(f"{name}: reserved ranges/names differ")
    assert not problems, "\n".join(problems)


def test_enums(spec_fd, our_fd):
    se, oe = enums(spec_fd), enums(our_fd)
    assert sorted(oe) == sorted(se), "enum sets differ"
    problems = []
    for name, s in se.items():
        sv = {v.name: (v.number, _opts(v.options)) for v in s.value}
        ov = {v.name: (v.number, _opts(v.options)) for v in oe[name].value}
        if sv != ov:
            problems.append(f"{name}: spec {sv} ours {ov}")
        if _opts(s.options) != _opts(oe[name].options):
            problems.append(f"{name}: enum options differ")
    assert not problems, "\n".join(problems)


def test_services(spec_fd, our_fd):
    def sig(fd):
        return {s.name: {m.name: (m.input_type, m.output_type, m.client_streaming, m.server_streaming,
                                  _opts(m.options)) for m in s.method} for s in fd.service}
    assert sig(our_fd) == sig(spec_fd)
    assert set(sig(spec_fd)) == {"Identity", "Controller", "GroupController", "SnapshotMetadata", "Node"}


def test_extensions(spec_fd, our_fd):
    def sig(fd):
        return {e.name: (e.number, e.label, e.type, e.extendee) for e in fd.extension}
    assert sig(our_fd) == sig(spec_fd)
    assert sig(spec_fd)["csi_secret"][0] == 1059


def test_secret_fields_marked(spec_fd, our_fd):
    """The csi_secret option drives log redaction in every CO and in our interceptor: same fields on both sides."""
    def secret_fields(fd):
        out = set()
        for name, m in messages(fd, "." + fd.package).items():
            for f in m.field:
                if 1059 in _opt_fields(f.options):
                    out.add(f"{name}.{f.name}")
        return out
    spec_secrets = secret_fields(spec_fd)
    assert spec_secrets, "the spec marks secrets fields"
    assert secret_fields(our_fd) == spec_secrets


def test_wire_roundtrip_with_spec_classes(spec_fd):
    """A message encoded by our classes decodes with the spec's descriptor to the same values (and back)."""
    from google.protobuf import descriptor_pool, message_factory
    from google.protobuf import descriptor_pb2 as d2, timestamp_pb2, wrappers_pb2  # noqa: F401
    pool = descriptor_pool.DescriptorPool()
    for dep in (d2.DESCRIPTOR, timestamp_pb2.DESCRIPTOR, wrappers_pb2.DESCRIPTOR):
        p = descriptor_pb2.FileDescriptorProto()
        dep.CopyToProto(p)
        pool.Add(p)
    pool.Add(spec_fd)
    SpecReq = message_factory.GetMessageClass(pool.FindMessageTypeByName("csi.v1.CreateVolumeRequest"))
    ours = csi_pb2.CreateVolumeRequest(
        name="n", capacity_range=csi_pb2.CapacityRange(required_bytes=5, limit_bytes=7),
        volume_capabilities=[csi_pb2.VolumeCapability(
            block=csi_pb2.VolumeCapability.BlockVolume(),
            access_mode=csi_pb2.VolumeCapability.AccessMode(mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))],
        parameters={"a": "b"}, secrets={"k": "v"},
        volume_content_source=csi_pb2.VolumeContentSource(snapshot=csi_pb2.VolumeContentSource.SnapshotSource(
            snapshot_id="s")),
        accessibility_requirements=csi_pb2.TopologyRequirement(requisite=[csi_pb2.Topology(segments={"z": "1"})]),
        mutable_parameters={"m": "x"})
    spec_msg = SpecReq.FromString(ours.SerializeToString())
    assert spec_msg.name == "n" and spec_msg.capacity_range.limit_bytes == 7
    assert spec_msg.volume_capabilities[0].WhichOneof("access_type") == "block"
    assert spec_msg.volume_content_source.snapshot.snapshot_id == "s"
    assert dict(spec_msg.mutable_parameters) == {"m": "x"}
    assert csi_pb2.CreateVolumeRequest.FromString(spec_msg.SerializeToString()) == ours
