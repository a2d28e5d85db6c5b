"""The operation lock table: shared and exclusive claims, the conflict matrix of the controller's calls (each call
held inside a real file backend while a second one arrives), ABORTED messages that name the operation met, the
conflict metric, a cross-process provider, and idempotency across backends."""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, Sequence

import pytest
from prometheus_client import REGISTRY

from backends import errors as e
from backends.base import CapabilitySpec
from backends.file import FileBackend
from backends.locking import Claim, LockConflict, LockProvider, Operation
from csi.config import parse_config
from csi.controllerops import ControllerOps
from csi.locks import KeyedLocks
from csi.registry import Backends

MIB = 1 << 20
CAP = [CapabilitySpec("mount", "SINGLE_NODE_WRITER", "ext4")]


def _conflicts(op: str, against: str) -> float:
    return REGISTRY.get_sample_value("tessera_csi_lock_conflicts_total", {"operation": op, "against": against}) or 0.0


# ---- the table ------------------------------------------------------------------------------------------------
def test_shared_claims_coexist_and_exclusive_ones_exclude():
    locks = KeyedLocks()
    reader = Operation("CreateSnapshot", "s1")
    with locks.operation(reader, shared=["volume/b:v"]):
        with locks.operation(Operation("CreateSnapshot", "s2"), shared=["volume/b:v"]):
            pass
        with pytest.raises(e.Aborted, match=r"^CreateSnapshot of s1 is in progress; retry later$"):
            with locks.operation(Operation("DeleteVolume", "b:v"), exclusive=["volume/b:v"]):
                pass
    with locks.operation(Operation("DeleteVolume", "b:v"), exclusive=["volume/b:v"]):
        with pytest.raises(e.Aborted, match="DeleteVolume of b:v is in progress"):
            with locks.operation(reader, shared=["volume/b:v"]):
                pass
    assert not locks.busy("volume/b:v")


def test_all_or_none_and_released_on_error():
    locks = KeyedLocks()
    with locks.operation(Operation("DeleteVolume", "b:x"), exclusive=["volume/b:x"]):
        with pytest.raises(e.Aborted):
            with locks.operation(Operation("CreateVolume", "n"), exclusive=["name/n", "volume/b:x"]):
                pass
        assert not locks.busy("name/n"), "a refused operation must not keep the claims it could take"
    with pytest.raises(RuntimeError):
        with locks.operation(Operation("CreateVolume", "n"), exclusive=["name/n"]):
            raise RuntimeError("backend failed")
    assert not locks.busy("name/n")


def test_conflicts_are_counted_by_operation_and_the_one_met():
    locks = KeyedLocks()
    before = _conflicts("CreateSnapshot", "DeleteVolume")
    with locks.operation(Operation("DeleteVolume", "b:v"), exclusive=["volume/b:v"]):
        for _ in range(3):
            with pytest.raises(e.Aborted):
                with locks.operation(Operation("CreateSnapshot", "s"), shared=["volume/b:v"]):
                    pass
    assert _conflicts("CreateSnapshot", "DeleteVolume") == before + 3


def test_unnamed_hold_is_exclusive_and_says_what_it_holds():
    locks = KeyedLocks()
    with locks.hold("volume/b:v"):
        with pytest.raises(e.Aborted, match="another call on volume/b:v is in progress"):
            with locks.operation(Operation("CreateSnapshot", "s"), shared=["volume/b:v"]):
                pass


class RecordingProvider(LockProvider):
    """A provider that refuses one key, as another replica's lease would, and records what it was given."""

    def __init__(self, refuse: str = "") -> None:
        self.refuse = refuse
        self.held: list[tuple[str, list[Claim]]] = []
        self.released = 0

    @contextlib.contextmanager
    def hold(self, operation: Operation, claims: Sequence[Claim]) -> Iterator[None]:
        if any(c.key == self.refuse for c in claims):
            raise LockConflict("DeleteVolume of b:v (replica 2)", "DeleteVolume", self.refuse)
        self.held.append((str(operation), list(claims)))
        try:
            yield
        finally:
            self.released += 1


def test_provider_gets_the_same_claims_and_its_conflict_is_aborted():
    locks = KeyedLocks()
    p = RecordingProvider()
    with locks.operation(Operation("CreateVolume", "n"), exclusive=["name/n"], shared=["volume/b:v"], provider=p):
        pass
    assert p.held == [("CreateVolume of n", [Claim("name/n", True), Claim("volume/b:v", False)])] and p.released == 1
    other = RecordingProvider(refuse="volume/b:v")
    before = _conflicts("CreateSnapshot", "DeleteVolume")
    with pytest.raises(e.Aborted, match=r"DeleteVolume of b:v \(replica 2\) is in progress"):
        with locks.operation(Operation("CreateSnapshot", "s"), shared=["volume/b:v"], provider=other):
            pass
    assert _conflicts("CreateSnapshot", "DeleteVolume") == before + 1
    assert not locks.busy("volume/b:v"), "the in-process claim is given back when the provider refuses"


# ---- the controller's conflict matrix ---------------------------------------------------------------------------
class GatedFile(FileBackend):
    """The real file backend, with a gate that can hold one method call open while another call arrives."""

    gated = ""
    entered: threading.Event
    release: threading.Event

    def _gate(self, method: str) -> None:
        if self.gated == method:  # only the first call: the second one of the same kind passes through
            self.gated = ""
            self.entered.set()
            assert self.release.wait(30), "test did not release the gate"

    def create_volume(self, spec):  # type: ignore[no-untyped-def]
        self._gate("create_volume")
        return super().create_volume(spec)

    def delete_volume(self, local_id, secrets):  # type: ignore[no-untyped-def]
        self._gate("delete_volume")
        return super().delete_volume(local_id, secrets)

    def expand_volume(self, local_id, size_bytes, secrets):  # type: ignore[no-untyped-def]
        self._gate("expand_volume")
        return super().expand_volume(local_id, size_bytes, secrets)

    def create_snapshot(self, source_local_id, name, parameters, secrets):  # type: ignore[no-untyped-def]
        self._gate("create_snapshot")
        return super().create_snapshot(source_local_id, name, parameters, secrets)

    def delete_snapshot(self, local_id, secrets):  # type: ignore[no-untyped-def]
        self._gate("delete_snapshot")
        return super().delete_snapshot(local_id, secrets)


def _ops(tmp_path, names: Sequence[str] = ("local",)) -> ControllerOps:
    cfg = parse_config({"stateDir": str(tmp_path / "state"), "defaultBackend": names[0],
                        "backends": {n: {"type": "file", "directory": str(tmp_path / n)} for n in names}})
    backends = Backends(cfg, "node-1")
    for n in names:
        b = backends._by_name[n]
        backends._by_name[n] = GatedFile(n, b.options, b.runtime)
    return ControllerOps(backends)


@contextlib.contextmanager
def _held_in(ops: ControllerOps, method: str, call: Callable[[], object]) -> Iterator[None]:
    """Run `call` in a thread and keep it inside the backend's `method` for the `with` block."""
    b = ops.backends._by_name["local"]
    b.gated, b.entered, b.release = method, threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as x:  # reported below
            errors.append(x)

    t = threading.Thread(target=run)
    t.start()
    try:
        assert b.entered.wait(30), f"the held call never reached {method}: {errors}"
        yield
    finally:
        b.release.set()
        t.join(30)
        b.gated = ""
    assert not errors, errors


@pytest.fixture
def world(tmp_path):
    ops = _ops(tmp_path)
    vid, _ = ops.create_volume("vol", 8 * MIB, 0, CAP, {}, {})
    sid, _ = ops.create_snapshot(vid, "snap", {}, {})
    return ops, vid, sid


def _create(ops, name, source=None):
    return lambda: ops.create_volume(name, 16 * MIB, 0, CAP, {}, {}, source=source)


def _snapshot(ops, vid, name):
    return lambda: ops.create_snapshot(vid, name, {}, {})


OK = None


@pytest.mark.parametrize("held, method, second, expect", [
    ("snapshot", "create_snapshot", "snapshot", OK),           # several snapshots of one volume together
    ("clone", "create_volume", "clone", OK),                   # several clones from one source together
    ("snapshot", "create_snapshot", "clone", OK),
    ("restore", "create_volume", "restore", OK),
    ("delete", "delete_volume", "snapshot", "DeleteVolume of local:vol-"),
    ("delete", "delete_volume", "clone", "DeleteVolume of local:vol-"),
    ("delete", "delete_volume", "expand", "DeleteVolume of local:vol-"),
    ("expand", "expand_volume", "snapshot", "ControllerExpandVolume of local:vol-"),
    ("expand", "expand_volume", "clone", "ControllerExpandVolume of local:vol-"),
    ("snapshot", "create_snapshot", "delete", "CreateSnapshot of snap-2"),
    ("clone", "create_volume", "delete", "CreateVolume of clone-1"),
    ("snapshot", "create_snapshot", "expand", "CreateSnapshot of snap-2"),
    ("delete_snapshot", "delete_snapshot", "restore", "DeleteSnapshot of local:snap-"),
    ("restore", "create_volume", "delete_snapshot", "CreateVolume of restore-1"),
    ("create_same", "create_volume", "create_same", "CreateVolume of fresh"),
    ("create_same", "create_volume", "delete_planned", "CreateVolume of fresh"),
    ("snapshot", "create_snapshot", "snapshot_same", "CreateSnapshot of snap-2"),
    ("delete", "delete_volume", "create_other", OK),            # different objects never conflict
])
def test_conflict_matrix(world, held, method, second, expect):
    ops, vid, sid = world
    calls = {
        "snapshot": _snapshot(ops, vid, "snap-2"),
        "snapshot_same": _snapshot(ops, vid, "snap-2"),
        "clone": _create(ops, "clone-1", ("volume", vid)),
        "restore": _create(ops, "restore-1", ("snapshot", sid)),
        "delete": lambda: ops.delete_volume(vid, {}),
        "expand": lambda: ops.expand_volume(vid, 32 * MIB, 0, {}),
        "delete_snapshot": lambda: ops.delete_snapshot(sid, {}),
        "create_same": _create(ops, "fresh"),
        "create_other": _create(ops, "other"),
        "delete_planned": lambda: ops.delete_volume(
            "local:" + ops.backends._by_name["local"].local_id_for_name("volume", "fresh", {}), {}),
    }
    second_call = dict(calls, snapshot=_snapshot(ops, vid, "snap-3"), clone=_create(ops, "clone-2", ("volume", vid)),
                       restore=_create(ops, "restore-2", ("snapshot", sid)))[second]
    with _held_in(ops, method, calls[held]):
        if expect is OK:
            second_call()
        else:
            with pytest.raises(e.Aborted) as err:
                second_call()
            assert str(err.value).startswith(expect) and str(err.value).endswith("is in progress; retry later"), \
                str(err.value)


# ---- idempotency across backends ------------------------------------------------------------------------------------
def test_same_name_in_another_backend_is_already_exists(tmp_path):
    ops = _ops(tmp_path, ("local", "fast"))
    vid, _ = ops.create_volume("pvc-1", 8 * MIB, 0, CAP, {}, {})
    assert vid.startswith("local:")
    with pytest.raises(e.AlreadyExists, match=r"'pvc-1' already exists in backend 'local' \(local:vol-.*\); this "
                                              r"request asks for backend 'fast'"):
        ops.create_volume("pvc-1", 8 * MIB, 0, CAP, {"backend": "fast"}, {})
    assert list(ops.backends._by_name["fast"].list_volumes({})) == [], "no second volume was made"
    again, _ = ops.create_volume("pvc-1", 8 * MIB, 0, CAP, {"backend": "local"}, {})
    assert again == vid


# ---- node calls name themselves ---------------------------------------------------------------------------------
class HeldAttach(FileBackend):
    """node_attach waits at a gate, then refuses (no device is ever made): a stage held open in the node."""

    entered = threading.Event()
    release = threading.Event()

    def node_attach(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.entered.set()
        assert self.release.wait(30), "test did not release the gate"
        raise e.FailedPrecondition("held stage ends here")


def test_a_node_call_that_meets_another_names_it(tmp_path):
    from csi.nodeops import NodeOps
    ops = _ops(tmp_path)
    vid, vol = ops.create_volume("vol", 8 * MIB, 0, CAP, {}, {})
    b = ops.backends._by_name["local"]
    ops.backends._by_name["local"] = HeldAttach("local", b.options, b.runtime)
    node = NodeOps(ops.backends, 0, [str(tmp_path)], locks=ops.locks)
    staging = tmp_path / "staging"
    staging.mkdir()
    failures: list[BaseException] = []

    def stage() -> None:
        try:
            node.stage(vid, str(staging), CAP[0], dict(vol.context), {}, {})
        except BaseException as x:  # the gate's refusal, checked below
            failures.append(x)

    t = threading.Thread(target=stage)
    t.start()
    try:
        assert HeldAttach.entered.wait(30), failures
        with pytest.raises(e.Aborted, match=rf"^NodeStageVolume of {vid} is in progress; retry later$"):
            node.unstage(vid, str(staging))
        with pytest.raises(e.Aborted, match=rf"^NodeStageVolume of {vid} is in progress"):
            ops.delete_volume(vid, {})  # the controller in the same process meets it too
    finally:
        HeldAttach.release.set()
        t.join(30)
    assert len(failures) == 1 and "held stage ends here" in str(failures[0])
    ops.delete_volume(vid, {})
