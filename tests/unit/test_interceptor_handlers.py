"""The RPC interceptor builds each method's wrapped handler once (csi/interceptors.py): calls keep working through
the kept handler, concurrent calls share it, and a made-up method name (UNIMPLEMENTED from grpc) is never kept, so
hostile names cannot grow the table. A real grpc server on a unix socket, the Identity service behind it."""
from __future__ import annotations

import os
from concurrent import futures

import grpc

from csi._pb import csi_pb2 as pb
from csi._pb import csi_pb2_grpc as rpc
from csi.interceptors import RpcInterceptor


class _Identity(rpc.IdentityServicer):
    def Probe(self, request, context):  # noqa: N802 - the gRPC method name
        return pb.ProbeResponse()

    def GetPluginInfo(self, request, context):  # noqa: N802
        return pb.GetPluginInfoResponse(name="tessera.test", vendor_version="0")


def test_handlers_are_kept_per_method_and_unknown_methods_are_not(tmp_path) -> None:
    interceptor = RpcInterceptor()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), interceptors=[interceptor])
    rpc.add_IdentityServicer_to_server(_Identity(), server)
    sock = os.path.join(str(tmp_path), "csi.sock")
    server.add_insecure_port("unix://" + sock)
    server.start()
    try:
        with grpc.insecure_channel("unix://" + sock) as ch:
            stub = rpc.IdentityStub(ch)
            with futures.ThreadPoolExecutor(8) as ex:
                infos = list(ex.map(lambda _: stub.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=10), range(50)))
            assert {i.name for i in infos} == {"tessera.test"}
            stub.Probe(pb.ProbeRequest(), timeout=10)
            for bogus in ("/csi.v1.Identity/NoSuchMethod", "/made.up.Service/" + "x" * 500):
                call = ch.unary_unary(bogus, request_serializer=None, response_deserializer=None)
                try:
                    call(b"", timeout=10)
                    raise AssertionError(f"{bogus} answered")
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.UNIMPLEMENTED
            # a bad request still goes through the kept handler's decoding: INVALID_ARGUMENT, not grpc's INTERNAL
            raw = ch.unary_unary("/csi.v1.Identity/GetPluginInfo", request_serializer=None,
                                 response_deserializer=None)
            try:
                raw(b"\xff\xff\xff", timeout=10)
                raise AssertionError("an undecodable request was answered")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert set(interceptor._wrapped) == {"/csi.v1.Identity/GetPluginInfo", "/csi.v1.Identity/Probe"}
    finally:
        server.stop(0)
