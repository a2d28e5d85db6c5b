"""Run the image's entrypoint inside its root file system, as a container engine would, without one.

`podman run` cannot start containers on this machine (setrlimit fails), so a test creates a container (a private,
writable copy of the image's root), mounts it, and starts the command with `chroot` inside a private mount namespace
that has /proc, the host's /dev and /sys (the node plugin attaches loop, FUSE and block devices, as the privileged
DaemonSet does), a fresh /run, and the directories a test shares with it bind-mounted at the same path. Nothing
mounted there reaches the host's mount table; when the last process of the namespace ends, its mounts go with it.

A shared directory is a peer of the host path *inside that namespace*: a filesystem the plugin mounts below it shows
at the same path to a process that joins the namespace (`nsenter --mount --target <pid>`), which is how the
conformance suite, run from the host's venv, sees the staging and target mounts the plugin made.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from tests.image import build


@dataclass
class RunAs:
    """How the image runs its entrypoint: its Entrypoint, Env and User (numeric or a name in the image's passwd)."""
    entrypoint: list[str]
    env: dict[str, str]
    user: str
    workdir: str = "/"

    @classmethod
    def of_image(cls, config: dict) -> "RunAs":
        env = dict(e.split("=", 1) for e in config.get("Env") or [])
        return cls(list(config.get("Entrypoint") or []), env, config.get("User") or "0", config.get("WorkingDir") or "/")


def _passwd_ids(root: Path, user: str) -> tuple[int, int]:
    """uid:gid for `user` (a name or uid, optionally "uid:gid") from the image's own /etc/passwd."""
    name, _, group = user.partition(":")
    for line in (root / "etc/passwd").read_text().splitlines():
        f = line.split(":")
        if len(f) > 3 and (f[0] == name or f[2] == name):
            return int(f[2]), int(group) if group.isdigit() else int(f[3])
    if name.isdigit():
        return int(name), int(group) if group.isdigit() else int(name)
    raise AssertionError(f"user {user!r} is not in the image's /etc/passwd")


@dataclass
class Container:
    """A container's mounted root file system (`podman create` + `podman mount`), removed by `remove()`."""
    name: str
    root: Path
    run_as: RunAs
    procs: list[subprocess.Popen] = field(default_factory=list)

    @classmethod
    def create(cls, image: str, name: str) -> "Container":
        build.podman("rm", "--force", "--ignore", name, check=False)
        build.podman("create", "--name", name, image)
        root = Path(build.podman("mount", name).stdout.strip())
        return cls(name, root, RunAs.of_image(build.image_config(image)))

    def remove(self) -> None:
        for p in self.procs:
            stop(p)
        build.podman("umount", "--force", self.name, check=False)
        build.podman("rm", "--force", self.name, check=False)

    def copy_in(self, src: str | os.PathLike, dest: str) -> str:
        """Copy a host file into the container's root; returns its path as the container sees it."""
        target = self.root / dest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(Path(src).read_bytes())
        os.chmod(target, 0o644)
        return dest

    def argv(self, args: Sequence[str], user: Optional[str] = None, shared: Sequence[str] = (),
             readonly: Sequence[str] = (), entrypoint: Optional[Sequence[str]] = None) -> list[str]:
        """The host command that runs the image's entrypoint (or `entrypoint`, as `--entrypoint` would) with `args`
        inside the container's root."""
        uid, gid = _passwd_ids(self.root, user if user is not None else self.run_as.user)
        r = shlex.quote(str(self.root))
        lines = ["set -eu",
                 f"mount -t proc proc {r}/proc",
                 f"mount --rbind /dev {r}/dev",
                 f"mount --rbind /sys {r}/sys",
                 f"mount -t tmpfs -o mode=755 tmpfs {r}/run"]
        for d in shared:
            q = shlex.quote(d)
            inner = shlex.quote(str(self.root) + d)
            lines += [f"mount --bind {q} {q}", f"mount --make-shared {q}", f"mkdir -p {inner}",
                      f"mount --bind {q} {inner}"]
        for d in readonly:
            q = shlex.quote(d)
            inner = shlex.quote(str(self.root) + d)
            lines += [f"mkdir -p {inner}", f"mount --bind {q} {inner}", f"mount -o remount,bind,ro {inner}"]
        env = [f"{k}={v}" for k, v in self.run_as.env.items()] + ["HOME=/root" if uid == 0 else "HOME=/nonexistent"]
        inner_cmd = ["/usr/bin/env", "-i", *env, "sh", "-c", f"cd {shlex.quote(self.run_as.workdir)} && exec \"$@\"",
                     "sh", *(self.run_as.entrypoint if entrypoint is None else entrypoint), *args]
        lines.append(f"exec chroot --userspec={uid}:{gid} --groups={gid} {r} " + shlex.join(inner_cmd))
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", "\n".join(lines)]

    def run(self, args: Sequence[str], user: Optional[str] = None, timeout: float = 120,
            **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(args, user=user, **kw), capture_output=True, text=True, timeout=timeout)

    def start(self, args: Sequence[str], log: Path, user: Optional[str] = None, **kw) -> subprocess.Popen:
        """Start the entrypoint in the background (its pid is the namespace's first process: unshare, sh and chroot
        all exec into it)."""
        with open(log, "ab") as f:
            p = subprocess.Popen(self.argv(args, user=user, **kw), stdout=f, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        self.procs.append(p)
        return p


def namespace_members(pid: int) -> list[int]:
    """Processes in the same mount namespace as `pid` (the plugin's helpers: rbd-fuse daemons and the like)."""
    try:
        ns = os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return []
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.readlink(f"/proc/{d}/ns/mnt") == ns:
                    out.append(int(d))
            except OSError:
                pass
    return out


def stop(p: subprocess.Popen, timeout: float = 40) -> Optional[int]:
    """SIGTERM the entrypoint and wait; then end whatever it left running in its namespace (by pid)."""
    if p.poll() is None:
        left = [m for m in namespace_members(p.pid) if m != p.pid]
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        for m in left:
            try:
                os.kill(m, signal.SIGTERM)
            except ProcessLookupError:
                pass
    return p.returncode


def wait_for_socket(path: str, p: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    import grpc
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise AssertionError(f"the plugin in the image exited with {p.returncode}:\n{log.read_text()[-4000:]}")
        if os.path.exists(path):
            ch = grpc.insecure_channel("unix://" + path)
            try:
                grpc.channel_ready_future(ch).result(timeout=1)
                return
            except grpc.FutureTimeoutError:
                pass
            finally:
                ch.close()
        time.sleep(0.1)
    raise AssertionError(f"the plugin in the image did not listen on {path} within {timeout}s:\n"
                         f"{log.read_text()[-4000:]}")


def nsenter(p: subprocess.Popen, argv: Sequence[str], wd: str = "/") -> list[str]:
    """argv run in the plugin's mount namespace (not chrooted): the host's programs, the plugin's mounts. Entering
    a mount namespace moves to its root, hence `wd`."""
    return ["nsenter", f"--mount=/proc/{p.pid}/ns/mnt", f"--wd={wd}", "--", *argv]
