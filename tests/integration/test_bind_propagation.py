"""A read-only (or nosuid/noexec) publish stays read-only in every peer its bind mount propagates to.

Why: kubelet and the pods see the node plugin's mounts through shared propagation (the kubelet directory is mounted
into the plugin with `mountPropagation: Bidirectional`). The copy a peer gets is cloned when the mount appears, so
flags set by a later remount (what `mount -o bind,ro` does) never reach it. This module builds that arrangement in a
private mount namespace — a shared mount, a peer of it, and binds made under the shared one — and checks the peer's
copy: its flags in mountinfo, and that a write through it fails.
"""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

NS_ENV = "TESSERA_TEST_PRIVATE_MOUNT_NS"

if os.environ.get(NS_ENV) != "1":
    def test_bind_propagation_in_a_private_mount_namespace(tmp_path):
        if os.geteuid() != 0 or not shutil.which("unshare"):
            pytest.fail("MISSING: root and unshare are required for the propagation tests")
        env = dict(os.environ, **{NS_ENV: "1"})
        cmd = ["unshare", "--mount", "--propagation", "private", "--", sys.executable, "-m", "pytest",
               os.path.abspath(__file__), "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "ns")]
        p = subprocess.run(cmd, cwd=_REPO, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-20000:] + p.stderr[-5000:]
        assert " passed" in p.stdout and "skipped" not in p.stdout, p.stdout[-5000:]

else:
    from csi import mounts  # noqa: E402

    def _sh(*argv: str) -> None:
        subprocess.run(list(argv), check=True, capture_output=True, text=True)

    @pytest.fixture
    def shared(tmp_path):
        """(place, peer): a shared tmpfs and a peer of it; a mount made under `place` appears under `peer`."""
        place, peer, src = tmp_path / "place", tmp_path / "peer", tmp_path / "src"
        for d in (place, peer, src):
            d.mkdir()
        _sh("mount", "-t", "tmpfs", "tmpfs", str(place))
        _sh("mount", "--make-shared", str(place))
        _sh("mount", "--bind", str(place), str(peer))  # a bind of a shared mount is its peer
        _sh("mount", "-t", "tmpfs", "tmpfs", str(src))
        (src / "data").write_text("volume data\n")
        yield place, peer, src
        for m in sorted((m.mountpoint for m in mounts.table() if m.mountpoint.startswith(str(tmp_path))),
                        key=len, reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True)

    def _options(path) -> frozenset:
        found = mounts.mounts_at(str(path))
        assert found, f"nothing mounted at {path}"
        return found[-1].options

    def test_read_only_bind_is_read_only_in_the_peer(shared):
        place, peer, src = shared
        (place / "target").mkdir()
        mounts.mount(str(src), str(place / "target"), None, ["ro"], bind=True)
        assert "ro" in _options(place / "target")
        assert "ro" in _options(peer / "target"), "the propagated copy is writable"
        assert (peer / "target" / "data").read_text() == "volume data\n"
        with pytest.raises(OSError) as e:
            (peer / "target" / "new").write_text("x")
        assert e.value.errno == errno.EROFS

    def test_restricting_flags_reach_the_peer_and_rw_stays_rw(shared):
        place, peer, src = shared
        (place / "a").mkdir()
        (place / "b").mkdir()
        mounts.mount(str(src), str(place / "a"), None, ["nosuid", "nodev", "noexec", "noatime"], bind=True)
        assert {"nosuid", "nodev", "noexec", "noatime"} <= _options(peer / "a")
        mounts.mount(str(src), str(place / "b"), None, [], bind=True)
        assert "rw" in _options(peer / "b")
        (peer / "b" / "written").write_text("ok")
        assert (src / "written").read_text() == "ok"

    def test_read_only_bind_of_a_device_node(shared, tmp_path):
        """Raw block publish binds a device node onto a file."""
        place, peer, _ = shared
        node = tmp_path / "null-dev"
        _sh("mknod", str(node), "c", "1", "3")  # /dev/null's numbers: harmless to bind
        (place / "blk").write_text("")
        link = tmp_path / "by-name"  # LVM's /dev/<vg>/<lv> is a symlink to the dm node: the bind follows it
        os.symlink(node, link)
        mounts.mount(str(link), str(place / "blk"), None, ["ro"], bind=True)
        assert "ro" in _options(peer / "blk")
        assert not os.path.islink(peer / "blk")
        assert os.stat(peer / "blk").st_rdev == os.makedev(1, 3)
