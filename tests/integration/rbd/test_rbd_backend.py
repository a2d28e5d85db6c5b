"""The RBD backend against a real Ceph cluster (one mon, one memstore OSD; see tests/ceph/cluster.py).

Every check looks at the cluster itself (admin librbd handle) or at data read back, not at the backend's own
bookkeeping alone.
"""
from __future__ import annotations

import os
import time
import uuid

import pytest
import rbd

from backends.base import CapabilitySpec, ContentSource, CreateVolumeSpec
from backends.errors import AlreadyExists, BackendUnavailable, DeadlineExceeded, NotFound, PermissionDenied
from backends.rbd import RbdBackend, _header_snap_names
from csi.config import parse_config
from csi.controllerops import ControllerOps
from csi.registry import Backends
from tests.ceph.cluster import _gen_key

from tests.ceph.rbdutil import drop_record, make_backend, records, until_done

pytestmark = pytest.mark.ceph
MIB = 1 << 20
CAPS = [CapabilitySpec("mount", "SINGLE_NODE_WRITER", "ext4")]


def uniq(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def spec(name: str, size: int = 64 * MIB, source: ContentSource | None = None, params=None, secrets=None):
    return CreateVolumeSpec(name=name, size_bytes=size, limit_bytes=0, parameters=params or {},
                            secrets=secrets or {}, capabilities=CAPS, source=source)


def image_name(local_id: str) -> str:
    return local_id.rpartition(".")[2]


def write(io, local_id: str, offset: int, data: bytes) -> None:
    with rbd.Image(io, image_name(local_id)) as img:
        img.write(data, offset)
        img.flush()


def read(io, local_id: str, offset: int, length: int) -> bytes:
    with rbd.Image(io, image_name(local_id), read_only=True) as img:
        return img.read(offset, length)


def test_create_is_idempotent_and_stores_name_and_parameters(backend: RbdBackend, admin_io):
    name = uniq("pvc")
    v1 = backend.create_volume(spec(name, params={"imageFeatures": "layering,exclusive-lock"}))
    v2 = backend.create_volume(spec(name, params={"imageFeatures": "layering,exclusive-lock"}))
    assert v1.local_id == v2.local_id and v1.capacity_bytes == 64 * MIB
    images = [n for n in rbd.RBD().list(admin_io) if n == image_name(v1.local_id)]
    assert len(images) == 1
    assert records(admin_io, images[0])["tessera.name"] == name
    with rbd.Image(admin_io, images[0], read_only=True) as img:
        assert img.features() & rbd.RBD_FEATURE_OBJECT_MAP == 0
        assert img.features() & rbd.RBD_FEATURE_EXCLUSIVE_LOCK
    assert v1.context["pool"] == backend.options.pool and v1.context["image"] == images[0]
    assert not any("key" in k.lower() for k in v1.context)
    assert backend.get_volume(v1.local_id, {}).name == name
    backend.delete_volume(v1.local_id, {})
    backend.delete_volume(v1.local_id, {})  # idempotent
    assert image_name(v1.local_id) not in rbd.RBD().list(admin_io)


def test_unfinished_create_is_redone_not_duplicated(backend: RbdBackend, admin_io):
    """A crash between creating the image and writing its metadata leaves an image without `tessera.name`:
    invisible to listings, and replaced by the retry."""
    name = uniq("pvc")
    v = backend.create_volume(spec(name))
    drop_record(admin_io, image_name(v.local_id), "tessera.name")
    assert v.local_id not in {x.local_id for x in backend.list_volumes({})}
    again = backend.create_volume(spec(name))
    assert again.local_id == v.local_id and again.name == name
    backend.delete_volume(v.local_id, {})


def test_same_name_different_size_is_already_exists(ceph_cluster, state_dir):
    cfg = parse_config({"stateDir": state_dir, "backends": {"ceph": {
        "type": "rbd", "monitors": [ceph_cluster.monitors], "user": ceph_cluster.csi_user,
        "keyringPath": ceph_cluster.csi_keyring, "pool": ceph_cluster.pool}}})
    backends = Backends(cfg, "node-1")
    ops = ControllerOps(backends)
    name = uniq("pvc")
    vid, vol = ops.create_volume(name, 64 * MIB, 0, CAPS, {}, {})
    vid2, _ = ops.create_volume(name, 64 * MIB, 0, CAPS, {}, {})
    assert vid2 == vid
    with pytest.raises(AlreadyExists):
        ops.create_volume(name, 128 * MIB, 0, CAPS, {}, {})
    ops.delete_volume(vid, {})
    backends.close()


def test_snapshot_survives_deleting_its_source_and_restores(backend: RbdBackend, admin_io):
    vol = backend.create_volume(spec(uniq("pvc")))
    pattern = os.urandom(MIB)
    write(admin_io, vol.local_id, 5 * MIB, pattern)
    snap = backend.create_snapshot(vol.local_id, uniq("snap"), {}, {})
    assert snap.source_volume_local_id == vol.local_id and snap.ready_to_use
    write(admin_io, vol.local_id, 5 * MIB, b"\0" * MIB)  # changes after the snapshot must not show in it
    backend.delete_volume(vol.local_id, {})
    assert image_name(vol.local_id) not in rbd.RBD().list(admin_io)
    assert backend.get_snapshot(snap.local_id, {}).name == snap.name
    restored = backend.create_volume(spec(uniq("pvc"), source=ContentSource("snapshot", snap.local_id)))
    assert read(admin_io, restored.local_id, 5 * MIB, MIB) == pattern
    # deleting the snapshot keeps the restored volume's data
    until_done(backend.delete_snapshot, snap.local_id, {})
    assert image_name(snap.local_id) not in rbd.RBD().list(admin_io)
    assert read(admin_io, restored.local_id, 5 * MIB, MIB) == pattern
    until_done(backend.delete_volume, restored.local_id, {})


def _parents(io, image: str) -> int:
    """Length of the image's parent chain, read with the admin handle (parents may sit in the trash)."""
    n = 0
    img = rbd.Image(io, image, read_only=True)
    while True:
        try:
            pool, parent_id = img.get_parent_image_spec()["pool_name"], img.parent_id()
        except rbd.ImageNotFound:
            img.close()
            return n
        img.close()
        n += 1
        img = rbd.Image(io, image_id=parent_id, read_only=True)


def test_clone_chain_is_flattened_past_the_depth_limit(backend: RbdBackend, admin_io):
    """Past the soft limit the clone is flattened in the background; no chain ever passes the hard limit."""
    limit = backend.options.cloneDepthLimit
    first = backend.create_volume(spec(uniq("pvc")))
    pattern = os.urandom(64 * 1024)
    write(admin_io, first.local_id, 0, pattern)
    chain = [first]
    for _ in range(limit + 3):
        chain.append(until_done(backend.create_volume, spec(uniq("pvc"), source=ContentSource("volume",
                                                                                            chain[-1].local_id))))
        assert _parents(admin_io, image_name(chain[-1].local_id)) <= backend.options.cloneDepthHardLimit
    deadline = time.monotonic() + 120  # the background flattens finish; bounded, not a speed assertion
    while any(_parents(admin_io, image_name(v.local_id)) > limit for v in chain) and time.monotonic() < deadline:
        time.sleep(0.2)
    for v in chain:
        assert _parents(admin_io, image_name(v.local_id)) <= limit
        assert read(admin_io, v.local_id, 0, len(pattern)) == pattern
    flattened = 0
    for v in chain[1:]:
        with rbd.Image(admin_io, image_name(v.local_id), read_only=True) as img:
            try:
                img.get_parent_image_spec()
            except rbd.ImageNotFound:
                flattened += 1
    assert flattened >= 1
    for v in reversed(chain):
        until_done(backend.delete_volume, v.local_id, {})


def test_deletion_left_in_the_trash_by_a_crash_is_finished_by_the_next_process(ceph_cluster, state_dir, admin_io):
    """DeleteVolume of a volume with dependants moves it to the RBD trash and leaves the flattening to a background
    job. A process killed in between leaves exactly that trash entry: the next process finishes it."""
    b1 = make_backend(ceph_cluster, state_dir)
    vol = b1.create_volume(spec(uniq("pvc")))
    pattern = os.urandom(MIB)
    write(admin_io, vol.local_id, 0, pattern)
    snap = b1.create_snapshot(vol.local_id, uniq("snap"), {}, {})
    b1.close()
    rbd.RBD().trash_move(admin_io, image_name(vol.local_id))  # the state a kill right after the move leaves
    b2 = make_backend(ceph_cluster, state_dir)
    try:
        other = b2.create_volume(spec(uniq("pvc")))  # any controller call on the pool resumes pending deletions
        deadline = time.monotonic() + 120
        while any(t["name"] == image_name(vol.local_id) for t in rbd.RBD().trash_list(admin_io)):
            assert time.monotonic() < deadline, "the trashed volume was never purged"
            time.sleep(0.2)
        with rbd.Image(admin_io, image_name(snap.local_id), read_only=True) as img:
            with pytest.raises(rbd.ImageNotFound):
                img.parent_id()  # flattened first: self-contained
            assert img.read(0, MIB) == pattern
        until_done(b2.delete_snapshot, snap.local_id, {})
        b2.delete_volume(other.local_id, {})
    finally:
        b2.close()


def test_expand(backend: RbdBackend, admin_io):
    vol = backend.create_volume(spec(uniq("pvc")))
    size, node_needed = backend.expand_volume(vol.local_id, 256 * MIB, {})
    assert size == 256 * MIB and node_needed
    with rbd.Image(admin_io, image_name(vol.local_id), read_only=True) as img:
        assert img.size() == 256 * MIB
    assert backend.expand_volume(vol.local_id, 128 * MIB, {})[0] == 256 * MIB  # never shrinks
    backend.delete_volume(vol.local_id, {})


def test_expand_sweeps_leftover_clone_helpers_only(backend: RbdBackend, admin_io):
    """A clone-helper snapshot left on a volume (a clone whose process died between making it and removing it) is
    removed by the volume's next expand, which holds the volume exclusively; an operator's own snapshot and a
    protected one (what a clone v1 child hangs from) stay."""
    vol = backend.create_volume(spec(uniq("pvc")))
    image = image_name(vol.local_id)
    leftover, protected = "tessera-vol-" + str(uuid.uuid4()), "tessera-snap-" + str(uuid.uuid4())
    with rbd.Image(admin_io, image) as img:
        for s in (leftover, protected, "operator-backup"):
            img.create_snap(s)
        img.protect_snap(protected)
    backend.expand_volume(vol.local_id, 256 * MIB, {})
    with rbd.Image(admin_io, image) as img:
        assert sorted(s["name"] for s in img.list_snaps()) == sorted([protected, "operator-backup"])
        img.unprotect_snap(protected)
    backend.delete_volume(vol.local_id, {})
    assert image not in rbd.RBD().list(admin_io)


def test_header_read_of_snapshot_names_agrees_with_librbd(ceph_cluster):
    """The clone-helper check reads snapshot names from the header object with the rbd object class instead of
    opening the image. It must show the names librbd lists; a snapshot a clone v2 child keeps moves to the trash
    namespace under a new name, so its user name (what the check looks for) is gone."""
    parent, child = "hdr-" + uuid.uuid4().hex[:8], "hdr-child-" + uuid.uuid4().hex[:8]
    r = ceph_cluster.cluster.rados()
    r.conf_set("rbd_default_clone_format", "2")
    admin_io = r.open_ioctx(ceph_cluster.pool)
    rbd.RBD().create(admin_io, parent, 8 * MIB, features=rbd.RBD_FEATURE_LAYERING | rbd.RBD_FEATURE_EXCLUSIVE_LOCK)
    try:
        with rbd.Image(admin_io, parent) as img:
            for s in ("kept", "helper", "removed"):
                img.create_snap(s)
            img.remove_snap("removed")
            header = f"rbd_header.{img.id()}"
        rbd.RBD().clone(admin_io, parent, "helper", admin_io, child, features=rbd.RBD_FEATURE_LAYERING)
        with rbd.Image(admin_io, parent) as img:
            img.remove_snap("helper")  # the child still needs it: clone v2 moves it to the trash namespace
            listed = list(img.list_snaps())
            user = {s["name"] for s in listed if s["namespace"] == rbd.RBD_SNAP_NAMESPACE_TYPE_USER}
            assert len(listed) == 2 and user == {"kept"}
        names = _header_snap_names(admin_io, header)
        assert names == {s["name"] for s in listed}  # the kept one under its trash name (a UUID)
        assert "helper" not in names and "kept" in names
    finally:
        rbd.RBD().remove(admin_io, child)
        with rbd.Image(admin_io, parent) as img:
            img.remove_snap("kept")
        rbd.RBD().remove(admin_io, parent)
        admin_io.close()
        r.shutdown()


def test_listing_with_paging(ceph_cluster, state_dir):
    cfg = parse_config({"stateDir": state_dir, "backends": {"ceph": {
        "type": "rbd", "monitors": [ceph_cluster.monitors], "user": ceph_cluster.csi_user,
        "keyringPath": ceph_cluster.csi_keyring, "pool": ceph_cluster.pool}}})
    backends = Backends(cfg, "node-1")
    ops = ControllerOps(backends)
    ids = {ops.create_volume(uniq("list"), 8 * MIB, 0, CAPS, {}, {})[0] for _ in range(5)}
    seen, token, pages = [], "", 0
    while True:
        page = ops.list_volumes(2, token)
        pages += 1
        seen.extend(e[0] for e in page.entries)
        token = page.next_token
        if not token:
            break
    assert ids <= set(seen) and len(seen) == len(set(seen)) and pages >= 3
    for i in ids:
        ops.delete_volume(i, {})
    backends.close()


def test_capacity_without_a_mgr_says_it_needs_one(fresh_ceph_cluster, state_dir):
    """Pool usage comes from the ceph-mgr: a cluster without one answers UNAVAILABLE saying so."""
    b = make_backend(fresh_ceph_cluster, state_dir)
    try:
        with pytest.raises(BackendUnavailable, match="ceph-mgr"):
            b.get_capacity({}, None)
    finally:
        b.close()


def test_capacity_of_a_pool_the_mgr_has_not_reported_yet_is_unavailable_not_missing(ceph_mgr, state_dir):
    """A pool created a moment ago exists (the osdmap has it) before the ceph-mgr's statistics list it: GetCapacity
    then says UNAVAILABLE (retry), never NOT_FOUND, and answers once the mgr has reported. A pool that does not exist
    is NOT_FOUND."""
    b = make_backend(ceph_mgr, state_dir)
    c = ceph_mgr.cluster
    r = c.rados()
    name = f"cap-{uuid.uuid4().hex[:6]}"
    try:
        c.mon_command(r, "osd pool create", pool=name, pg_num=8, pgp_num=8)
        answers = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                answers.append(b.get_capacity({"pool": name}, None).available_bytes > 0)
                break
            except BackendUnavailable as e:
                answers.append(str(e))
                time.sleep(0.5)
        assert answers[-1] is True, answers
        assert all(a is True or "has not reported" in a for a in answers), answers
        with pytest.raises(NotFound, match="does not exist"):
            b.get_capacity({"pool": f"nope-{uuid.uuid4().hex[:6]}"}, None)
    finally:
        c.mon_command(r, "osd pool rm", pool=name, pool2=name, yes_i_really_really_mean_it=True)
        r.shutdown()
        b.close()


def test_capacity_goes_down_after_writing(ceph_mgr, state_dir):
    b = make_backend(ceph_mgr, state_dir)
    before = b.get_capacity({}, None).available_bytes
    assert before > 0
    vol = b.create_volume(spec(uniq("cap"), size=512 * MIB))
    r = ceph_mgr.cluster.rados()
    io = r.open_ioctx(ceph_mgr.pool)
    try:
        chunk = os.urandom(4 * MIB)
        with rbd.Image(io, image_name(vol.local_id)) as img:
            for i in range(64):
                img.write(chunk, i * 4 * MIB)
            img.flush()
        deadline = time.monotonic() + 40
        after = before
        while time.monotonic() < deadline:
            after = b.get_capacity({}, None).available_bytes
            if after <= before - 200 * MIB:
                break
            time.sleep(1)
        assert after <= before - 200 * MIB, f"available went from {before} to {after} after writing 256 MiB"
    finally:
        io.close()
        r.shutdown()
        b.delete_volume(vol.local_id, {})
        b.close()


def test_wrong_key_is_permission_denied_with_a_clear_message(ceph_cluster, state_dir):
    b = make_backend(ceph_cluster, state_dir, keyringPath=None, key=_gen_key())
    with pytest.raises((PermissionDenied, BackendUnavailable)) as e:
        b.create_volume(spec(uniq("pvc")))
    msg = str(e.value)
    assert "client.csi" in msg and ("refused" in msg or "denied" in msg)
    assert b.options.key not in msg
    b.close()


def test_secrets_override_the_configured_user(ceph_cluster, state_dir, admin_io):
    b = make_backend(ceph_cluster, state_dir, keyringPath=None, key=_gen_key())  # configured key is wrong
    good = {"userID": ceph_cluster.csi_user, "userKey": ceph_cluster.csi_key}
    vol = b.create_volume(spec(uniq("pvc"), secrets=good))
    assert image_name(vol.local_id) in rbd.RBD().list(admin_io)
    bad = {"userID": ceph_cluster.csi_user, "userKey": _gen_key()}
    with pytest.raises(PermissionDenied) as e:
        b.get_volume(vol.local_id, bad)
    assert bad["userKey"] not in str(e.value)
    b.delete_volume(vol.local_id, good)
    b.close()


def test_stopped_cluster_gives_a_bounded_error_and_recovers(fresh_ceph_cluster, state_dir):
    b = make_backend(fresh_ceph_cluster, state_dir, connectTimeout=3, opTimeout=3)
    vol = b.create_volume(spec(uniq("pvc")))
    fresh_ceph_cluster.cluster.stop()
    t0 = time.monotonic()
    with pytest.raises((DeadlineExceeded, BackendUnavailable)):
        b.create_volume(spec(uniq("pvc")))
    assert time.monotonic() - t0 < 15
    t0 = time.monotonic()
    with pytest.raises((DeadlineExceeded, BackendUnavailable)):
        b.get_volume(vol.local_id, {})
    assert time.monotonic() - t0 < 15
    fresh_ceph_cluster.cluster.start()
    deadline = time.monotonic() + 30
    while True:
        try:
            assert b.get_volume(vol.local_id, {}).local_id == vol.local_id  # data survived the restart
            other = b.create_volume(spec(uniq("pvc")))
            break
        except (DeadlineExceeded, BackendUnavailable):
            if time.monotonic() > deadline:
                raise
    b.delete_volume(other.local_id, {})
    b.delete_volume(vol.local_id, {})
    b.close()
