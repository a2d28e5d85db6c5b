import pytest

from backends.errors import InvalidArgument, NotFound
from csi.ids import NodeRef, make_id, parse_id, parse_node_id


def test_round_trip():
    oid = parse_id(make_id("fast", "vol-1234"))
    assert (oid.backend, oid.local) == ("fast", "vol-1234")


@pytest.mark.parametrize("raw", ["fake-volume-id", "nocolon", "UPPER:x", "b:../etc", "b:a/b", "b:", ":x",
                                 "b:" + "a" * 200, "b:x y", "b:\x00"])
def test_foreign_ids_do_not_exist(raw):
    with pytest.raises(NotFound):
        parse_id(raw)


def test_empty_id_is_invalid():
    with pytest.raises(InvalidArgument):
        parse_id("")


def test_make_id_refuses_unsafe_parts():
    for backend, local in [("x", "../a"), ("X", "a"), ("x", "a b")]:
        with pytest.raises(ValueError):
            make_id(backend, local)


def test_node_id_carries_attributes():
    raw = NodeRef("worker-1", {"iqn": "iqn.1993-08.org.debian:01:abc"}).encode()
    node = parse_node_id(raw)
    assert node.name == "worker-1" and node.attributes == {"iqn": "iqn.1993-08.org.debian:01:abc"}
    assert parse_node_id("worker-1").attributes == {}
    with pytest.raises(NotFound):
        parse_node_id("bad node")
