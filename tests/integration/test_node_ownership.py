"""The node plugin touches only what it owns (issue 10) and trusts no record it has not checked (issue 11, item 3).

Real loop devices, real ext4, real mounts; NodeOps (the code behind the CSI node service and the Flex shim) and the
Flex shim in this process. Every test here runs inside a private mount namespace: the module re-executes itself
under `unshare --mount --propagation private`, so no mount made or attempted here reaches the host, and every
hostile path points at decoys planted under a temporary directory — a regular file, an empty directory, a non-empty
directory, a tmpfs mount point, another volume's backing file, symlinks to decoys, bind mounts of the plugin's own
state directory and of /etc (the bind mounts exist only in the private namespace; nothing is ever done there).

What is checked after each call is what a user would check on the host: the tree under the temporary directory
(types, sizes, contents), /proc/self/mountinfo under it, `losetup -J` for loop devices over its files, and the node
and Flex record directories. A failed stage or publish must leave all of that exactly as it was before the call: a
failure is injected at every step in turn (record write, attach, mkfs, mount, bind, directory creation, read-only
view) by making that step raise inside this process, everything else being real.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import uuid

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

NS_ENV = "TESSERA_TEST_PRIVATE_MOUNT_NS"
MIB = 1 << 20
TOOLS = ("unshare", "losetup", "mkfs.ext4", "blkid", "mount", "umount")


def _in_private_namespace() -> bool:
    return os.environ.get(NS_ENV) == "1"


if not _in_private_namespace():
    def test_node_ownership_in_a_private_mount_namespace(tmp_path):
        """Runs this module's tests in a private mount namespace and reports their result."""
        missing = [t for t in TOOLS if not shutil.which(t)]
        if missing or os.geteuid() != 0:
            pytest.fail(f"MISSING: root and {', '.join(missing) or 'tools'} are required for the node ownership tests")
        env = dict(os.environ, **{NS_ENV: "1"})
        cmd = ["unshare", "--mount", "--propagation", "private", "--", sys.executable, "-m", "pytest",
               os.path.abspath(__file__), "-q", "-rs", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "ns")]
        p = subprocess.run(cmd, cwd=_REPO, env=env, capture_output=True, text=True, timeout=1800)
        out = p.stdout[-30000:] + p.stderr[-5000:]
        assert p.returncode == 0, out
        assert " passed" in p.stdout and " skipped" not in p.stdout, out
        print(p.stdout.splitlines()[-1])

else:
    from backends.base import Attachment, CapabilitySpec  # noqa: E402
    from backends.errors import FailedPrecondition, InvalidArgument, NotFound, TesseraError  # noqa: E402
    from csi import filesystems, loopdev, mounts  # noqa: E402
    from csi.config import load_config  # noqa: E402
    from csi.controllerops import ControllerOps  # noqa: E402
    from csi.nodeops import NodeOps  # noqa: E402
    from csi.paths import check_path  # noqa: E402
    from csi.registry import Backends  # noqa: E402

    MOUNT = CapabilitySpec("mount", "SINGLE_NODE_WRITER", "ext4")
    BLOCK = CapabilitySpec("block", "SINGLE_NODE_WRITER")

    class Injected(Exception):
        """The failure a test makes a step raise."""

    def _loops_under(root: str) -> list[tuple[str, str]]:
        """Loop devices over files under `root`, and read-only views over those devices."""
        found = loopdev._list("NAME,BACK-FILE")
        ours = {d["name"] for d in found if (d.get("back-file") or "").startswith(root + "/")}
        views = {d["name"] for d in found if (d.get("back-file") or "") in ours}
        return sorted((d["name"], d.get("back-file") or "") for d in found if d["name"] in ours | views)

    def _tree(root: str) -> dict[str, tuple]:
        out: dict[str, tuple] = {}
        for dirpath, dirnames, filenames in os.walk(root):
            if dirpath.endswith("/flex/locks"):
                continue  # the Flex shim's lock files: kept on purpose, one per volume
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                if stat.S_ISREG(st.st_mode):
                    with open(p, "rb") as f:
                        digest = hashlib.sha256(f.read(1 << 16)).hexdigest() if st.st_size < (1 << 16) else "big"
                    out[p] = ("file", st.st_size, digest)
                elif stat.S_ISLNK(st.st_mode):
                    out[p] = ("link", os.readlink(p))
                elif stat.S_ISDIR(st.st_mode):
                    out[p] = ("dir", stat.S_IMODE(st.st_mode))
                else:
                    out[p] = ("other", stat.S_IFMT(st.st_mode))
        return out

    class Node:
        """A node laid out under a temporary directory: kubelet/ (pods, plugins), state/, files/ (the file
        backend), decoys/ under kubelet/ planted by `plant`."""

        def __init__(self, root: str, prefixes: bool) -> None:
            self.root = root
            self.kubelet = os.path.join(root, "kubelet")
            self.state = os.path.join(root, "state")
            self.files = os.path.join(root, "files")
            os.makedirs(os.path.join(self.kubelet, "pods"))
            os.makedirs(os.path.join(self.kubelet, "plugins"))
            self.config = os.path.join(root, "config.yaml")
            node = {"allowedPathPrefixes": [self.kubelet]} if prefixes else {}
            with open(self.config, "w") as f:
                json.dump({"stateDir": self.state, "node": node,
                           "backends": {"local": {"type": "file", "directory": self.files}}}, f)
            self.backends = Backends(load_config(self.config), "own-node")
            self.ops = NodeOps(self.backends, 0, self.backends.config.node.allowedPathPrefixes)
            self.ctl = ControllerOps(self.backends)
            self.backend = next(iter(self.backends))

        def volume(self, size: int = 16 * MIB, cap: CapabilitySpec = MOUNT) -> tuple[str, dict]:
            vid, vol = self.ctl.create_volume(f"own-{uuid.uuid4().hex[:8]}", size, 0, [cap], {}, {})
            return vid, dict(vol.context)

        def dir(self, *parts: str, make: bool = True) -> str:
            p = os.path.join(self.kubelet, *parts)
            if make:
                os.makedirs(p, exist_ok=True)
            return p

        def state_now(self) -> dict:
            return {"loops": _loops_under(self.root),
                    "mounts": sorted((m.mountpoint, m.major_minor, m.root, m.fstype) for m in mounts.table()
                                     if m.mountpoint.startswith(self.root + "/")),
                    "tree": _tree(self.root)}

        def plant(self) -> dict[str, str]:
            """Decoys: what a hostile or mistaken request may name. Returns name -> path."""
            d = self.dir("decoys")
            decoys = {"file": os.path.join(d, "file"), "empty": os.path.join(d, "empty"),
                      "full": os.path.join(d, "full"), "tmpfs": os.path.join(d, "tmpfs"),
                      "link": os.path.join(d, "link"), "dirlink": os.path.join(d, "dirlink")}
            with open(decoys["file"], "w") as f:
                f.write("host data\n")
            os.mkdir(decoys["empty"])
            os.mkdir(decoys["full"])
            with open(os.path.join(decoys["full"], "keep"), "w") as f:
                f.write("keep me\n")
            os.mkdir(decoys["tmpfs"])
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "decoy", decoys["tmpfs"]], check=True)
            with open(os.path.join(decoys["tmpfs"], "inside"), "w") as f:
                f.write("in tmpfs\n")
            os.symlink(decoys["file"], decoys["link"])
            os.symlink(decoys["full"], decoys["dirlink"])
            return decoys

        def cleanup(self) -> list:
            """Undo whatever a failing test left: mounts under the root, then loop devices over its files."""
            left = self.state_now()
            for m in sorted(left["mounts"], key=lambda m: len(m[0]), reverse=True):
                subprocess.run(["umount", "-l", m[0]], capture_output=True)
            for name, _ in reversed(left["loops"]):
                subprocess.run(["losetup", "-d", name], capture_output=True)
            return [m for m in left["mounts"] if "/decoys/" not in m[0]] + left["loops"]

    @pytest.fixture(scope="session", autouse=True)
    def _release_foreign_mounts(tmp_path_factory):
        """The private namespace starts with a copy of every host mount, among them other test runs' loop-device
        mounts under the temporary directory; a copy pins its device (their detach would only mark it). Drop those
        copies here — in this namespace only — so this run never holds another run's device."""
        import tempfile
        mine = str(tmp_path_factory.getbasetemp())
        tmp = os.path.realpath(tempfile.gettempdir()) + "/"
        for m in sorted(mounts.table(), key=lambda m: len(m.mountpoint), reverse=True):
            if m.mountpoint.startswith(tmp) and not m.mountpoint.startswith(mine):
                subprocess.run(["umount", "-l", m.mountpoint], capture_output=True)

    @pytest.fixture(params=["no-prefixes", "prefixes"])
    def node(request, tmp_path):
        if os.geteuid() != 0 or not all(shutil.which(t) for t in TOOLS):
            pytest.fail("MISSING: root and " + ", ".join(TOOLS))
        n = Node(str(tmp_path), request.param == "prefixes")
        yield n
        leaked = n.cleanup()
        assert not leaked, f"left behind: {leaked}"

    def _denied(fn, *args, codes=(FailedPrecondition, InvalidArgument, NotFound), **kw) -> str:
        with pytest.raises(codes) as info:
            fn(*args, **kw)
        msg = str(info.value)
        assert msg and len(msg) < 1200, msg
        return msg

    # ---- hostile and mistaken requests --------------------------------------------------------------------------
    def test_unpublish_and_unstage_of_an_unknown_volume_touch_nothing(node):
        decoys = node.plant()
        before = node.state_now()
        for vid in ("local:vol-nothing", "x", "nosuch:vol-1", "local:vol-00000000-0000-5000-8000-000000000000"):
            for path in list(decoys.values()) + [node.dir("pods", "p1", "t", make=False)]:
                for fn in (node.ops.unpublish, node.ops.unstage):
                    try:
                        fn(vid, path)
                    except (FailedPrecondition, InvalidArgument, NotFound) as e:
                        assert len(str(e)) < 1200
            # the host's own trees are judged by the path check alone: a regression must never get to act there
            for system in ("/etc/passwd", "/proc", "//etc", "/usr/bin", "/", "/dev/null", "/sys"):
                for field in ("target_path", "staging_target_path"):
                    _denied(check_path, system, field, codes=InvalidArgument)
        assert node.state_now() == before
        msg = _denied(node.ops.unstage, "local:vol-nothing", decoys["tmpfs"], codes=FailedPrecondition)
        assert "decoy" in msg and "left alone" in msg

    def test_a_staged_volume_id_does_not_reach_other_paths(node):
        decoys = node.plant()
        vid, ctx = node.volume()
        staging = node.dir("plugins", "st1")
        node.ops.stage(vid, staging, MOUNT, ctx, {}, {})
        target = node.dir("pods", "p1", make=False) + "/t"
        os.makedirs(os.path.dirname(target))
        node.ops.publish(vid, staging, target, MOUNT, False)
        before = node.state_now()
        for path in decoys.values():
            try:
                node.ops.unpublish(vid, path)
            except (FailedPrecondition, InvalidArgument):
                pass
            _denied(node.ops.unstage, vid, path)  # staged elsewhere: NOT_FOUND; or refused
        assert node.state_now() == before
        # still published: unstage refuses, and touches nothing
        _denied(node.ops.unstage, vid, staging, codes=FailedPrecondition)
        assert node.state_now() == before
        node.ops.unpublish(vid, target)
        assert not os.path.lexists(target), "the target the plugin made is removed"
        node.ops.unstage(vid, staging)
        assert os.path.isdir(staging), "the CO's staging directory is left"
        node.ctl.delete_volume(vid, {})

    def test_stage_refuses_what_is_not_the_volumes(node):
        decoys = node.plant()
        vid, ctx = node.volume()
        before = node.state_now()
        _denied(node.ops.stage, vid, decoys["tmpfs"], MOUNT, ctx, {}, {}, codes=FailedPrecondition)
        _denied(node.ops.stage, vid, decoys["full"], MOUNT, ctx, {}, {}, codes=FailedPrecondition)
        _denied(node.ops.stage, vid, decoys["file"], MOUNT, ctx, {}, {}, codes=FailedPrecondition)
        _denied(node.ops.stage, vid, decoys["link"], MOUNT, ctx, {}, {}, codes=InvalidArgument)
        _denied(node.ops.stage, vid, decoys["dirlink"], MOUNT, ctx, {}, {}, codes=InvalidArgument)
        _denied(node.ops.stage, vid, decoys["dirlink"] + "/x", MOUNT, ctx, {}, {}, codes=InvalidArgument)
        for system in ("/etc", "//etc", "/usr/bin", "/proc", "/var/lib"):  # judged by the path check alone
            _denied(check_path, system, "staging_target_path", codes=InvalidArgument)
        for own in (node.state, node.files, os.path.join(node.files, "volumes")):  # decoys under the temp dir
            _denied(node.ops.stage, vid, own, MOUNT, ctx, {}, {}, codes=InvalidArgument)
        for flags in (("remount",), ("offset=4096",), ("loop",), ("bind",), ("ro,remount",), ("x-mount.mkdir",)):
            cap = CapabilitySpec("mount", "SINGLE_NODE_WRITER", "ext4", flags)
            _denied(node.ops.stage, vid, node.dir("plugins", "flags"), cap, ctx, {}, {}, codes=InvalidArgument)
            os.rmdir(node.dir("plugins", "flags"))
        assert node.state_now() == before
        # an empty directory the CO made is a fine staging path, and it is not removed at unstage
        node.ops.stage(vid, decoys["empty"], MOUNT, ctx, {}, {})
        node.ops.unstage(vid, decoys["empty"])
        assert node.state_now() == before
        node.ctl.delete_volume(vid, {})

    def test_bind_mount_aliases_of_protected_directories_are_refused(node):
        vid, ctx = node.volume()
        alias = node.dir("pods", "alias-state")
        etc = node.dir("pods", "alias-etc")
        subprocess.run(["mount", "--bind", node.state, alias], check=True)
        subprocess.run(["mount", "--bind", "-o", "ro", "/etc", etc], check=True)
        try:
            before = node.state_now()
            _denied(node.ops.stage, vid, alias, MOUNT, ctx, {}, {}, codes=InvalidArgument)
            _denied(node.ops.stage, vid, os.path.join(alias, "node"), MOUNT, ctx, {}, {}, codes=InvalidArgument)
            _denied(node.ops.unpublish, vid, etc, codes=InvalidArgument)
            _denied(node.ops.unstage, vid, etc, codes=InvalidArgument)
            assert node.state_now() == before
        finally:
            subprocess.run(["umount", etc], check=True)
            subprocess.run(["umount", alias], check=True)
        node.ctl.delete_volume(vid, {})

    def test_block_publish_onto_files_it_did_not_make(node):
        decoys = node.plant()
        vid, ctx = node.volume(cap=BLOCK)
        other, other_ctx = node.volume(cap=BLOCK)
        staging = node.dir("plugins", "blk")
        node.ops.stage(vid, staging, BLOCK, ctx, {}, {})
        before = node.state_now()
        _denied(node.ops.publish, vid, staging, decoys["file"], BLOCK, False, codes=FailedPrecondition)
        _denied(node.ops.publish, vid, staging, decoys["full"], BLOCK, False, codes=FailedPrecondition)
        _denied(node.ops.publish, vid, staging, decoys["tmpfs"], BLOCK, False, codes=FailedPrecondition)
        _denied(node.ops.publish, vid, staging, decoys["link"], BLOCK, False, codes=InvalidArgument)
        _denied(node.ops.publish, vid, staging, other_ctx["path"], BLOCK, False, codes=InvalidArgument)
        assert node.state_now() == before
        assert node.ctl.get_volume(other)[1].abnormal is False
        # an empty directory a tester made is replaced by the device file, and put back at unpublish
        inode = os.stat(decoys["empty"]).st_ino
        node.ops.publish(vid, staging, decoys["empty"], BLOCK, False)
        assert stat.S_ISBLK(os.stat(decoys["empty"]).st_mode)
        node.ops.unpublish(vid, decoys["empty"])
        assert os.stat(decoys["empty"]).st_ino == inode, "the very directory is back, not a new one"
        # an empty file the CO made is mounted over and never removed
        empty_file = os.path.join(os.path.dirname(decoys["file"]), "co-made")
        open(empty_file, "w").close()
        node.ops.publish(vid, staging, empty_file, BLOCK, True)
        node.ops.unpublish(vid, empty_file)
        assert os.path.isfile(empty_file)
        os.unlink(empty_file)
        assert node.state_now() == before
        node.ops.unstage(vid, staging)
        node.ctl.delete_volume(vid, {})
        node.ctl.delete_volume(other, {})

    def test_mount_publish_refuses_what_is_not_the_volumes(node):
        decoys = node.plant()
        vid, ctx = node.volume()
        staging = node.dir("plugins", "m")
        node.ops.stage(vid, staging, MOUNT, ctx, {}, {})
        before = node.state_now()
        for name, code in (("file", FailedPrecondition), ("full", FailedPrecondition), ("tmpfs", FailedPrecondition),
                           ("link", InvalidArgument), ("dirlink", InvalidArgument)):
            _denied(node.ops.publish, vid, staging, decoys[name], MOUNT, False, codes=code)
        assert node.state_now() == before
        # another volume's mount at a target is not this volume's to unmount
        vid2, ctx2 = node.volume()
        staging2 = node.dir("plugins", "m2")
        node.ops.stage(vid2, staging2, MOUNT, ctx2, {}, {})
        target = os.path.join(node.dir("pods", "p2"), "t")
        node.ops.publish(vid2, staging2, target, MOUNT, False)
        with_other = node.state_now()
        _denied(node.ops.publish, vid, staging, target, MOUNT, False, codes=FailedPrecondition)
        _denied(node.ops.unpublish, vid, target, codes=FailedPrecondition)
        _denied(node.ops.unstage, vid2, staging, codes=NotFound)
        assert node.state_now() == with_other
        node.ops.unpublish(vid2, target)
        node.ops.unstage(vid2, staging2)
        node.ops.unstage(vid, staging)
        for v in (vid, vid2):
            node.ctl.delete_volume(v, {})

    # ---- records are reconciled, never trusted ----------------------------------------------------------------------
    def test_stage_reattaches_when_the_recorded_device_belongs_to_another_volume(node):
        vid, ctx = node.volume(cap=BLOCK)
        other, other_ctx = node.volume(cap=BLOCK)
        staging = node.dir("plugins", "r1")
        rec = node.ops.stage(vid, staging, BLOCK, ctx, {}, {})
        dev = rec.device
        # "reboot": the device goes away behind the plugin's back and its number is given to the other volume
        subprocess.run(["losetup", "-d", dev], check=True)
        taken = subprocess.run(["losetup", dev, other_ctx["path"]], capture_output=True)
        assert taken.returncode == 0, taken.stderr
        assert node.backend.node_attachment_valid(vid.split(":", 1)[1], Attachment(dev, {}), ctx) is False
        target = os.path.join(node.dir("pods", "r1"), "t")
        _denied(node.ops.publish, vid, staging, target, BLOCK, False, codes=FailedPrecondition)
        assert not os.path.lexists(target)
        rec = node.ops.stage(vid, staging, BLOCK, ctx, {}, {})
        assert rec.device != dev and loopdev.backs(rec.device, ctx["path"])
        node.ops.publish(vid, staging, target, BLOCK, False)
        assert os.stat(target).st_rdev == os.stat(rec.device).st_rdev
        node.ops.unpublish(vid, target)
        node.ops.unstage(vid, staging)
        assert loopdev.backs(dev, other_ctx["path"]), "the other volume's device was left alone"
        subprocess.run(["losetup", "-d", dev], check=True)
        node.ctl.delete_volume(vid, {})
        node.ctl.delete_volume(other, {})

    def test_reconcile_at_start_drops_only_records_whose_mounts_and_devices_are_gone(node):
        decoys = node.plant()
        gone, ctx = node.volume()
        kept, ctx2 = node.volume()
        s1, s2 = node.dir("plugins", "g"), node.dir("plugins", "k")
        r1 = node.ops.stage(gone, s1, MOUNT, ctx, {}, {})
        node.ops.stage(kept, s2, MOUNT, ctx2, {}, {})
        subprocess.run(["umount", s1], check=True)  # a reboot, for this one volume
        subprocess.run(["losetup", "-d", r1.device], check=True)
        before = node.state_now()
        fresh = NodeOps(node.backends, 0, node.backends.config.node.allowedPathPrefixes)
        repaired = fresh.reconcile()
        assert len(repaired) == 1 and gone in repaired[0], repaired
        assert fresh.record(gone) is None and fresh.record(kept) is not None
        after = node.state_now()
        assert after["mounts"] == before["mounts"] and after["loops"] == before["loops"]
        assert os.path.ismount(decoys["tmpfs"])
        assert fresh.reconcile() == []
        node.ops.unstage(gone, s1)  # the CO's unstage after the reboot: nothing left, success
        node.ops.unstage(kept, s2)
        for v in (gone, kept):
            node.ctl.delete_volume(v, {})

    # ---- failure atomicity: a failure injected at every step ---------------------------------------------------------
    class Steps:
        """Wraps the steps of a node operation; the `occurrence`-th call of step `label` raises Injected."""

        # mkfs first: the first run that gets past it formats the volume, and later runs find it formatted
        LABELS = ("mkfs", "record write", "attach", "mount", "read-only view", "mkdir")

        def __init__(self, monkeypatch, node: Node) -> None:
            self.label = ""
            self.occurrence = 0
            self.seen: dict[str, int] = {}
            targets = {"record write": (NodeOps, "_save"), "mkfs": (filesystems, "make"),
                       "mount": (mounts, "mount"), "read-only view": (loopdev, "attach_read_only_view"),
                       "attach": (type(node.backend), "node_attach")}
            for label, (owner, name) in targets.items():
                monkeypatch.setattr(owner, name, self._wrap(label, getattr(owner, name)))
            real_mkdir = os.mkdir

            def mkdir(path, *a, **kw):
                if str(path).startswith(node.kubelet + "/") and self._hit("mkdir"):
                    raise Injected("mkdir")
                return real_mkdir(path, *a, **kw)
            monkeypatch.setattr(os, "mkdir", mkdir)

        def arm(self, label: str, occurrence: int) -> None:
            self.label, self.occurrence, self.seen = label, occurrence, {}

        def _hit(self, label: str) -> bool:
            self.seen[label] = self.seen.get(label, 0) + 1
            return label == self.label and self.seen[label] == self.occurrence

        def _wrap(self, label: str, fn):
            def wrapped(*a, **kw):
                if self._hit(label):
                    raise Injected(label)
                return fn(*a, **kw)
            return wrapped

    def _every_step_fails_cleanly(node: Node, steps: "Steps", action, undo, before: dict) -> list[str]:
        """For every step and every call of it that `action` makes, run `action` with a failure injected there:
        the node must then be exactly as before. Returns the steps failed ("label#occurrence")."""
        failed = []
        for label in Steps.LABELS:
            for occurrence in range(1, 20):
                steps.arm(label, occurrence)
                try:
                    action()
                except Injected:
                    now = node.state_now()
                    assert now == before, f"after a failure at {label}#{occurrence}: {_diff(before, now)}"
                    failed.append(f"{label}#{occurrence}")
                    continue
                finally:
                    steps.arm("", 0)
                undo()  # the step was not reached: the operation succeeded; take it back and go to the next step
                assert node.state_now() == before
                break
        return failed

    def _diff(a: dict, b: dict) -> str:
        out = []
        for k in a:
            if a[k] != b[k]:
                if isinstance(a[k], dict):
                    out.append(f"{k}: +{sorted(set(b[k]) - set(a[k]))} -{sorted(set(a[k]) - set(b[k]))} "
                               f"changed {[p for p in a[k] if p in b[k] and a[k][p] != b[k][p]]}")
                else:
                    out.append(f"{k}: {a[k]} -> {b[k]}")
        return "; ".join(out)

    @pytest.mark.parametrize("cap", [MOUNT, BLOCK], ids=["mount", "block"])
    def test_failed_stage_and_publish_leave_nothing(node, monkeypatch, cap):
        vid, ctx = node.volume(cap=cap)
        staging = node.dir("plugins", "fail")
        parent = node.dir("pods", "pf")
        steps = Steps(monkeypatch, node)
        before = node.state_now()
        failed = _every_step_fails_cleanly(node, steps, lambda: node.ops.stage(vid, staging, cap, ctx, {}, {}),
                                           lambda: node.ops.unstage(vid, staging), before)
        expected = {"record write#1", "record write#2", "attach#1"} | \
            ({"mkfs#1", "mount#1", "record write#3"} if cap is MOUNT else set())
        assert expected <= set(failed), failed
        node.ops.stage(vid, staging, cap, ctx, {}, {})
        staged = node.state_now()
        for readonly in (False, True):
            target = os.path.join(parent, f"t-{readonly}")
            failed = _every_step_fails_cleanly(
                node, steps, lambda: node.ops.publish(vid, staging, target, cap, readonly),
                lambda: node.ops.unpublish(vid, target), staged)
            expected = {"record write#1", "record write#2", "mount#1"} | ({"mkdir#1"} if cap is MOUNT else set()) | \
                ({"read-only view#1"} if cap is BLOCK and readonly else set())
            assert expected <= set(failed), failed
        node.ops.unstage(vid, staging)
        assert node.state_now() == before
        node.ctl.delete_volume(vid, {})

    def test_a_mount_that_fails_in_the_kernel_leaves_nothing(node):
        """No injection: mount(8) itself refuses an option; the loop device must not stay attached (DeleteVolume
        would then answer FAILED_PRECONDITION forever)."""
        vid, ctx = node.volume()
        staging = node.dir("plugins", "bad")
        before = node.state_now()
        for flags in (("no_such_option_xyz",), ("data=bogus",)):
            cap = CapabilitySpec("mount", "SINGLE_NODE_WRITER", "ext4", flags)
            with pytest.raises(TesseraError):
                node.ops.stage(vid, staging, cap, ctx, {}, {})
            assert node.state_now() == before
        node.ctl.delete_volume(vid, {})

    # ---- the Flex shim -------------------------------------------------------------------------------------------
    def _flex(node: Node, monkeypatch, *argv: str) -> dict:
        from flex import shim
        monkeypatch.setenv("TESSERA_CONFIG", node.config)
        monkeypatch.setenv("TESSERA_NODE_NAME", "own-node")
        reply = shim.run(list(argv))
        return json.loads(reply.to_json())

    def _flex_opts(vid: str, **extra: str) -> str:
        return json.dumps({"kubernetes.io/fsType": "ext4", "kubernetes.io/readwrite": "rw",
                           "kubernetes.io/pvOrVolumeName": "pv-own", "volumeID": vid, **extra})

    def test_flex_failures_leave_nothing(node, monkeypatch):
        from flex.records import Records
        vid, _ = node.volume()
        pods = node.dir("pods", "fp", "volumes", "tessera~block")
        Records(node.state)  # its directories exist from the first call on
        before = node.state_now()
        # the host's own trees are judged by the path check the shim applies first (flex/shim.py), never handed to it
        for system in ("/", "//etc", "/etc", "/usr/bin", "/proc"):
            _denied(check_path, system, "mount directory", codes=InvalidArgument)
        bad_dirs = [os.fsdecode(os.fsencode(pods) + b"/\xff\xfe"), node.state, os.path.join(node.files, "volumes")]
        for d in bad_dirs:
            reply = _flex(node, monkeypatch, "mount", d, _flex_opts(vid))
            assert reply["status"] == "Failure", (d, reply)
            assert len(reply["message"]) < 1200
            assert node.state_now() == before, (d, _diff(before, node.state_now()))
        target = os.path.join(pods, "pv-own")
        for options in ("remount,bogus", "offset=4096", "no_such_option_xyz"):
            reply = _flex(node, monkeypatch, "mount", target, _flex_opts(vid, mountOptions=options))
            assert reply["status"] == "Failure", (options, reply)
            assert node.state_now() == before, (options, _diff(before, node.state_now()))
        # a failure injected at every step of a Flex mount (stage + publish in one call), on a blank volume (the
        # failed mount above formatted the first one)
        node.ctl.delete_volume(vid, {})
        vid, _ = node.volume()
        before = node.state_now()
        steps = Steps(monkeypatch, node)
        failed = _every_step_fails_cleanly(
            node, steps, lambda: _raise_failure(_flex(node, monkeypatch, "mount", target, _flex_opts(vid))),
            lambda: _flex_unmount(node, monkeypatch, target), before)
        assert {"record write#1", "attach#1", "mkfs#1", "mount#1", "mount#2", "mkdir#1"} <= set(failed), failed
        _raise_failure(_flex(node, monkeypatch, "mount", target, _flex_opts(vid)))
        reply = _flex(node, monkeypatch, "unmount", target)
        assert reply["status"] == "Success", reply
        node.ctl.delete_volume(vid, {})

    def _flex_unmount(node: Node, monkeypatch, target: str) -> None:
        """unmount, then the shim's own (empty) directories under kubelet's plugins/, which a successful mount
        keeps for the next one."""
        _raise_failure(_flex(node, monkeypatch, "unmount", target))
        for d in ("staging", ""):
            os.rmdir(os.path.join(node.kubelet, "plugins", "tessera~block", d).rstrip("/"))

    def _raise_failure(reply: dict) -> None:
        if reply["status"] != "Success":
            if "Injected" in reply.get("message", "") or "injected" in reply.get("message", ""):
                raise Injected(reply["message"])
            raise AssertionError(reply)
