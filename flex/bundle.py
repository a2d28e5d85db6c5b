"""Assemble a self-contained, relocatable runtime for the FlexVolume shim (image build step).

    python -m flex.bundle OUTDIR [--code-root DIR] [--debian-package PKG ...] [--no-debian] [--force]
    python -m flex.bundle --verify DIR

kubelet runs the Flex driver on the host, where there may be no Python, another Python, or another glibc. The
bundle carries everything the shim runs on, taken from the interpreter running this module (the image's venv):

    bin/python3           the interpreter binary (the ELF file the venv's `python` resolves to)
    bin/python3._pth      sys.path, relative to bin/. CPython reads it at startup (before any import); its presence
                          replaces the computed sys.path entirely and implies isolated mode and no `site`: PYTHONHOME,
                          PYTHONPATH, the user site and the host's /usr/lib/python3* are never consulted
    bin/tessera-python    sh wrapper for operators: bin/python3 through the bundled loader
    lib/ld-linux-*.so.*   the dynamic loader; launchers run `lib/<loader> --inhibit-cache --library-path lib
                          bin/python3 ...`, so the interpreter never uses the host's loader, libc or ld.so.cache
    lib/*.so*             every shared library `ldd` lists for the interpreter and for every shipped C extension
                          (lib-dynload, grpc, pydantic_core, yaml, rados/rbd and the Ceph libraries, ...)
    lib/python3.X/        the standard library and lib-dynload, without test suites, idlelib, tkinter, turtledemo,
                          ensurepip, lib2to3 and the static libpython
    lib/site-packages/    the project's runtime requirements (pip distributions: the closure of tessera-csi's
                          requirements, from their metadata; files from their RECORD)
    lib/dist-packages/    Debian's python3-rados/rbd/os-brick/rtslib-fb and their python3-* closure (from dpkg),
                          after site-packages on sys.path, as in the venv (which sees them via
                          --system-site-packages)
    app/                  the project code: csi/, backends/, flex/
    bundle.json           what is where; `python -m flex.install --bundle` reads the loader and interpreter from it

Every path inside is relative, so the tree works wherever it is copied (the installer writes absolute paths into
the launcher at install time). Byte code is compiled at build time, so a read-only copy starts as fast as a
writable one. Child processes (mount, mkfs, losetup, rbd, iscsiadm) are the host's own and run with the host's
libraries: `--library-path` is an argument of the loader, not an inherited environment variable.

What is not bundled: NSS modules other than glibc's built-in files/dns (a host nsswitch.conf naming e.g. sss makes
those lookups fail, not crash), Ceph's dlopen()ed plugins (compressors; not needed by the RBD client calls Tessera
makes), locales other than C/C.UTF-8 (Python falls back to C).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from typing import Iterable, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST = "bundle.json"
FORMAT = 1
CODE_PACKAGES = ("csi", "backends", "flex")
PROJECT = "tessera-csi"
# The Debian packages the image installs for the shim's backends (deploy/image/Dockerfile): RBD/RADOS bindings,
# os-brick (iSCSI login on the node) and rtslib-fb (the LIO target the iSCSI backend drives).
DEFAULT_DEBIAN = ("python3-rados", "python3-rbd", "python3-os-brick", "python3-rtslib-fb")
DEBIAN_DIST_PACKAGES = "/usr/lib/python3/dist-packages"
# Debian packages whose files are the interpreter itself, never part of dist-packages.
_DEBIAN_SKIP = re.compile(r"^(python3|python3-minimal|python3\.\d+.*|libpython3.*|python3-distutils|python3-lib2to3)$")

_STDLIB_SKIP_TOP = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "turtle.py", "site-packages",
                    "dist-packages", "sitecustomize.py", "EXTERNALLY-MANAGED", "__phello__", "__hello__.py"}
_SKIP_ANYWHERE = {"test", "tests", "idle_test"}  # test suites inside the standard library
_LIB_DYNLOAD_SKIP = re.compile(r"^(_test|_xxtest|xxlimited|_ctypes_test|_tkinter)")

# What --verify imports through the bundle: the shim's own modules and the C extensions it loads.
VERIFY_CORE = ("flex.shim", "flex.agent_client", "flex.records", "csi.nodeops", "csi.controllerops", "csi.registry",
               "csi.config", "backends.file", "backends.lvm", "backends.rbd", "backends.iscsi", "grpc", "pydantic_core",
               "yaml._yaml", "google.protobuf", "ssl", "ctypes", "hashlib", "sqlite3", "lzma", "bz2", "zlib")
VERIFY_DEBIAN = {"python3-rados": ("rados",), "python3-rbd": ("rbd",),
                 "python3-os-brick": ("os_brick.initiator.connectors.iscsi",), "python3-rtslib-fb": ("rtslib_fb",)}


class BundleError(RuntimeError):
    pass


def _log(msg: str) -> None:
    print(f"flex.bundle: {msg}", file=sys.stderr, flush=True)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ---- copying ---------------------------------------------------------------------------------------------------
def _copy_file(src: str, dst: str) -> bool:
    """Copy one file, following symlinks (a link out of the tree would dangle elsewhere); False if `src` dangles."""
    if not os.path.exists(src):
        return False
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copy2(src, dst)
    return True


def _copy_stdlib(src: str, dst: str) -> None:
    for dirpath, dirnames, filenames in os.walk(src, followlinks=True):
        rel = os.path.relpath(dirpath, src)
        top = rel == "."
        dirnames[:] = [d for d in dirnames if d not in _SKIP_ANYWHERE and not (top and (
            d in _STDLIB_SKIP_TOP or d.startswith("config-")))]
        for name in filenames:
            if top and name in _STDLIB_SKIP_TOP:
                continue
            if rel == "lib-dynload" and _LIB_DYNLOAD_SKIP.match(name):
                continue
            _copy_file(os.path.join(dirpath, name), os.path.join(dst, rel, name))


def _copy_code(code_root: str, dst: str) -> None:
    for pkg in CODE_PACKAGES:
        src = os.path.join(code_root, pkg)
        if not os.path.isfile(os.path.join(src, "__init__.py")):
            raise BundleError(f"{src} is not a package: give --code-root the directory holding csi/, backends/, flex/")
        shutil.copytree(src, os.path.join(dst, pkg), ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def _with_pyc(paths: Iterable[str]) -> list[str]:
    """The files plus the byte code already compiled next to them (saves compiling them again)."""
    out: list[str] = []
    tag = sys.implementation.cache_tag
    for p in dict.fromkeys(paths):
        out.append(p)
        if p.endswith(".py"):
            d, base = os.path.split(p)
            pyc = os.path.join(d, "__pycache__", f"{base[:-3]}.{tag}.pyc")
            if os.path.exists(pyc):
                out.append(pyc)
    return out


# ---- which packages ----------------------------------------------------------------------------------------------
def _requirements(dist) -> list[str]:
    try:
        from packaging.requirements import Requirement
    except ImportError:  # a venv without `packaging` still has pip's copy
        from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    names = []
    for r in dist.requires or []:
        req = Requirement(r)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        names.append(req.name)
    return names


def pip_closure(roots: Sequence[str]) -> list:
    """The installed distributions `roots` need (their requirements without extras, transitively)."""
    import importlib.metadata as md
    seen: dict[str, object] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        key = _norm(name)
        if key in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            raise BundleError(f"requirement {name!r} is not installed in {sys.prefix}") from None
        seen[key] = dist
        todo.extend(_requirements(dist))
    return list(seen.values())


def _dist_dir(dist) -> str:
    return os.path.realpath(str(dist.locate_file("")))


def _dpkg_owner(path: str) -> Optional[str]:
    r = subprocess.run(["dpkg-query", "-S", path], capture_output=True, text=True)
    if r.returncode != 0:
        return None
    return r.stdout.split(":", 1)[0].split(",")[0].strip() or None


def _dpkg_installed(pkg: str) -> Optional[tuple[str, list[str]]]:
    """(version, dependency names incl. every alternative) of an installed package, else None."""
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}\t${Version}\t${Depends}, ${Pre-Depends}", pkg],
                       capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.startswith("install ok installed"):
        return None
    _, version, deps = r.stdout.split("\t", 2)
    names = []
    for group in deps.split(","):
        for alt in group.split("|"):
            alt = alt.strip()
            if alt:
                names.append(alt.split()[0].split(":")[0])
    return version, names


def debian_closure(roots: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """({package: version} of the installed python3-* closure of `roots`, roots that are not installed)."""
    if not shutil.which("dpkg-query"):
        raise BundleError("dpkg-query not found: the Debian packages cannot be resolved (use --no-debian)")
    found: dict[str, str] = {}
    missing = []
    seen = set()
    todo = list(roots)
    provides: Optional[dict[str, list[str]]] = None
    while todo:
        pkg = todo.pop()
        if pkg in seen:
            continue
        seen.add(pkg)
        info = _dpkg_installed(pkg)
        if info is None:
            if provides is None:
                provides = _dpkg_provides()
            if pkg in provides:  # a virtual package (e.g. python3-ply-yacc-3.10, provided by python3-ply)
                todo.extend(provides[pkg])
            elif pkg in roots:
                missing.append(pkg)
            continue
        found[pkg] = info[0]
        todo.extend(n for n in info[1] if n.startswith("python3-") and not _DEBIAN_SKIP.match(n))
    return found, sorted(missing)


def _dpkg_provides() -> dict[str, list[str]]:
    """virtual package name → installed packages that provide it"""
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}\t${Package}\t${Provides}\n"], capture_output=True,
                       text=True)
    out: dict[str, list[str]] = {}
    for line in r.stdout.splitlines():
        status, _, rest = line.partition("\t")
        pkg, _, prov = rest.partition("\t")
        if status != "install ok installed":
            continue
        for item in prov.split(","):
            item = item.strip()
            if item:
                out.setdefault(item.split()[0].split(":")[0], []).append(pkg)
    return out


def _debian_files(pkg: str) -> list[str]:
    r = subprocess.run(["dpkg-query", "-L", pkg], capture_output=True, text=True, check=True)
    prefix = DEBIAN_DIST_PACKAGES + "/"
    return [p for p in r.stdout.splitlines() if p.startswith(prefix) and not os.path.isdir(p)]


# ---- shared libraries -------------------------------------------------------------------------------------------
_LDD_NEEDED = re.compile(r"^\s*(\S+) => (not found|\S+)(?: \(0x[0-9a-f]+\))?$")
_LDD_LOADER = re.compile(r"^\s*(/\S+) \(0x[0-9a-f]+\)$")


def _elf_files(root: str) -> list[str]:
    out = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            if name.endswith(".so") or ".so." in name:
                p = os.path.join(dirpath, name)
                if not os.path.islink(p):
                    with open(p, "rb") as f:
                        if f.read(4) == b"\x7fELF":
                            out.append(p)
    return out


def ldd(files: Sequence[str]) -> tuple[dict[str, str], set[str], list[str]]:
    """({needed name: resolved path}, loaders, problems) for every file, through the system's `ldd`."""
    needed: dict[str, str] = {}
    loaders: set[str] = set()
    problems: list[str] = []
    for i in range(0, len(files), 64):
        batch = list(files[i:i + 64])
        r = subprocess.run(["ldd", *batch], capture_output=True, text=True, env=dict(os.environ, LC_ALL="C"))
        current = batch[0]
        for line in r.stdout.splitlines():
            if not line.startswith(("\t", " ")) and line.endswith(":"):
                current = line[:-1]
                continue
            m = _LDD_NEEDED.match(line)
            if m:
                if m.group(2) == "not found":
                    problems.append(f"{current}: {m.group(1)} not found")
                else:
                    needed.setdefault(m.group(1), m.group(2))
                continue
            m = _LDD_LOADER.match(line)
            if m:
                loaders.add(m.group(1))
        if r.returncode != 0 and "not found" in r.stderr:
            problems.append(r.stderr.strip())
    return needed, loaders, problems


# ---- the bundle ----------------------------------------------------------------------------------------------------
def _pth_lines(pyver: str) -> list[str]:
    return [f"../lib/{pyver}", f"../lib/{pyver}/lib-dynload", "../app", "../lib/site-packages", "../lib/dist-packages"]


_WRAPPER = '''#!/bin/sh
# Runs the bundled Python through the bundled dynamic loader and libraries (bin/python3._pth fixes sys.path).
# Example: {name} -c 'import flex.shim'
b=$(cd "$(dirname "$0")/.." && pwd -P)
exec "$b/{loader}" --inhibit-cache --library-path "$b/lib" "$b/bin/python3" "$@"
'''


def build(out: str, code_root: str = REPO, debian_packages: Sequence[str] = DEFAULT_DEBIAN,
          force: bool = False, compile_workers: int = 1) -> dict:
    """Build the bundle at `out` (built beside it and renamed into place); returns the manifest."""
    out = os.path.abspath(out)
    if os.path.lexists(out) and not force:
        raise BundleError(f"{out} exists (give --force to replace it)")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".bundle-", dir=parent)
    try:
        manifest = _assemble(tmp, os.path.abspath(code_root), debian_packages, compile_workers)
        os.chmod(tmp, 0o755)
        if os.path.lexists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _assemble(root: str, code_root: str, debian_packages: Sequence[str], compile_workers: int) -> dict:
    pyver = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    lib = os.path.join(root, "lib")
    bindir = os.path.join(root, "bin")
    os.makedirs(bindir)
    os.makedirs(lib)

    # the interpreter (a venv's python is a symlink to the base interpreter: copy the real file)
    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    shutil.copy2(exe, os.path.join(bindir, "python3"))
    with open(os.path.join(bindir, "python3._pth"), "w") as f:
        f.write("\n".join(_pth_lines(pyver)) + "\n")

    # the standard library
    stdlib = sysconfig.get_path("stdlib")
    _copy_stdlib(stdlib, os.path.join(lib, pyver))
    if not os.path.isdir(os.path.join(lib, pyver, "lib-dynload")):
        dynload = sysconfig.get_config_var("DESTSHARED")
        if not dynload or not os.path.isdir(dynload):
            raise BundleError(f"cannot find lib-dynload of {exe}")
        shutil.copytree(dynload, os.path.join(lib, pyver, "lib-dynload"))

    # pip distributions: the closure of the project's requirements
    import importlib.metadata as md
    try:
        project = md.distribution(PROJECT)
    except md.PackageNotFoundError:
        raise BundleError(f"{PROJECT} is not installed in {sys.prefix}: its requirements name what to bundle "
                          "(pip install the project first)") from None
    site_dst = os.path.join(lib, "site-packages")
    os.makedirs(site_dst)
    pip_versions: dict[str, str] = {}
    debian_roots = list(debian_packages)
    for dist in pip_closure(_requirements(project)):
        base = _dist_dir(dist)
        name = dist.metadata["Name"]
        if base.startswith(DEBIAN_DIST_PACKAGES + os.sep) or base == DEBIAN_DIST_PACKAGES:
            owner = _dpkg_owner(str(getattr(dist, "_path", base)))
            if owner is None:
                raise BundleError(f"{name} comes from {base} but no Debian package owns it")
            debian_roots.append(owner)
            continue
        if dist.files is None:
            raise BundleError(f"{name} ({base}) lists no files (no RECORD): cannot tell what to copy")
        pip_versions[name] = dist.version
        for rel in _with_pyc(str(p) for p in dist.files):
            if rel.startswith(".." + os.sep) or os.path.isabs(rel):
                continue  # console scripts in bin/ and the like
            _copy_file(os.path.join(base, rel), os.path.join(site_dst, rel))

    # Debian packages and their python3-* dependencies
    deb_dst = os.path.join(lib, "dist-packages")
    os.makedirs(deb_dst)
    debian: dict[str, str] = {}
    missing: list[str] = []
    if debian_roots:
        debian, missing = debian_closure(debian_roots)
        for pkg in missing:
            _log(f"WARNING: Debian package {pkg} is not installed: the bundle goes without it")
        for pkg in sorted(debian):
            for path in _with_pyc(_debian_files(pkg)):
                rel = os.path.relpath(path, DEBIAN_DIST_PACKAGES)
                if rel.endswith(".pth"):
                    continue  # no `site` runs in the bundle; every directory is on sys.path already
                if not _copy_file(path, os.path.join(deb_dst, rel)):
                    _log(f"WARNING: {path} (from {pkg}) is a dangling symlink: skipped")

    # the project code
    _copy_code(code_root, os.path.join(root, "app"))

    # byte code, so the first call on a node does not compile (and a read-only copy never has to)
    import compileall
    for d in (os.path.join(root, "app"), site_dst, deb_dst, os.path.join(lib, pyver)):
        compileall.compile_dir(d, quiet=2, workers=compile_workers)

    # the loader and every shared library the interpreter and the C extensions need
    needed, loaders, problems = ldd([os.path.join(bindir, "python3")])
    if len(loaders) != 1:
        raise BundleError(f"cannot tell the dynamic loader of {exe} from ldd (found {sorted(loaders)})")
    loader_src = loaders.pop()
    more, _, more_problems = ldd(_elf_files(lib))
    problems += more_problems
    if problems:
        raise BundleError("shared libraries missing on the build system:\n  " + "\n  ".join(problems))
    needed.update({k: v for k, v in more.items() if k not in needed})
    loader = os.path.join("lib", os.path.basename(loader_src))
    shutil.copy2(os.path.realpath(loader_src), os.path.join(root, loader))
    libraries = []
    real_root = os.path.realpath(root)
    for soname, path in sorted(needed.items()):
        real = os.path.realpath(path)
        if real.startswith(real_root + os.sep):
            continue  # found through an $ORIGIN RUNPATH inside the bundle (e.g. a wheel's .libs directory)
        dst = os.path.join(lib, os.path.basename(soname))
        if os.path.basename(soname) == os.path.basename(loader) or os.path.exists(dst):
            continue
        shutil.copy2(real, dst)
        libraries.append(os.path.basename(soname))

    name = "tessera-python"
    wrapper = os.path.join(bindir, name)
    with open(wrapper, "w") as f:
        f.write(_WRAPPER.format(name=name, loader=loader))
    os.chmod(wrapper, 0o755)

    manifest = {
        "format": FORMAT,
        "python": "bin/python3",
        "loader": loader,
        "library_path": "lib",
        "app": "app",
        "python_version": platform.python_version(),
        "machine": platform.machine(),
        "built_from": exe,
        "code": list(CODE_PACKAGES),
        "pip": dict(sorted(pip_versions.items())),
        "debian": dict(sorted(debian.items())),
        "debian_missing": missing,
        "libraries": sorted(libraries),
    }
    with open(os.path.join(root, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    return manifest


def load_manifest(bundle: str) -> dict:
    path = os.path.join(bundle, MANIFEST)
    try:
        with open(path) as f:
            m = json.load(f)
    except FileNotFoundError:
        raise BundleError(f"{path} not found: {bundle} is not a bundle made by `python -m flex.bundle`") from None
    if m.get("format") != FORMAT:
        raise BundleError(f"{path}: format {m.get('format')!r}, this installer reads format {FORMAT}")
    return m


def python_argv(bundle: str, manifest: Optional[dict] = None) -> list[str]:
    """The argv prefix that starts the bundle's Python when the bundle is at `bundle` (an absolute path)."""
    m = manifest or load_manifest(bundle)
    return [os.path.join(bundle, m["loader"]), "--inhibit-cache", "--library-path",
            os.path.join(bundle, m["library_path"]), os.path.join(bundle, m["python"])]


_PROBE = r'''
import importlib, json, os, sys
failed = {}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as e:
        failed[name] = f"{type(e).__name__}: {e}"
import yaml
maps = set()
with open("/proc/self/maps") as f:
    for line in f:
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].startswith("/"):
            maps.add(parts[5].strip())
print(json.dumps({"path": sys.path, "isolated": sys.flags.isolated, "failed": failed, "maps": sorted(maps),
                  "csafe": hasattr(yaml, "CSafeLoader")}))
'''


def verify(bundle: str, modules: Optional[Sequence[str]] = None) -> dict:
    """Import the shim's modules through the bundle and check that sys.path and every shared object mapped into the
    process are inside it. Returns the probe's report; raises BundleError on any problem."""
    bundle = os.path.realpath(bundle)
    m = load_manifest(bundle)
    if modules is None:
        modules = list(VERIFY_CORE)
        for pkg, mods in VERIFY_DEBIAN.items():
            if pkg in m.get("debian", {}):
                modules.extend(mods)
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LC_ALL": "C",
           "PYTHONPATH": "/nonexistent-on-purpose"}  # must be ignored (isolated mode)
    r = subprocess.run(python_argv(bundle, m) + ["-c", _PROBE, *modules], capture_output=True, text=True, env=env,
                       timeout=300)
    if r.returncode != 0:
        raise BundleError(f"the bundled Python failed (exit {r.returncode}): {r.stderr.strip()[-2000:]}")
    report = json.loads(r.stdout.strip().splitlines()[-1])
    problems = []
    inside = bundle + os.sep
    for p in report["path"]:
        if not os.path.realpath(p).startswith(inside):
            problems.append(f"sys.path entry outside the bundle: {p}")
    for path in report["maps"]:
        base = os.path.basename(path)
        if (base.endswith(".so") or ".so." in base or path.endswith("/python3")) \
                and not os.path.realpath(path).startswith(inside):
            problems.append(f"mapped from outside the bundle: {path}")
    problems += [f"import {k}: {v}" for k, v in report["failed"].items()]
    if not report["isolated"]:
        problems.append("the interpreter is not in isolated mode (bin/python3._pth not read?)")
    if not report["csafe"]:
        problems.append("yaml has no CSafeLoader (libyaml binding missing)")
    if problems:
        raise BundleError(f"bundle {bundle} is not self-contained:\n  " + "\n  ".join(problems))
    return report


def disk_usage(path: str) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for n in filenames:
            st = os.lstat(os.path.join(dirpath, n))
            total += st.st_blocks * 512
    return total


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flex.bundle", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outdir", nargs="?", help="where to build the bundle")
    p.add_argument("--code-root", default=REPO, help="directory holding csi/, backends/, flex/ (default %(default)s)")
    p.add_argument("--debian-package", action="append", default=None, metavar="PKG",
                   help=f"Debian package to bundle with its python3-* dependencies (repeatable; default: "
                        f"{', '.join(DEFAULT_DEBIAN)})")
    p.add_argument("--no-debian", action="store_true", help="bundle no Debian packages (no RBD/iSCSI support)")
    p.add_argument("--force", action="store_true", help="replace an existing OUTDIR")
    p.add_argument("--jobs", type=int, default=1, help="byte-compile with this many processes (0: one per CPU)")
    p.add_argument("--verify", metavar="DIR", help="check an existing bundle (imports and mapped libraries) and exit")
    a = p.parse_args(argv)
    try:
        if a.verify:
            report = verify(a.verify)
            print(f"{a.verify}: self-contained ({len(report['maps'])} mapped files, all inside)")
            return 0
        if not a.outdir:
            p.error("give OUTDIR (or --verify DIR)")
        debs = () if a.no_debian else tuple(a.debian_package or DEFAULT_DEBIAN)
        m = build(a.outdir, a.code_root, debs, a.force, a.jobs)
    except BundleError as e:
        print(f"flex.bundle: {e}", file=sys.stderr)
        return 1
    print(f"built {a.outdir}: Python {m['python_version']} ({m['machine']}), {len(m['libraries'])} shared libraries, "
          f"{len(m['pip'])} pip distributions, {len(m['debian'])} Debian packages, "
          f"{disk_usage(a.outdir) / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
