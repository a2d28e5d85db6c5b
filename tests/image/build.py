"""Build deploy/image/Dockerfile on a machine with no Docker engine and no registry: a debootstrap'd Debian tagged as
the recipe's FROM, then `podman build --isolation=chroot`, cached by a hash of everything the recipe reads.

Where things live (kept across runs, outside the repository and outside /tmp, which a reboot clears):
    /var/cache/tessera-image/storage   podman's image store (driver vfs: plain directories, works as root anywhere)
    /var/cache/tessera-image/work      the debootstrap target while the base is made (removed after the import)
    /run/tessera-image                 podman's run-time state (locks; recreated after a reboot)
Override the first two with TESSERA_IMAGE_CACHE=<dir>. Delete the directory to force a build from nothing.

Why a private mount namespace with a minimal /dev for the build: with chroot isolation buildah hands the host's /dev to
the recipe's RUN steps, and lvm2's postinst (vgcfgbackup) then scans every host block device, hanging on any loop
device whose backing is busy. A Docker/BuildKit build sees no host devices either, so this is the faithful setting.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "image" / "Dockerfile"
IGNOREFILE = REPO / "deploy" / "image" / "Dockerfile.dockerignore"
CACHE = Path(os.environ.get("TESSERA_IMAGE_CACHE", "/var/cache/tessera-image"))
RUNROOT = Path("/run/tessera-image")
IMAGE = "localhost/tessera-csi"
TEST_TAG = f"{IMAGE}:test"
DEBIAN_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
SUITE = "bookworm"
# The CA bundle this machine trusts, handed to the recipe's pip step as a build secret (deploy/image/Dockerfile):
# PyPI may be reached through a TLS-intercepting proxy whose CA only the machine's bundle holds.
CA_BUNDLE = Path(os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt")
# What Debian's own -slim images leave out (dpkg path excludes), so the stand-in base is the same shape.
SLIM_EXCLUDES = ["/usr/share/doc/*", "/usr/share/info/*", "/usr/share/man/*", "/usr/share/groff/*",
                 "/usr/share/linda/*", "/usr/share/lintian/*", "/usr/share/locale/*"]
SLIM_INCLUDES = ["/usr/share/doc/*/copyright"]
PROGRAMS = ("podman", "buildah", "debootstrap", "unshare", "nsenter", "chroot", "mount", "tar", "mknod")


def podman_argv(*args: str) -> list[str]:
    return ["podman", "--root", str(CACHE / "storage"), "--runroot", str(RUNROOT), "--storage-driver", "vfs",
            "--cgroup-manager", "cgroupfs", "--events-backend", "file", *args]


def podman(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(podman_argv(*args), capture_output=True, text=True, timeout=timeout, check=check)


def missing_prerequisites() -> list[str]:
    out = [p for p in PROGRAMS if shutil.which(p) is None]
    if os.geteuid() != 0:
        out.append("root (debootstrap, podman's storage and the mount namespaces need it)")
    if not DEBIAN_SOURCES.is_file():
        out.append(str(DEBIAN_SOURCES) + " (the machine's Debian mirror)")
    return out


# ---- the recipe ----------------------------------------------------------------------------------------------------
def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#") or (not buf and not s):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        word, _, rest = (buf + s).partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def base_image(text: str) -> str:
    """The first stage's FROM name (the image this machine has to stand in for)."""
    for word, rest in instructions(text):
        if word == "FROM":
            return rest.split()[0]
    raise AssertionError(f"{DOCKERFILE}: no FROM")


def copied_sources(text: str) -> list[str]:
    """Build-context paths the recipe COPYs/ADDs (COPY --from=<stage> reads another stage, not the context)."""
    out: list[str] = []
    for word, rest in instructions(text):
        if word not in ("COPY", "ADD"):
            continue
        parts = shlex.split(rest)
        if any(p.startswith("--from") for p in parts):
            continue
        srcs = [p for p in parts if not p.startswith("--")][:-1]
        out.extend(srcs)
    return out


def _ignored(rel: str) -> bool:
    name = os.path.basename(rel)
    return "__pycache__" in rel.split(os.sep) or name.endswith(".pyc")


def recipe_hash(text: str, base_id: str) -> str:
    """sha256 over the recipe, its ignore file, the base image's ID and every file it COPYs (path and bytes)."""
    h = hashlib.sha256()
    h.update(text.encode())
    h.update(IGNOREFILE.read_bytes() if IGNOREFILE.exists() else b"")
    h.update(base_id.encode())
    for src in sorted(set(copied_sources(text))):
        path = REPO / src
        assert path.exists(), f"{DOCKERFILE}: COPY {src}: no such file in the build context"
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            rel = str(f.relative_to(REPO))
            if _ignored(rel):
                continue
            h.update(rel.encode() + b"\0")
            h.update(f.read_bytes())
            h.update(b"\0")
    return h.hexdigest()


# ---- building ----------------------------------------------------------------------------------------------------
@dataclass
class Built:
    """The result of `ensure_image`: the image, whether it came from the cache, and where the time went."""
    tag: str
    image_id: str
    cached: bool
    timings: dict[str, float] = field(default_factory=dict)
    size_bytes: int = 0
    log: Optional[Path] = None


def _mirror_uri() -> str:
    """The first URIs: line of the machine's Debian sources (the only mirror the base is fetched from)."""
    for line in DEBIAN_SOURCES.read_text().splitlines():
        if line.startswith("URIs:"):
            return line.split()[1]
    raise AssertionError(f"{DEBIAN_SOURCES}: no URIs: line")


MINIMAL_DEV = r"""
mount -t tmpfs -o mode=755,nosuid tmpfs /dev
for spec in null:1:3 zero:1:5 full:1:7 random:1:8 urandom:1:9 tty:5:0; do
  name=${spec%%:*}; rest=${spec#*:}; mknod -m 666 /dev/$name c ${rest%%:*} ${rest#*:}
done
mkdir /dev/pts /dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts /dev/pts
ln -s pts/ptmx /dev/ptmx
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
ln -s /proc/self/fd /dev/fd
"""


def _in_private_namespace(argv: list[str], log, timeout: float, prelude: str = "") -> None:
    """Run argv in a private mount namespace (nothing it mounts reaches the host), after the shell `prelude`."""
    script = "set -eu\n" + prelude + '\nexec "$@"\n'
    cmd = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", *argv]
    log.write(f"\n$ {shlex.join(argv)}\n".encode())
    log.flush()
    r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    if r.returncode != 0:
        tail = Path(log.name).read_bytes().decode(errors="replace").splitlines()[-60:]
        raise AssertionError(f"{argv[0]} exited with {r.returncode}; the end of {log.name}:\n" + "\n".join(tail))


def _make_base(name: str, log) -> None:
    """debootstrap --variant=minbase (what Debian's container images are made from), slimmed as -slim is, with the
    machine's apt sources, imported under the recipe's FROM name."""
    work = CACHE / "work"
    target = work / "rootfs"
    if work.exists():
        shutil.rmtree(work)
    target.mkdir(parents=True)
    # debootstrap ends with a global `sync`, which waits on every mounted filesystem of the machine (another test's
    # stuck FUSE or loop mount stalls it for good); flushing the target's own filesystem is all the base needs. It
    # resets PATH on the way, so the stand-in is bind-mounted over the program inside debootstrap's namespace.
    shim = work / "bin"
    shim.mkdir()
    real_sync = shutil.which("sync") or "/bin/sync"
    shutil.copy(real_sync, shim / "sync.real")
    (shim / "sync").write_text(f"#!/bin/sh\nexec {shlex.quote(str(shim / 'sync.real'))} -f "
                               f"{shlex.quote(str(target))}\n")
    (shim / "sync").chmod(0o755)
    programs = sorted({os.path.realpath(p) for p in ("/bin/sync", "/usr/bin/sync") if os.path.exists(p)})
    prelude = "".join(f"mount --bind {shlex.quote(str(shim / 'sync'))} {shlex.quote(p)}\n" for p in programs)
    _in_private_namespace(["debootstrap", "--variant=minbase", SUITE, str(target), _mirror_uri()], log,
                          timeout=900, prelude=prelude)
    # as Debian's images: the deb822 sources of this machine, no apt caches, no docs/man/locales
    (target / "etc/apt/sources.list").unlink(missing_ok=True)
    shutil.copy(DEBIAN_SOURCES, target / "etc/apt/sources.list.d/debian.sources")
    (target / "etc/dpkg/dpkg.cfg.d/docker").write_text(
        "".join(f"path-exclude {p}\n" for p in SLIM_EXCLUDES) + "".join(f"path-include {p}\n" for p in SLIM_INCLUDES))
    for d in ("var/lib/apt/lists", "var/cache/apt"):
        for p in (target / d).glob("**/*"):
            if p.is_file() and p.name != "lock":
                p.unlink()
    for p in (target / "usr/share/doc").rglob("*"):
        if (p.is_file() or p.is_symlink()) and p.name != "copyright":
            p.unlink()
    for d in ("usr/share/man", "usr/share/info", "usr/share/locale"):
        for p in (target / d).iterdir():
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    tar = subprocess.Popen(["tar", "-C", str(target), "--numeric-owner", "-cf", "-", "."], stdout=subprocess.PIPE)
    try:
        subprocess.run(podman_argv("import", "--change", 'CMD ["bash"]', "--message",
                                   f"tessera test stand-in: debootstrap --variant=minbase {SUITE}", "-", name),
                       stdin=tar.stdout, stdout=log, stderr=subprocess.STDOUT, timeout=600, check=True)
    finally:
        tar.stdout.close()
        tar.wait()
    shutil.rmtree(work)


def _image_id(ref: str) -> Optional[str]:
    r = podman("image", "inspect", "--format", "{{.Id}}", ref, check=False)
    return r.stdout.strip() if r.returncode == 0 else None


def ensure_image() -> Built:
    """The recipe built as localhost/tessera-csi:test, from the cache when nothing it reads has changed."""
    CACHE.mkdir(parents=True, exist_ok=True)
    RUNROOT.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    log_path = CACHE / "build.log"
    with open(CACHE / "lock", "w") as lock, open(log_path, "wb") as log:
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = DOCKERFILE.read_text()
        base = base_image(text)
        t0 = time.monotonic()
        base_id = _image_id(base)
        if base_id is None:
            _make_base(base, log)
            base_id = _image_id(base)
            assert base_id, f"the base image {base} is not in the store after the import (see {log_path})"
            timings["base (debootstrap + import)"] = time.monotonic() - t0
        key = recipe_hash(text, base_id)[:20]
        hashed = f"{IMAGE}:{key}"
        image_id = _image_id(hashed)
        cached = image_id is not None
        if not cached:
            # working containers a killed build left behind (this store is the test's own)
            subprocess.run(["buildah", "--root", str(CACHE / "storage"), "--runroot", str(RUNROOT),
                            "--storage-driver", "vfs", "rm", "--all"], stdout=log, stderr=subprocess.STDOUT)
            t1 = time.monotonic()
            _in_private_namespace(podman_argv(
                "build", "--isolation=chroot", "--network=host", "--pull=never", "--layers=false",
                "--ignorefile", str(IGNOREFILE), "--secret", f"id=pip-ca,src={CA_BUNDLE}",
                "-f", str(DOCKERFILE), "-t", hashed, str(REPO)),
                log, timeout=1800, prelude=MINIMAL_DEV)
            timings["podman build"] = time.monotonic() - t1
            image_id = _image_id(hashed)
            assert image_id, f"podman build left no image {hashed} (see {log_path})"
        podman("tag", hashed, TEST_TAG)
        if not cached:
            _drop_older(hashed, log)
        size = int(json.loads(podman("image", "inspect", hashed).stdout)[0]["Size"])
        timings["total"] = time.monotonic() - t0
        return Built(TEST_TAG, image_id, cached, timings, size, log_path)


def _drop_older(keep: str, log) -> None:
    """Earlier builds of the recipe are of no further use; the vfs store would otherwise grow by one per change."""
    r = podman("images", "--format", "{{.Repository}}:{{.Tag}}", IMAGE, check=False)
    for ref in r.stdout.split():
        if ref != keep and ref.startswith(IMAGE + ":") and ref != TEST_TAG:
            subprocess.run(podman_argv("rmi", "--force", ref), stdout=log, stderr=subprocess.STDOUT)
    subprocess.run(podman_argv("image", "prune", "--force"), stdout=log, stderr=subprocess.STDOUT)


def image_config(ref: str) -> dict:
    """The image's run configuration (Entrypoint, Cmd, Env, User, WorkingDir) as an engine would apply it."""
    return json.loads(podman("image", "inspect", ref).stdout)[0]["Config"]


def main() -> int:
    """`make image` / `python -m tests.image.build`: build (or reuse) the image and say where it went."""
    missing = missing_prerequisites()
    if missing:
        print("missing: " + ", ".join(missing) + " (run .ci/install-deps all)")
        return 1
    b = ensure_image()
    print(f"{b.tag} ({b.image_id[:12]}) {'reused from the cache' if b.cached else 'built'}; "
          f"size {b.size_bytes / 1e6:.0f} MB")
    for k, v in b.timings.items():
        print(f"  {k}: {v:.1f} s")
    print("  inspect: " + shlex.join(podman_argv("images", IMAGE)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
