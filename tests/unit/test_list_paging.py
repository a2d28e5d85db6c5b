"""ListVolumes/ListSnapshots paging over several real file backends (temporary directories): pages resume after the
token's ID, so the concatenated pages are the full listing in ID order with nothing missing or repeated, also across
backend names where plain name order and ID order differ ("a-b" sorts before "a" once the ':' follows), after the
token's own volume was deleted, and after volumes were added between pages."""
from __future__ import annotations

import pytest

from backends import errors as e
from backends.base import CapabilitySpec
from csi.config import parse_config
from csi.controllerops import ControllerOps
from csi.registry import Backends

MIB = 1 << 20
CAP = [CapabilitySpec("block", "SINGLE_NODE_WRITER")]
NAMES = ("a", "a-b", "b0")


@pytest.fixture
def ops(tmp_path):
    cfg = parse_config({"stateDir": str(tmp_path / "state"), "defaultBackend": "a",
                        "backends": {n: {"type": "file", "directory": str(tmp_path / n)} for n in NAMES}})
    return ControllerOps(Backends(cfg, "node-1"))


def _create(ops: ControllerOps, count: int, prefix: str = "v") -> list[str]:
    out = []
    for i in range(count):
        vid, _ = ops.create_volume(f"{prefix}{i}", MIB, 0, CAP, {"backend": NAMES[i % len(NAMES)]}, {})
        out.append(vid)
    return out


def _walk(ops: ControllerOps, size: int) -> list[str]:
    seen, token = [], ""
    for _ in range(1000):
        page = ops.list_volumes(size, token)
        assert size == 0 or len(page.entries) <= size
        seen.extend(vid for vid, _ in page.entries)
        token = page.next_token
        if not token:
            return seen
    raise AssertionError("the listing never ended")


@pytest.mark.parametrize("size", [1, 2, 3, 7, 0])
def test_pages_make_the_full_listing_in_id_order(ops, size):
    made = _create(ops, 10)
    listed = _walk(ops, size)
    assert listed == sorted(made)
    assert len(set(listed)) == len(made)


def test_the_last_page_has_no_token(ops):
    _create(ops, 6)
    first = ops.list_volumes(6, "")
    assert len(first.entries) == 6 and first.next_token == ""
    five = ops.list_volumes(5, "")
    assert five.next_token and len(ops.list_volumes(5, five.next_token).entries) == 1


def test_a_token_whose_volume_was_deleted_resumes_after_it(ops):
    made = sorted(_create(ops, 9))
    page = ops.list_volumes(4, "")
    assert [v for v, _ in page.entries] == made[:4]
    ops.delete_volume(made[3], {})
    rest = []
    token = page.next_token
    while token:
        p = ops.list_volumes(4, token)
        rest.extend(v for v, _ in p.entries)
        token = p.next_token
    assert rest == made[4:]


def test_volumes_added_between_pages_after_the_position_are_listed(ops):
    made = _create(ops, 4)
    page = ops.list_volumes(2, "")
    added = _create(ops, 3, prefix="late")
    rest, token = [], page.next_token
    while token:
        p = ops.list_volumes(2, token)
        rest.extend(v for v, _ in p.entries)
        token = p.next_token
    after = page.entries[-1][0]
    assert rest == sorted(v for v in made + added if v > after)


def test_tokens_not_ours_are_aborted(ops):
    _create(ops, 2)
    for token in ("never-issued", "t1.%%%", "t1." + "bm90IGFuIGlk"):  # the last decodes to "not an id"
        with pytest.raises(e.Aborted):
            ops.list_volumes(1, token)
    with pytest.raises(e.InvalidArgument):
        ops.list_volumes(-1, "")


def test_snapshot_pages_filtered_by_source(ops):
    vols = _create(ops, 3)
    made = []
    for i in range(5):
        sid, _ = ops.create_snapshot(vols[i % 2], f"s{i}", {}, {})
        made.append((sid, vols[i % 2]))
    want = sorted(s for s, v in made if v == vols[0])
    seen, token = [], ""
    while True:
        page = ops.list_snapshots(1, token, source_volume_id=vols[0])
        seen.extend(s for s, _ in page.entries)
        token = page.next_token
        if not token:
            break
    assert seen == want
