"""The world the hostile run acts in: decoys planted under a temporary directory, and what is observed of them.

Two kinds of decoys, none owned by any volume:
- *outside* the roots a node plugin may act in: under the plugin's own state directory (paths.py refuses it and
  everything below it whatever the configuration), plus the backing files of real volumes there;
- *inside* the kubelet-like root the requests use: a regular file, empty and non-empty directories, a tmpfs mount
  point, symbolic links to decoys, and the staging and target paths of two real, published volumes.

A snapshot records, per decoy, its type, mode, inode, content (hash of files, listing of directories), link target
and the mounts on it; two snapshots compare equal when nothing was changed, moved, removed or mounted over."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
from dataclasses import dataclass, field
from typing import Iterable, Optional


@dataclass(frozen=True)
class Mount:
    mount_id: int
    parent: int
    mountpoint: str
    fstype: str
    source: str
    options: str


def _unescape(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def mount_table() -> list[Mount]:
    """Every mount of this process's namespace, from /proc/self/mountinfo."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            a, b = left.split(" "), right.split(" ")
            out.append(Mount(int(a[0]), int(a[1]), _unescape(a[4]), b[0], _unescape(b[1]) if len(b) > 1 else "",
                             a[5]))
    return out


def loop_devices() -> dict[str, str]:
    """Attached loop devices: device -> backing file, from sysfs (`losetup` stats backing files, and one on a hung
    FUSE mount of some other test would hang it)."""
    out = {}
    for name in os.listdir("/sys/block"):
        try:
            with open(f"/sys/block/{name}/loop/backing_file") as f:
                out[f"/dev/{name}"] = f.read().strip().removesuffix(" (deleted)")
        except OSError:
            continue
    return out


def drop_foreign_fuse_mounts(keep_under: str) -> list[str]:
    """Lazily unmount, in this private namespace only, the FUSE mounts inherited from the host (other tests' rbd-fuse
    and the like): a hung FUSE daemon elsewhere would hang every tool that scans the mount table (resize2fs stats each
    mount point) and so the plugin under test, for reasons that are not its own."""
    dropped = []
    for m in reversed(mount_table()):
        if m.fstype.startswith("fuse") and not m.mountpoint.startswith(keep_under + "/"):
            if subprocess.run(["umount", "-l", "-c", m.mountpoint], capture_output=True,
                                                                     timeout=30).returncode == 0:
                dropped.append(m.mountpoint)
    return dropped


def drop_foreign_tmp_mounts(keep_under: str) -> list[str]:
    """Lazily unmount, in this private namespace only, the copies of other test runs' mounts under the temporary
    directory: a copy pins its loop device, so their unstage would only mark the device to be freed later and their
    next DeleteVolume would meet it still attached."""
    import tempfile
    tmp = os.path.realpath(tempfile.gettempdir()) + "/"
    dropped = []
    for m in reversed(mount_table()):
        if m.mountpoint.startswith(tmp) and not m.mountpoint.startswith(keep_under + "/") \
                and m.mountpoint != keep_under:
            if subprocess.run(["umount", "-l", m.mountpoint], capture_output=True, timeout=30).returncode == 0:
                dropped.append(m.mountpoint)
    return dropped


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tree(path: str, depth: int = 3) -> list[str]:
    """A directory's content as sorted 'name kind digest' lines, a few levels deep."""
    out = []
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        return [f"<unreadable: {e.strerror}>"]
    for name in names:
        p = os.path.join(path, name)
        st = os.lstat(p)
        if stat.S_ISDIR(st.st_mode):
            out.append(f"{name}/ {st.st_ino} {oct(st.st_mode)}")
            if depth > 1:
                out.extend(f"{name}/{line}" for line in _tree(p, depth - 1))
        elif stat.S_ISREG(st.st_mode):
            out.append(f"{name} {st.st_ino} {oct(st.st_mode)} {st.st_size} {_digest(p) if st.st_size < (4 << 20) else ''}")
        elif stat.S_ISLNK(st.st_mode):
            out.append(f"{name} -> {os.readlink(p)}")
        else:
            out.append(f"{name} {oct(st.st_mode)} {st.st_rdev}")
    return out


@dataclass
class Decoy:
    path: str
    kind: str  # file, empty-dir, full-dir, tmpfs, link, image, volume-stage, volume-target, volume-block-target
    outside: bool  # under a root the plugin must never act in
    hash_content: bool = True  # False for the backing image of a mounted volume (its file system writes to it)


def observe(decoy: Decoy, mounts: Iterable[Mount]) -> dict:
    """What a person would check of one decoy."""
    p = decoy.path
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return {"exists": False}
    seen: dict = {"exists": True, "mode": oct(st.st_mode), "ino": st.st_ino, "dev": st.st_dev,
                  "uid": st.st_uid, "gid": st.st_gid}
    if stat.S_ISLNK(st.st_mode):
        seen["link"] = os.readlink(p)
    elif stat.S_ISREG(st.st_mode):
        seen["size"] = st.st_size
        if decoy.hash_content:
            seen["sha256"] = _digest(p)
    elif stat.S_ISDIR(st.st_mode):
        seen["tree"] = _tree(p)
    elif stat.S_ISBLK(st.st_mode):
        seen["rdev"] = st.st_rdev
    seen["mounts"] = sorted(f"{m.fstype} {m.source} {m.options}" for m in mounts if m.mountpoint == p)
    return seen


def snapshot(decoys: Iterable[Decoy]) -> dict[str, dict]:
    table = mount_table()
    return {d.path: observe(d, table) for d in decoys}


def differences(before: dict[str, dict], after: dict[str, dict]) -> list[tuple[str, list[str]]]:
    """(what changed, in words; the names of the observations that differ) per changed decoy."""
    out = []
    for path, was in before.items():
        now = after.get(path, {"exists": False})
        if was != now:
            changed = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
            out.append((f"{path}: {', '.join(changed)} changed "
                        f"({json.dumps({k: was.get(k) for k in changed})[:300]} -> "
                        f"{json.dumps({k: now.get(k) for k in changed})[:300]})", changed))
    return out


@dataclass
class Layout:
    """Paths of one run, all under `root`."""
    root: str
    state: str = field(init=False)
    kubelet: str = field(init=False)
    scratch: str = field(init=False)
    socket: str = field(init=False)
    log: str = field(init=False)

    def __post_init__(self) -> None:
        self.state = os.path.join(self.root, "state")
        self.kubelet = os.path.join(self.root, "kubelet")
        self.scratch = os.path.join(self.kubelet, "scratch")
        self.socket = os.path.join(self.root, "csi.sock")
        self.log = os.path.join(self.root, "server.log")

    def stage_dirs(self) -> list[str]:
        """Where valid requests stage: empty directories made by 'kubelet' (the CO creates staging paths)."""
        return [os.path.join(self.scratch, f"stage-{i}") for i in range(4)]

    def target_paths(self) -> list[str]:
        """Where valid requests publish: the parent exists, the target does not (the plugin makes it)."""
        return [os.path.join(self.scratch, f"pod-{i}", "volume") for i in range(4)]


def _write(path: str, text: str, mode: int = 0o644) -> None:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def plant(layout: Layout) -> list[Decoy]:
    """Create the decoys (not the volume ones: the driver adds those once its volumes are published)."""
    decoys: list[Decoy] = []
    for base, outside in ((os.path.join(layout.state, "decoys"), True), (os.path.join(layout.kubelet, "decoys"), False)):
        os.makedirs(base, exist_ok=True)
        f = os.path.join(base, "passwd")
        _write(f, "root:x:0:0:decoy:/root:/bin/sh\n", 0o644)
        empty = os.path.join(base, "empty")
        os.makedirs(empty)
        full = os.path.join(base, "full")
        os.makedirs(os.path.join(full, "sub"))
        _write(os.path.join(full, "keep.txt"), "decoy content\n")
        _write(os.path.join(full, "sub", "deep.txt"), "deeper decoy content\n")
        tmpfs = os.path.join(base, "tmpfs")
        os.makedirs(tmpfs)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "decoy-tmpfs", tmpfs], check=True)
        _write(os.path.join(tmpfs, "on-tmpfs.txt"), "decoy on a tmpfs\n")
        link_dir = os.path.join(base, "link-to-full")
        os.symlink(full, link_dir)
        link_file = os.path.join(base, "link-to-passwd")
        os.symlink(f, link_file)
        decoys += [Decoy(f, "file", outside), Decoy(empty, "empty-dir", outside), Decoy(full, "full-dir", outside),
                   Decoy(os.path.join(full, "keep.txt"), "file", outside), Decoy(tmpfs, "tmpfs", outside),
                   Decoy(link_dir, "link", outside), Decoy(link_file, "link", outside)]
    for d in layout.stage_dirs():
        os.makedirs(d)
    for t in layout.target_paths():
        os.makedirs(os.path.dirname(t))
    return decoys


def find_mount(path: str) -> Optional[Mount]:
    found = [m for m in mount_table() if m.mountpoint == path]
    return found[-1] if found else None
