"""The iSCSI backend against a real tgtd, checked from outside with libiscsi's tools (an initiator in userspace):
what is exported, to whom, with which CHAP secret, and at which size."""
from __future__ import annotations

import os
import time

import pytest

from backends.base import CapabilitySpec, ContentSource, CreateVolumeSpec
from backends.errors import FailedPrecondition, InUse, NotFound
from backends.iscsi import IscsiBackend
from csi.ids import NodeRef, parse_node_id

from tests.integration.iscsi.tgt import PREFIX, Tgtd, iscsi_tool, lun_url, make_backend

pytestmark = pytest.mark.iscsi

MIB = 1 << 20
NODE1 = NodeRef("node1", {"iqn": "iqn.2026-11.dev.tessera.test:node1"})
NODE2 = NodeRef("node2", {"iqn": "iqn.2026-11.dev.tessera.test:node2"})
CAP = CapabilitySpec("mount", "SINGLE_NODE_WRITER", "ext4")


def spec(name: str, size: int = 64 * MIB, source=None) -> CreateVolumeSpec:
    return CreateVolumeSpec(name=name, size_bytes=size, limit_bytes=0, parameters={}, secrets={}, capabilities=[CAP],
                            source=source)


def capacity(tgtd: Tgtd, b: IscsiBackend, local_id: str, node: NodeRef, chap) -> int:
    r = iscsi_tool("iscsi-readcapacity16", lun_url(tgtd, b.iqn(local_id), b.lun, chap), node.attributes["iqn"])
    assert r.returncode == 0, f"readcapacity16 failed: {r.stderr.strip()}"
    return int(next(ln for ln in r.stdout.splitlines() if ln.startswith("Total size:")).split(":")[1])


def test_create_is_idempotent_and_exported_without_access(tgtd: Tgtd, backend: IscsiBackend) -> None:
    v1 = backend.create_volume(spec("pvc-a"))
    v2 = backend.create_volume(spec("pvc-a"))
    assert v1.local_id == v2.local_id and v1.capacity_bytes == 64 * MIB
    assert v1.context["targetIqn"] == f"{PREFIX}:{v1.local_id}"
    assert v1.context["lun"] == "1"  # tgt: LUN 0 is the target's controller device
    assert not any("chap" in k.lower() or "password" in k.lower() for k in v1.context)
    st = backend.driver.state(backend.iqn(v1.local_id))
    assert st is not None and st.acls == [] and st.backing.endswith(v1.local_id + ".img")
    # exported, but no initiator may log in before ControllerPublish
    r = iscsi_tool("iscsi-inq", lun_url(tgtd, backend.iqn(v1.local_id), 1), NODE1.attributes["iqn"])
    assert r.returncode != 0


def test_publish_grants_only_that_initiator_with_the_right_secret(tgtd: Tgtd, backend: IscsiBackend) -> None:
    v = backend.create_volume(spec("pvc-b"))
    pc = backend.controller_publish(v.local_id, NODE1, False, CAP, v.context, {})
    assert set(pc) == {"lun", "chapUser", "chapPassword"} and len(pc["chapPassword"]) >= 12
    chap = (pc["chapUser"], pc["chapPassword"])
    assert backend.controller_publish(v.local_id, NODE1, False, CAP, v.context, {}) == pc  # idempotent, same secret
    url = lun_url(tgtd, backend.iqn(v.local_id), 1, chap)
    ok = iscsi_tool("iscsi-inq", url, NODE1.attributes["iqn"])
    assert ok.returncode == 0 and "DIRECT_ACCESS" in ok.stdout
    assert capacity(tgtd, backend, v.local_id, NODE1, chap) == 64 * MIB
    # the right secret from an initiator that was not published: refused
    other = iscsi_tool("iscsi-inq", url, NODE2.attributes["iqn"])
    assert other.returncode != 0 and "Login Failed" in other.stderr
    # the published initiator with a wrong secret, or none: refused
    wrong = iscsi_tool("iscsi-inq", lun_url(tgtd, backend.iqn(v.local_id), 1, (chap[0], "x" * 24)),
                       NODE1.attributes["iqn"])
    assert wrong.returncode != 0 and "Authentication failure" in wrong.stderr
    none = iscsi_tool("iscsi-inq", lun_url(tgtd, backend.iqn(v.local_id), 1), NODE1.attributes["iqn"])
    assert none.returncode != 0
    # the LUN list as the published initiator sees it: tgt's controller on LUN 0, the volume on LUN 1
    ls = iscsi_tool("iscsi-ls", f"iscsi://{chap[0]}%{chap[1]}@127.0.0.1:{tgtd.port}/", NODE1.attributes["iqn"])
    assert ls.returncode == 0
    # unpublish: the node loses access
    backend.controller_unpublish(v.local_id, NODE1, {})
    backend.controller_unpublish(v.local_id, NODE1, {})
    gone = iscsi_tool("iscsi-inq", url, NODE1.attributes["iqn"])
    assert gone.returncode != 0


def test_secrets_are_per_volume(backend: IscsiBackend) -> None:
    a = backend.create_volume(spec("pvc-c1"))
    b = backend.create_volume(spec("pvc-c2"))
    pa = backend.controller_publish(a.local_id, NODE1, False, CAP, a.context, {})
    pb = backend.controller_publish(b.local_id, NODE1, False, CAP, b.context, {})
    assert pa["chapUser"] != pb["chapUser"] and pa["chapPassword"] != pb["chapPassword"]


def test_chap_off_grants_by_initiator_name_only(tgtd: Tgtd, tmp_path) -> None:
    b = make_backend(tgtd, str(tmp_path), chap=False)
    v = b.create_volume(spec("pvc-nochap"))
    try:
        assert b.controller_publish(v.local_id, NODE2, False, CAP, v.context, {}) == {"lun": "1"}
        assert iscsi_tool("iscsi-inq", lun_url(tgtd, b.iqn(v.local_id), 1), NODE2.attributes["iqn"]).returncode == 0
        assert iscsi_tool("iscsi-inq", lun_url(tgtd, b.iqn(v.local_id), 1), NODE1.attributes["iqn"]).returncode != 0
    finally:
        b.delete_volume(v.local_id, {})


def test_publish_needs_the_node_iqn(backend: IscsiBackend) -> None:
    v = backend.create_volume(spec("pvc-d"))
    with pytest.raises(NotFound, match="initiator IQN"):
        backend.controller_publish(v.local_id, NodeRef("bare-node"), False, CAP, v.context, {})
    # the node ID as NodeGetInfo reports it carries the IQN through to the controller
    ref = parse_node_id(NODE1.encode())
    assert ref.attributes["iqn"] == NODE1.attributes["iqn"]


def test_expand_is_visible_to_the_initiator(tgtd: Tgtd, backend: IscsiBackend) -> None:
    v = backend.create_volume(spec("pvc-e"))
    pc = backend.controller_publish(v.local_id, NODE1, False, CAP, v.context, {})
    chap = (pc["chapUser"], pc["chapPassword"])
    assert capacity(tgtd, backend, v.local_id, NODE1, chap) == 64 * MIB
    assert backend.expand_volume(v.local_id, 96 * MIB, {}) == (96 * MIB, True)
    assert capacity(tgtd, backend, v.local_id, NODE1, chap) == 96 * MIB
    # access survives the LU re-add
    assert iscsi_tool("iscsi-inq", lun_url(tgtd, backend.iqn(v.local_id), 1, chap), NODE2.attributes["iqn"]).returncode != 0


def test_snapshot_and_clone_carry_data(tgtd: Tgtd, backend: IscsiBackend) -> None:
    v = backend.create_volume(spec("pvc-f"))
    path = backend.store.export_path(v.local_id)
    with open(path, "r+b") as f:
        f.write(b"tessera-iscsi-data")
    snap = backend.create_snapshot(v.local_id, "snap-f", {}, {})
    assert backend.create_snapshot(v.local_id, "snap-f", {}, {}).local_id == snap.local_id
    with open(path, "r+b") as f:
        f.write(b"overwritten-later!")
    restored = backend.create_volume(spec("pvc-f-restored", 80 * MIB, ContentSource("snapshot", snap.local_id)))
    clone = backend.create_volume(spec("pvc-f-clone", 64 * MIB, ContentSource("volume", v.local_id)))
    with open(backend.store.export_path(restored.local_id), "rb") as f:
        assert f.read(18) == b"tessera-iscsi-data"
    with open(backend.store.export_path(clone.local_id), "rb") as f:
        assert f.read(18) == b"overwritten-later!"
    assert restored.capacity_bytes == 80 * MIB
    pc = backend.controller_publish(restored.local_id, NODE1, False, CAP, restored.context, {})
    assert capacity(tgtd, backend, restored.local_id, NODE1, (pc["chapUser"], pc["chapPassword"])) == 80 * MIB
    backend.delete_snapshot(snap.local_id, {})
    backend.delete_snapshot(snap.local_id, {})


def test_delete_refuses_while_logged_in_unless_forced(tgtd: Tgtd, backend: IscsiBackend, tmp_path) -> None:
    import subprocess
    v = backend.create_volume(spec("pvc-g"))
    pc = backend.controller_publish(v.local_id, NODE1, False, CAP, v.context, {})
    url = lun_url(tgtd, backend.iqn(v.local_id), 1, (pc["chapUser"], pc["chapPassword"]))
    # iscsi-perf keeps a session open (reads the LUN in a loop) until killed
    perf = subprocess.Popen(["iscsi-perf", "-i", NODE1.attributes["iqn"], url], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not backend.driver.state(backend.iqn(v.local_id)).sessions:
            assert time.monotonic() < deadline, "iscsi-perf never logged in"
            time.sleep(0.1)
        with pytest.raises(InUse, match="logged in"):
            backend.delete_volume(v.local_id, {})
        assert os.path.exists(backend.store.export_path(v.local_id))
        forced = make_backend(tgtd, str(tmp_path), forceDelete=True)
        forced.delete_volume(v.local_id, {})
        assert backend.driver.state(backend.iqn(v.local_id)) is None
        assert not os.path.exists(backend.store.export_path(v.local_id))
    finally:
        perf.kill()
        perf.wait()
    backend.delete_volume(v.local_id, {})  # already gone: success


def test_export_is_restored_after_tgtd_lost_it(tgtd: Tgtd, backend: IscsiBackend) -> None:
    """tgtd keeps no configuration across a restart; publish re-creates the export from the backing store."""
    v = backend.create_volume(spec("pvc-h"))
    backend.driver.remove_target(backend.iqn(v.local_id))  # what a tgtd restart does to it
    pc = backend.controller_publish(v.local_id, NODE1, False, CAP, v.context, {})
    assert capacity(tgtd, backend, v.local_id, NODE1, (pc["chapUser"], pc["chapPassword"])) == 64 * MIB


def test_list_and_capacity(backend: IscsiBackend) -> None:
    a = backend.create_volume(spec("pvc-i"))
    assert a.local_id in {v.local_id for v in backend.list_volumes({})}
    cap = backend.get_capacity({}, None)
    assert cap.available_bytes > 0 and cap.maximum_volume_size >= cap.available_bytes
    assert backend.driver.list_targets(PREFIX) == [backend.iqn(a.local_id)]


def test_placeholder_chap_key_is_refused(tgtd: Tgtd, tmp_path) -> None:
    """The example Secret ships a placeholder key; publishing with it would hand out guessable CHAP secrets."""
    key = tmp_path / "chap.key"
    key.write_text("REPLACE-WITH-32-RANDOM-BYTES-IN-BASE64")
    b = make_backend(tgtd, str(tmp_path), chapKeyFile=str(key))
    v = b.create_volume(spec("pvc-placeholder"))
    try:
        with pytest.raises(FailedPrecondition, match="placeholder"):
            b.controller_publish(v.local_id, NODE1, False, CAP, v.context, {})
        assert b.driver.state(b.iqn(v.local_id)).acls == []  # nothing was granted
    finally:
        b.delete_volume(v.local_id, {})


def _lun_table(tgtd: Tgtd, iqn: str) -> dict[int, dict[str, str]]:
    """tgtd's own view of a target's LUNs: number → {field: value} (from `tgtadm --op show`)."""
    from backends.util import run
    out = run(["tgtadm", "-C", str(tgtd.control_port), "--lld", "iscsi", "--mode", "target", "--op", "show"]).stdout
    luns: dict[int, dict[str, str]] = {}
    inside, cur = False, None
    for line in out.splitlines():
        if line.startswith("Target "):
            inside = line.split()[-1] == iqn
        elif inside and line.strip().startswith("LUN:"):
            cur = luns.setdefault(int(line.split(":")[1]), {})
        elif inside and cur is not None and ":" in line:
            k, _, v = line.strip().partition(":")
            cur[k.strip()] = v.strip()
    return luns


def test_readonly_publish_gets_a_write_protected_lun(tgtd: Tgtd, backend: IscsiBackend) -> None:
    """ControllerPublishVolume(readonly=true): the node is handed a LUN that tgtd itself marks read-only, over
    the same backing store; the writable LUN keeps its setting for others."""
    v = backend.create_volume(spec("pvc-ro"))
    ro = CapabilitySpec("mount", "MULTI_NODE_READER_ONLY", "ext4")
    pc = backend.controller_publish(v.local_id, NODE1, True, ro, v.context, {})
    assert pc["lun"] == "2" and pc.get("readonly") == "true"
    table = _lun_table(tgtd, backend.iqn(v.local_id))
    assert table[2]["Readonly"] == "Yes" and table[1]["Readonly"] == "No"
    assert table[2]["Backing store path"] == table[1]["Backing store path"]
    chap = (pc["chapUser"], pc["chapPassword"])
    assert iscsi_tool("iscsi-inq", lun_url(tgtd, backend.iqn(v.local_id), 2, chap), NODE1.attributes["iqn"]).returncode == 0
    # a second reader on another node is fine (reader-only mode, both read-only)
    backend.controller_publish(v.local_id, NODE2, True, ro, v.context, {})
    backend.controller_unpublish(v.local_id, None, {})


def test_incompatible_republish_to_the_same_node(backend: IscsiBackend) -> None:
    """Same volume, same node, another readonly flag or capability: ALREADY_EXISTS (spec); the same one again is
    idempotent; after an unpublish the node may come back with anything."""
    from backends.errors import AlreadyExists
    v = backend.create_volume(spec("pvc-rep"))
    pc = backend.controller_publish(v.local_id, NODE1, False, CAP, v.context, {})
    assert backend.controller_publish(v.local_id, NODE1, False, CAP, v.context, {}) == pc
    with pytest.raises(AlreadyExists):
        backend.controller_publish(v.local_id, NODE1, True, CAP, v.context, {})
    with pytest.raises(AlreadyExists):
        backend.controller_publish(v.local_id, NODE1, False, CapabilitySpec("block", "SINGLE_NODE_WRITER"),
                                   v.context, {})
    backend.controller_unpublish(v.local_id, NODE1, {})
    assert backend.controller_publish(v.local_id, NODE1, True, CAP, v.context, {})["lun"] == "2"
    backend.controller_unpublish(v.local_id, NODE1, {})


def test_second_node_refused_while_the_first_holds_it(backend: IscsiBackend) -> None:
    """A single-node or single-writer volume held read-write by node1: publishing it to node2 is
    FAILED_PRECONDITION naming node1; raw block MULTI_NODE_MULTI_WRITER lets both write; unpublish frees it."""
    v = backend.create_volume(spec("pvc-two"))
    backend.controller_publish(v.local_id, NODE1, False, CAP, v.context, {})
    with pytest.raises(FailedPrecondition) as info:
        backend.controller_publish(v.local_id, NODE2, False, CAP, v.context, {})
    assert "node1" in str(info.value) and NODE1.attributes["iqn"] in str(info.value)
    backend.controller_unpublish(v.local_id, NODE1, {})
    backend.controller_publish(v.local_id, NODE2, False, CAP, v.context, {})
    backend.controller_unpublish(v.local_id, NODE2, {})

    single = CapabilitySpec("block", "MULTI_NODE_SINGLE_WRITER")
    backend.controller_publish(v.local_id, NODE1, False, single, v.context, {})
    backend.controller_publish(v.local_id, NODE2, True, single, v.context, {})  # a reader beside the writer
    backend.controller_unpublish(v.local_id, NODE2, {})
    with pytest.raises(FailedPrecondition):
        backend.controller_publish(v.local_id, NODE2, False, single, v.context, {})
    backend.controller_unpublish(v.local_id, None, {})

    multi = CapabilitySpec("block", "MULTI_NODE_MULTI_WRITER")
    backend.controller_publish(v.local_id, NODE1, False, multi, v.context, {})
    backend.controller_publish(v.local_id, NODE2, False, multi, v.context, {})
    backend.controller_unpublish(v.local_id, None, {})
    backend.delete_volume(v.local_id, {})


@pytest.mark.parametrize("field,value", [("targetIqn", "iqn.2026-11.dev.other:vol"), ("targetIqn", "--op=delete"),
                                         ("targetPortals", "10.9.9.9:3260"), ("targetPortals", "127.0.0.1:99999"),
                                         ("lun", "16384"), ("lun", "-1")])
def test_static_context_checked_before_login(backend: IscsiBackend, field: str, value: str) -> None:
    """A static PV's context cannot send the node to another target or portal, nor name an impossible LUN."""
    from backends.errors import InvalidArgument
    v = backend.create_volume(spec("pvc-static"))
    ctx = {**v.context, field: value}
    with pytest.raises(InvalidArgument):
        backend.node_attach(v.local_id, ctx, {}, {})
