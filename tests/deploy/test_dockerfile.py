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
                     "python3-os-brick", "python3-rtslib-fb",  # iSCSI login (node) and the LIO target (controller)
                     "tgt"}  # tgtadm, for the iscsi backend's tgt target driver (tgtd runs on the target host)
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


# ---- the FlexVolume parts: the front door and the bundle, and the manifests that run them --------------------------
FLEX_DIR = REPO / "deploy" / "kubernetes" / "flex"
BUNDLE = "/opt/tessera/flex-runtime"
FRONT_DOOR = "/opt/tessera/bin/block-fast"


def _stage(alias: str) -> list[tuple[str, str]]:
    return next(s[2] for s in stages() if s[1] == alias)


def _stage_packages(instrs: list[tuple[str, str]]) -> set[str]:
    pkgs: set[str] = set()
    for word, rest in instrs:
        if word == "RUN" and "apt-get install" in rest:
            for cmd in rest.split("&&"):
                argv = shlex.split(cmd)
                if argv[:2] == ["apt-get", "install"]:
                    pkgs |= {a for a in argv[2:] if not a.startswith("-")}
    return pkgs


def _final_copies() -> dict[str, str]:
    """destination → source of the final stage's COPY --from=build"""
    out = {}
    for w, rest in stages()[-1][2]:
        if w == "COPY" and rest.startswith("--from=build"):
            src, dest = shlex.split(rest)[-2:]
            out[dest] = src
    return out


def test_compiler_only_in_the_build_stage() -> None:
    assert {"gcc", "libc6-dev"} <= _stage_packages(_stage("build")), "the static front door needs gcc and libc.a"
    assert not {"gcc", "libc6-dev"} & _stage_packages(_stage("runtime"))
    assert not {"gcc", "libc6-dev"} & _stage_packages(stages()[-1][2])


def test_front_door_and_bundle_are_built_and_verified_in_the_build_stage() -> None:
    build = _stage("build")
    runs = [rest for w, rest in build if w == "RUN"]
    joined = " ".join(runs)
    assert f"-m flex.install --build-fast-launcher {FRONT_DOOR}" in joined
    m = re.search(r"-m flex\.bundle (?:--code-root (\S+) )?(\S+)", joined)
    assert m and m.group(2) == BUNDLE, joined
    assert m.group(1) in (None, "/src")
    assert f"-m flex.bundle --verify {BUNDLE}" in joined
    # `python -m flex.install/bundle` from /src: flex/fastpath/block.c is not installed into the venv
    idx = next(i for i, (w, rest) in enumerate(build) if w == "RUN" and "--build-fast-launcher" in rest)
    workdirs = [rest for w, rest in build[:idx] if w == "WORKDIR"]
    assert workdirs and workdirs[-1] == "/src"
    assert (REPO / "flex" / "fastpath" / "block.c").exists() and (REPO / "flex" / "bundle.py").exists()
    # the bundle is built after the project is installed (its requirements say what to bundle)
    pip = next(i for i, (w, rest) in enumerate(build) if w == "RUN" and "/bin/pip install" in rest)
    assert pip < idx


def test_final_image_gets_the_venv_bundle_and_front_door() -> None:
    copies = _final_copies()
    assert copies.get(BUNDLE) == BUNDLE and copies.get(FRONT_DOOR) == FRONT_DOOR
    assert copies.get("/opt/tessera/venv") == "/opt/tessera/venv"


def test_project_installed_with_the_flex_extra() -> None:
    import tomllib
    from packaging.requirements import Requirement
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "kubernetes" in {Requirement(r).name for r in extras["flex"]}, "the Flex provisioner imports kubernetes"
    assert "kubernetes" in {Requirement(r).name for r in extras["test"]}
    runs = " ".join(rest for w, rest in INSTR if w == "RUN")
    m = re.search(r"/bin/pip install (?:--\S+ )*(\S+)", runs)
    assert m, runs
    spec = shlex.split(m.group(1))[0]
    assert re.fullmatch(r"/src\[([\w,-]*)\]", spec) and "flex" in spec[5:-1].split(","), spec
    assert "import flex.provisioner.kube" in runs, "the build proves the provisioner imports in the image"


def _image_tag() -> str:
    m = re.search(r"docker build -f deploy/image/Dockerfile -t (\S+) \.", DOCKERFILE.read_text())
    assert m, "the Dockerfile's header names the tag it is built as"
    return m.group(1)


def _containers(path: Path) -> list[dict]:
    import yaml
    out = []
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") in ("DaemonSet", "Deployment"):
            out.extend(doc["spec"]["template"]["spec"]["containers"])
    return out


def test_manifests_run_the_image_this_dockerfile_builds() -> None:
    tag = _image_tag()
    common = [c for c in _containers(REPO / "deploy" / "kubernetes" / "common" / "node-daemonset.yaml")
              if "tessera-csi" in c["image"]]
    assert common and all(c["image"] == tag for c in common)
    flex = [c for p in sorted(FLEX_DIR.glob("*.yaml")) for c in _containers(p)]
    assert len(flex) >= 4
    copies = _final_copies()
    for c in flex:
        assert c["image"] == tag, f"{c['name']}: {c['image']}"
        exe = c["command"][0]
        assert any(exe == d or exe.startswith(d + "/") for d in copies), f"{c['name']}: {exe} is not in the image"
        assert exe.startswith("/opt/tessera/venv/bin/")
        module = REPO / Path(*c["command"][2].split("."))
        assert c["command"][1] == "-m" and (module.is_dir() or module.with_suffix(".py").is_file()), c["command"]
        assert "workingDir" not in c or any(c["workingDir"].startswith(d) for d in copies)


def test_flex_installer_copies_the_bundle_and_names_its_host_path() -> None:
    import yaml
    ds = yaml.safe_load((FLEX_DIR / "installer-daemonset.yaml").read_text())
    spec = ds["spec"]["template"]["spec"]
    c = spec["containers"][0]
    args = c["args"]

    def value(flag: str, n: int = 1) -> list[str]:
        i = args.index(flag)
        return args[i + 1:i + 1 + n]
    src, dest = value("--copy-runtime", 2)
    assert src == BUNDLE and value("--fast-launcher") == [FRONT_DOOR]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    host = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    # --bundle is where the host sees --copy-runtime's DEST
    mount = max((p for p in mounts if dest.startswith(p + "/")), key=len)
    assert value("--bundle") == [host[mounts[mount]] + dest[len(mount):]]
    # the driver goes into kubelet's --volume-plugin-dir (default .../volume/exec), mounted as it is
    vpd = value("--volume-plugin-dir")[0]
    assert host[mounts[vpd]] == "/usr/libexec/kubernetes/kubelet-plugins/volume/exec"
    assert "--python" not in args and "--code-root" not in args
    assert c.get("securityContext", {}).get("runAsUser") == 0, "it writes to the host's /opt and plugin directory"
    text = (FLEX_DIR / "installer-daemonset.yaml").read_text()
    assert "both hostPath" not in text
