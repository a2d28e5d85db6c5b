"""csi/paths.py: the one place a request's path is judged before the node acts on it. Symlink cases use real links
under a temporary directory; nothing outside it is created or touched (the checks only read)."""
from __future__ import annotations

import os

import pytest

from backends.errors import InvalidArgument
from csi.paths import SHOWN, check_path


@pytest.mark.parametrize("path", [
    "/", "/etc", "/etc/", "//etc", "/etc/kubernetes", "/proc", "/proc/1/root", "/sys", "/sys/fs/cgroup", "/dev",
    "/dev/sda", "/usr", "/usr/bin", "/usr/lib/x", "/boot", "/boot/efi", "/bin", "/sbin", "/lib", "/lib64",
    "/lib/modules", "/libx32", "/root", "/root/.ssh", "/run", "/var", "/var/lib", "/home", "/tmp", "/var/log",
])
def test_system_trees_refused_whatever_the_prefixes(path):
    for prefixes in ([], ["/"]):
        with pytest.raises(InvalidArgument):
            check_path(path, "target_path", prefixes)


@pytest.mark.parametrize("path", ["relative/x", "x", "/a/../b", "/a/./b", "/a//b", "//a/b", "/a/b/..", "/a/b/.",
                                  "", "/a\x00b", "/a/\udcff"])
def test_malformed_paths_refused(path):
    with pytest.raises(InvalidArgument):
        check_path(path, "target_path")


def test_length_bounds():
    with pytest.raises(InvalidArgument):
        check_path("/x" * 3000, "target_path")
    with pytest.raises(InvalidArgument):
        check_path("/var/lib/kubelet/" + "a" * 256, "target_path")
    assert check_path("/var/lib/kubelet/" + "a" * 255, "target_path") == "/var/lib/kubelet/" + "a" * 255


def test_messages_are_bounded():
    hostile = "/etc/" + "x" * 100_000
    with pytest.raises(InvalidArgument) as info:
        check_path(hostile, "target_path")
    assert len(str(info.value)) < SHOWN + 300
    with pytest.raises(InvalidArgument) as info:
        check_path("relative" + "y" * 3000, "target_path")
    assert len(str(info.value)) < SHOWN + 300


def test_allowed_prefixes():
    assert check_path("/var/lib/kubelet/pods/x/", "target_path", ["/var/lib/kubelet"]) == "/var/lib/kubelet/pods/x"
    for bad in ("/var/lib/kubeletx/y", "/var/lib/kubelet", "/srv/data/x"):
        with pytest.raises(InvalidArgument):
            check_path(bad, "target_path", ["/var/lib/kubelet"])


def test_protected_directories(tmp_path):
    state = tmp_path / "state"
    files = tmp_path / "files"
    for d in (state, files):
        d.mkdir()
    protected = [str(state), str(files)]
    for bad in (state, state / "node", files, files / "volumes" / "x.img"):
        with pytest.raises(InvalidArgument):
            check_path(str(bad), "target_path", [str(tmp_path)], protected)
    assert check_path(str(tmp_path / "kubelet" / "pods"), "target_path", [str(tmp_path)], protected)


def test_symlinks_refused_anywhere(tmp_path):
    real = tmp_path / "real"
    (real / "pods").mkdir(parents=True)
    (tmp_path / "link").symlink_to(real)
    (real / "pods" / "last").symlink_to(tmp_path)
    (real / "pods" / "dangling").symlink_to(tmp_path / "nowhere")
    prefixes = [str(tmp_path)]
    assert check_path(str(real / "pods" / "target"), "target_path", prefixes) == str(real / "pods" / "target")
    for bad in (tmp_path / "link" / "pods" / "target",  # a link in the middle
                tmp_path / "link" / "pods",
                real / "pods" / "last",                     # the last component is a link
                real / "pods" / "dangling",
                real / "pods" / "last" / "below"):          # a link as the parent
        with pytest.raises(InvalidArgument) as info:
            check_path(str(bad), "target_path", prefixes)
        assert "symbolic link" in str(info.value)


def test_symlink_to_system_tree_refused(tmp_path):
    (tmp_path / "etc-link").symlink_to("/etc")
    with pytest.raises(InvalidArgument):
        check_path(str(tmp_path / "etc-link"), "target_path", [str(tmp_path)])
    with pytest.raises(InvalidArgument):
        check_path(str(tmp_path / "etc-link" / "passwd"), "target_path", [str(tmp_path)])


def test_trailing_slash_trimmed_and_ordinary_paths_pass(tmp_path):
    p = tmp_path / "a" / "b"
    assert check_path(str(p) + "/", "target_path") == str(p)
    assert os.path.isabs(check_path(str(p), "staging_target_path", [str(tmp_path)]))
