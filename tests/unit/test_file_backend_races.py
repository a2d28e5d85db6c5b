"""The file backend on its own (no controller locks in front of it): a source deleted under a copy answers NotFound,
never an internal error, and nothing half-made is left; a crash's leftover temporary file is reused or removed; a
temporary file a live writer holds is never clobbered (Aborted)."""
from __future__ import annotations

import fcntl
import os
import threading

import pytest

from backends import errors as e
from backends.base import CapabilitySpec, ContentSource, CreateVolumeSpec, Runtime
from backends.file import FileBackend, FileOptions

MIB = 1 << 20
CAP = [CapabilitySpec("mount", "SINGLE_NODE_WRITER", "ext4")]


@pytest.fixture
def backend(tmp_path):
    rt = Runtime(driver_name="tessera.csi.dev", node_name="n1", state_dir=str(tmp_path / "state"),
                 topology_key="topology.tessera.csi.dev/node")
    return FileBackend("local", FileOptions(directory=str(tmp_path / "file")), rt)


def _spec(name: str, size: int = 8 * MIB, source=None) -> CreateVolumeSpec:
    return CreateVolumeSpec(name=name, size_bytes=size, limit_bytes=0, parameters={}, secrets={}, capabilities=CAP,
                            source=source)


def _files(b: FileBackend) -> list[str]:
    return sorted(os.listdir(b.vol_dir)) + sorted(os.listdir(b.snap_dir))


def test_copy_of_a_deleted_source_is_not_found_and_leaves_nothing(backend):
    src = backend.create_volume(_spec("src"))
    with open(src.context["path"], "r+b") as f:
        f.write(b"data" * 1024)
    backend.delete_volume(src.local_id, {})
    with pytest.raises(e.NotFound, match="does not exist"):
        backend.create_snapshot(src.local_id, "snap", {}, {})
    with pytest.raises(e.NotFound, match="does not exist"):
        backend.create_volume(_spec("clone", source=ContentSource("volume", src.local_id)))
    assert _files(backend) == []


def test_image_gone_under_a_live_sidecar_is_not_found(backend):
    src = backend.create_volume(_spec("src"))
    os.unlink(src.context["path"])  # the moment between a delete's two unlinks
    with pytest.raises(e.NotFound):
        backend.create_snapshot(src.local_id, "snap", {}, {})
    assert not [f for f in _files(backend) if f.endswith(".tmp")]


def test_racing_copies_and_deletes_without_locks_never_fail_internally(backend):
    """Snapshots and clones of volumes that other threads delete meanwhile: each copy either completes (from the
    data it opened) or answers NotFound; afterwards every image has its sidecar and no temporary file is left."""
    problems: list[str] = []
    for round_ in range(10):
        src = backend.create_volume(_spec(f"src{round_}"))
        with open(src.context["path"], "r+b") as f:
            f.write(os.urandom(256 * 1024))
        gate = threading.Barrier(9)

        def copy(i: int) -> None:
            gate.wait()
            try:
                if i % 2:
                    backend.create_snapshot(src.local_id, f"s{round_}-{i}", {}, {})
                else:
                    backend.create_volume(_spec(f"c{round_}-{i}", source=ContentSource("volume", src.local_id)))
            except e.NotFound:
                pass
            except Exception as x:  # anything else is the bug this test is about
                problems.append(f"{type(x).__name__}: {x}")

        def delete() -> None:
            gate.wait()
            backend.delete_volume(src.local_id, {})

        ts = [threading.Thread(target=copy, args=(i,)) for i in range(8)] + [threading.Thread(target=delete)]
        [t.start() for t in ts]
        [t.join(60) for t in ts]
    assert not problems, problems
    names = _files(backend)
    assert not [n for n in names if n.endswith(".tmp")], names
    stems = {n.rsplit(".", 1)[0] for n in names}
    for d in (backend.vol_dir, backend.snap_dir):
        for stem in {n.rsplit(".", 1)[0] for n in os.listdir(d)}:
            assert os.path.exists(os.path.join(d, stem + ".img")) == os.path.exists(os.path.join(d, stem + ".json")), \
                f"half-made object {d}/{stem}: {sorted(os.listdir(d))}"
    assert stems


def test_leftover_temporary_file_of_a_crash_is_reused_and_removed(backend):
    local_id = backend.local_id_for_name("volume", "crashed", {})
    img, meta = backend._vol_paths(local_id)
    with open(img + ".tmp", "wb") as f:  # a create that crashed mid-copy
        f.write(b"garbage")
    vol = backend.create_volume(_spec("crashed"))
    assert vol.local_id == local_id and vol.capacity_bytes == 8 * MIB
    with open(img, "rb") as f:
        assert f.read(7) == b"\0" * 7, "the retried create must not keep the crashed attempt's bytes"
    assert not os.path.exists(img + ".tmp")
    with open(img + ".tmp", "wb") as f:
        f.write(b"garbage")
    backend.delete_volume(local_id, {})
    assert _files(backend) == []


def test_temporary_file_held_by_a_live_writer_is_never_clobbered(backend):
    local_id = backend.local_id_for_name("volume", "busy", {})
    img, _ = backend._vol_paths(local_id)
    fd = os.open(img + ".tmp", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process writing this volume (a second plugin on the directory)
        with pytest.raises(e.Aborted, match="another process is writing"):
            backend.create_volume(_spec("busy"))
        with pytest.raises(e.Aborted):
            backend.delete_volume(local_id, {})
        assert os.path.exists(img + ".tmp")
    finally:
        os.close(fd)
    backend.create_volume(_spec("busy"))
    assert not os.path.exists(img + ".tmp")
