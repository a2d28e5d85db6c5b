import threading

import grpc
import pytest

from backends import errors as e
from csi.controllerops import decode_token, encode_token, paginate
from csi.errors import status_for
from csi.locks import KeyedLocks
from csi.paths import check_path
from csi.redact import REDACTED, safe_dict
from csi._pb import csi_pb2 as pb


def test_lock_second_holder_is_aborted():
    locks = KeyedLocks()
    with locks.hold("volume/a"):
        with pytest.raises(e.Aborted):
            with locks.hold("volume/a"):
                pass
        with locks.hold("volume/b"):
            pass
    with locks.hold("volume/a"):
        pass


def test_lock_under_contention_admits_one():
    locks = KeyedLocks()
    inside, aborted = [], []
    gate = threading.Barrier(20)

    def worker():
        gate.wait()
        try:
            with locks.hold("k"):
                inside.append(1)
                threading.Event().wait(0.05)
        except e.Aborted:
            aborted.append(1)

    ts = [threading.Thread(target=worker) for _ in range(20)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert len(inside) >= 1 and len(inside) + len(aborted) == 20 and len(aborted) >= 1


@pytest.mark.parametrize("path", ["relative/x", "/a/../b", "/a/./b", "/a//b", "/", "", "/a\x00b"])
def test_bad_paths_refused(path):
    with pytest.raises(e.InvalidArgument):
        check_path(path, "target_path")


def test_paths_outside_allowed_prefix_refused():
    assert check_path("/var/lib/kubelet/pods/x/", "target_path", ["/var/lib/kubelet"]) == "/var/lib/kubelet/pods/x"
    with pytest.raises(e.InvalidArgument):
        check_path("/var/lib/kubeletx/y", "target_path", ["/var/lib/kubelet"])


def test_error_mapping():
    assert status_for(e.NotFound("x"))[0] == grpc.StatusCode.NOT_FOUND
    assert status_for(e.CapacityExceeded("x"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_for(e.InUse("x"))[0] == grpc.StatusCode.FAILED_PRECONDITION
    code, msg = status_for(KeyError("secret-ish detail"))
    assert code == grpc.StatusCode.INTERNAL and "secret-ish" not in msg


def test_paging_tokens():
    items = [f"b:v{i:02d}" for i in range(7)]
    page = paginate(items, key=lambda x: x, max_entries=3, starting_token="")
    assert page.entries == items[:3] and page.next_token
    page2 = paginate(items, key=lambda x: x, max_entries=3, starting_token=page.next_token)
    assert page2.entries == items[3:6]
    page3 = paginate(items, key=lambda x: x, max_entries=3, starting_token=page2.next_token)
    assert page3.entries == items[6:] and page3.next_token == ""
    assert decode_token(encode_token("b:v01")) == "b:v01"
    for bad in ["invalid-token", "t1.!!!", "t1." + "A" * 8]:
        with pytest.raises(e.Aborted):
            paginate(items, key=lambda x: x, max_entries=1, starting_token=bad)
    with pytest.raises(e.InvalidArgument):
        paginate(items, key=lambda x: x, max_entries=-1, starting_token="")


def test_secrets_redacted():
    req = pb.CreateVolumeRequest(name="n", secrets={"userKey": "AQD-very-secret"}, parameters={"pool": "rbd"})
    d = safe_dict(req)
    assert d["secrets"] == REDACTED and d["parameters"] == {"pool": "rbd"}
    assert "very-secret" not in repr(d)


def test_publish_context_values_redacted():
    """The iSCSI backend's CHAP secret travels in publish_context, which the spec does not mark csi_secret."""
    req = pb.NodeStageVolumeRequest(volume_id="san:iv-1", staging_target_path="/s",
                                    publish_context={"chapUser": "u1", "chapPassword": "hunter2-secret"})
    d = safe_dict(req)
    assert d["publish_context"] == {"chapUser": REDACTED, "chapPassword": REDACTED}
    assert "hunter2-secret" not in repr(d) and d["volume_id"] == "san:iv-1"
