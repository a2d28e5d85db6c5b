"""deploy/image/Dockerfile: parsed (hadolint is not available here) and checked for what the plugin needs."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from .k8s import REPO

DOCKERFILE = REPO / "deploy" / "image" / "Dockerfile"
DOCKERIGNORE = REPO / "deploy" / "image" / "Dockerfile.dockerignore"
REQUIRED_PACKAGES = {"python3-rbd", "python3-rados", "ceph-common", "rbd-nbd", "rbd-fuse", "lvm2", "open-iscsi",
                     "e2fsprogs", "xfsprogs", "util-linux",
                     "python3-os-brick", "python3-rtslib-fb"}  # iSCSI login (node) and the LIO target (controller)
PINNED_DEBIAN = re.compile(r"^debian:(12\.\d+(-slim)?|bookworm-\d{8}(-slim)?)(@sha256:[0-9a-f]{64})?$"
                           r"|^debian(:[\w.-]+)?@sha256:[0-9a-f]{64}$")


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in text.splitlines():
        s = line.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if buf and s.startswith("#"):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        buf += s
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a continued line"
    return out


INSTR = instructions(DOCKERFILE.read_text())


def stages() -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(image, alias, instructions) per FROM."""
    out: list[tuple[str, str, list[tuple[str, str]]]] = []
    for word, rest in INSTR:
        if word == "FROM":
            parts = rest.split()
            alias = parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else ""
            out.append((parts[0], alias, []))
        else:
            assert out, f"{word} before the first FROM"
            out[-1][2].append((word, rest))
    return out


def test_known_instructions_only() -> None:
    known = {"FROM", "RUN", "COPY", "ADD", "ENV", "ARG", "USER", "WORKDIR", "ENTRYPOINT", "CMD", "LABEL", "EXPOSE",
             "VOLUME", "HEALTHCHECK", "SHELL", "STOPSIGNAL"}
    assert {w for w, _ in INSTR} <= known


def test_base_images_are_pinned_debian_bookworm() -> None:
    aliases: set[str] = set()
    for image, alias, _ in stages():
        assert image in aliases or PINNED_DEBIAN.match(image), f"FROM {image}: not a pinned bookworm base"
        if alias:
            aliases.add(alias)
    assert PINNED_DEBIAN.match(stages()[0][0])


def _apt_packages() -> set[str]:
    pkgs: set[str] = set()
    for word, rest in INSTR:
        if word == "RUN" and "apt-get install" in rest:
            for cmd in rest.split("&&"):
                argv = shlex.split(cmd)
                if argv[:2] == ["apt-get", "install"]:
                    assert "--no-install-recommends" in argv, cmd
                    pkgs |= {a for a in argv[2:] if not a.startswith("-")}
            assert "rm -rf /var/lib/apt/lists/*" in rest, "apt lists must be removed in the same layer"
    return pkgs


def test_runtime_packages_installed_in_the_final_image() -> None:
    runtime = next(s for s in stages() if s[1] == "runtime")
    final = stages()[-1]
    assert final[0] == "runtime", "the final stage builds on the runtime stage"
    runtime_pkgs: set[str] = set()
    for word, rest in runtime[2]:
        if word == "RUN" and "apt-get install" in rest:
            runtime_pkgs |= {a for a in shlex.split(rest) if re.match(r"^[a-z0-9][a-z0-9.+-]+$", a)}
    missing = REQUIRED_PACKAGES - runtime_pkgs
    assert not missing, f"runtime stage lacks {sorted(missing)}"
    assert REQUIRED_PACKAGES <= _apt_packages()


def test_packages_exist_in_debian_bookworm() -> None:
    """Each name is a real bookworm package (this host is bookworm; apt-cache reads the local package lists)."""
    if shutil.which("apt-cache") is None:
        pytest.skip("MISSING: apt-cache (a Debian host)")
    pkgs = sorted(_apt_packages())
    r = subprocess.run(["apt-cache", "show", "--no-all-versions", *pkgs], capture_output=True, text=True, timeout=120)
    known = set(re.findall(r"^Package: (\S+)$", r.stdout, re.M))
    assert not set(pkgs) - known, f"not known to apt-cache: {sorted(set(pkgs) - known)} ({r.stderr.strip()})"


def test_project_installed_in_a_venv_with_system_site_packages() -> None:
    runs = " ".join(rest for w, rest in INSTR if w == "RUN")
    m = re.search(r"python3 -m venv (--system-site-packages) (\S+)", runs)
    assert m, "the venv must see Debian's python3-rbd/rados: --system-site-packages"
    venv = m.group(2)
    assert f"{venv}/bin/pip install" in runs
    copies = [rest for w, rest in INSTR if w == "COPY"]
    assert any(f"--from=build {venv}" in c for c in copies), "the final image copies the venv from the build stage"
    envs = " ".join(rest for w, rest in INSTR if w == "ENV")
    assert f"PATH={venv}/bin:" in envs


def test_entrypoint_is_the_console_script() -> None:
    import tomllib
    entry = [rest for w, rest in INSTR if w == "ENTRYPOINT"]
    assert len(entry) == 1 and json.loads(entry[0]) == ["tessera-csi"], entry
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert "tessera-csi" in scripts
    cmd = [rest for w, rest in INSTR if w == "CMD"]
    from csi.cli import parser
    assert parser().parse_args(json.loads(cmd[-1])).command == "serve"


def test_final_user_is_not_root() -> None:
    users = [rest for w, rest in stages()[-1][2] if w == "USER"]
    assert users and users[-1] not in ("root", "0"), users


def test_copied_sources_exist_and_are_not_ignored() -> None:
    ignore = DOCKERIGNORE.read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for w, rest in INSTR:
        if w != "COPY" or rest.startswith("--from"):
            continue
        srcs = [a for a in shlex.split(rest) if not a.startswith("--")][:-1]
        for src in srcs:
            assert (REPO / src).exists(), f"COPY {src}: not in the repository"
            assert src.rstrip("/") in allowed, f"COPY {src}: excluded by {DOCKERIGNORE.name}"
    for path in allowed:
        assert (REPO / path).exists(), f"{DOCKERIGNORE.name} re-includes a missing {path}"
    assert Path(DOCKERIGNORE).read_text().splitlines()[0].startswith("#")
