"""Install the FlexVolume executable for `tessera/block` into kubelet's volume plugin directory.

    python -m flex.install [--plugin-dir /usr/libexec/kubernetes/kubelet-plugins | --volume-plugin-dir DIR]
                           [--bundle DIR | --python PY --code-root DIR]
                           [--config /etc/tessera/config.yaml] [--node-name NODE] [--log FILE]
                           [--agent-socket SOCK [--fast-launcher BIN]]
                           [--copy-runtime SRC DEST] [--copy-config SRC DEST] [--wait]

Where: kubelet looks for Flex drivers in its --volume-plugin-dir, whose default is
/usr/libexec/kubernetes/kubelet-plugins/volume/exec. `--plugin-dir` names the directory that holds `volume/exec`
(default /usr/libexec/kubernetes/kubelet-plugins, matching kubelet's default); `--volume-plugin-dir` names kubelet's
--volume-plugin-dir itself, for kubelets configured with another one (e.g. /var/lib/kubelet/volumeplugins). The
driver is written to `<volume plugin dir>/tessera~block/block`.

What: with `--bundle DIR`, `block` is a `#!/bin/sh` launcher that starts the self-contained runtime at DIR (built by
`python -m flex.bundle`: its own dynamic loader, shared libraries, Python, dependencies and code) as
`DIR/lib/ld-linux-*.so.* --library-path DIR/lib DIR/bin/python3 ...`, so it runs on a host with no Python or a
different glibc; nothing of the host's /usr/lib/python3* is used (the bundle's bin/python3._pth fixes sys.path).
Without it, `block` is a Python script whose shebang is the interpreter that has the shim's dependencies (`--python`,
this one by default) and which puts `--code-root` on sys.path. Either way the launcher sets the environment kubelet
cannot pass (config path, node name, log file). Every file is written to a temporary name and renamed into place,
because kubelet watches that directory and may run a half-written file otherwise.

In the DaemonSet (deploy/kubernetes/flex) the container sees the host under /host: `--copy-runtime` first copies the
image's bundle to the host, into a new directory renamed into place so a running shim never sees a half-copied tree
(with `--bundle`, the copy at DEST is what the installer reads and checks, DIR being where the host sees it);
`--copy-config` does the same for the config file; `--bundle`/`--config` then name *host* paths, and `--wait` keeps
the pod alive (so the DaemonSet re-installs after an image update) until SIGTERM.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from typing import Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER_DIR = "tessera~block"
EXECUTABLE = "block"

_TEMPLATE = '''#!{python} -ES
# tessera/block FlexVolume driver launcher, written by `python -m flex.install`; re-run it to change.
# -S: site-packages are added only when the call runs in-process; a call the node agent answers never needs them.
import os, sys
os.environ.setdefault("TESSERA_CONFIG", {config!r})
os.environ.setdefault("TESSERA_NODE_NAME", {node!r})
os.environ.setdefault("TESSERA_FLEX_LOG", {log!r})
sys.path.insert(0, {root!r})
if len(sys.argv) > 1 and sys.argv[1] != "init" and {agent!r}:
    from flex.agent_client import call
    answer = call({agent!r}, sys.argv[1:], os.environ["TESSERA_CONFIG"], os.environ["TESSERA_NODE_NAME"])
    if answer is not None:
        os.write(1, answer[0].encode())
        sys.exit(answer[1])
import site
site.main()
from flex.shim import main
sys.exit(main())
'''


def launcher_text(python: str, root: str, config: str, node: str, log: str, agent: str = "") -> str:
    return _TEMPLATE.format(python=python, root=root, config=config, node=node, log=log, agent=agent)


# The bundled launcher: sh execs the bundle's loader, which runs the bundle's Python on the code below (-c keeps the
# launcher one file, written atomically). -I -S repeat what bin/python3._pth implies, so that a bundle whose ._pth
# went missing still ignores PYTHON* variables and the user site, and the first line then refuses to go on.
_BUNDLE_SH = """#!/bin/sh
# tessera/block FlexVolume driver launcher, written by `python -m flex.install --bundle`; re-run it to change.
# Runs the self-contained runtime in {bundle} (python -m flex.bundle) through its own dynamic loader and shared
# libraries: nothing of the host's Python or libc is used, and its bin/python3._pth fixes sys.path (isolated mode:
# PYTHONHOME, PYTHONPATH and the user site are ignored). Programs the shim runs (mount, mkfs, losetup, ...) are the
# host's, with the host's libraries: --library-path is an argument of the loader, not inherited.
exec {argv} -I -S -c {code} "$@"
"""

_BUNDLE_CODE = """import os, sys
if {app} not in sys.path:
    os.write(1, {damaged}.encode())
    sys.exit(1)
os.environ.setdefault("TESSERA_CONFIG", {config})
os.environ.setdefault("TESSERA_NODE_NAME", {node})
os.environ.setdefault("TESSERA_FLEX_LOG", {log})
if len(sys.argv) > 1 and sys.argv[1] != "init" and {agent}:
    from flex.agent_client import call
    answer = call({agent}, sys.argv[1:], os.environ["TESSERA_CONFIG"], os.environ["TESSERA_NODE_NAME"])
    if answer is not None:
        os.write(1, answer[0].encode())
        sys.exit(answer[1])
from flex.shim import main
sys.exit(main())
"""


def _literal(value: str) -> str:
    """A Python string literal in double quotes when that is exact (ASCII: JSON's escapes are Python's), so the
    single-quoted shell word around the code stays readable."""
    return json.dumps(value) if value.isascii() else repr(value)


def bundle_launcher_text(bundle: str, manifest: dict, config: str, node: str, log: str, agent: str = "") -> str:
    """The sh launcher for the bundle at `bundle` (an absolute path on the host that runs it)."""
    from .bundle import python_argv
    if not os.path.isabs(bundle):
        raise ValueError(f"--bundle must be an absolute path, not {bundle!r}")
    bundle = os.path.normpath(bundle)
    damaged = json.dumps({"status": "Failure", "message": f"tessera/block: the runtime in {bundle} is damaged (its "
                          "bin/python3._pth was not read); re-run the installer"}) + "\n"
    code = _BUNDLE_CODE.format(app=_literal(os.path.join(bundle, manifest["app"])), damaged=_literal(damaged),
                               config=_literal(config), node=_literal(node), log=_literal(log), agent=_literal(agent))
    return _BUNDLE_SH.format(bundle=bundle, argv=" ".join(shlex.quote(a) for a in python_argv(bundle, manifest)),
                             code=shlex.quote(code))


FAST_SOURCE = os.path.join(REPO, "flex", "fastpath", "block.c")


def _write_atomic(path: str, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".block-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def build_fast_launcher(out: str, cc: str = "cc") -> str:
    """Compile flex/fastpath/block.c, statically linked so it runs on any x86-64/arm64 host libc (image build step)."""
    from backends.util import run
    run([cc, "-O2", "-Wall", "-static", "-o", out, FAST_SOURCE], timeout=120)
    return out


def install(plugin_dir: str = "/usr/libexec/kubernetes/kubelet-plugins", python: str = sys.executable,
            root: str = REPO, config: str = "", node: str = "", log: str = "", agent_socket: str = "",
            fast_launcher: str = "", *, volume_plugin_dir: str = "", bundle: str = "", bundle_view: str = "",
            verify: bool = False) -> str:
    """Write the launcher atomically; returns the path kubelet runs.

    The driver goes to `<volume_plugin_dir>/tessera~block/`, `volume_plugin_dir` (kubelet's --volume-plugin-dir)
    defaulting to `<plugin_dir>/volume/exec`. With `bundle` (the host path of a `python -m flex.bundle` tree, read
    at `bundle_view` if the installer sees it elsewhere) the launcher runs that runtime and `python`/`root` are
    unused; `verify` imports the shim through it first (flex.bundle.verify). With `fast_launcher` (a built
    flex/fastpath/block.c) that binary becomes `block`, forwarding to the agent, and the launcher `block.py` next to
    it runs every call the agent does not answer."""
    target_dir = os.path.join(volume_plugin_dir or os.path.join(plugin_dir, "volume", "exec"), DRIVER_DIR)
    if bundle:
        from .bundle import load_manifest, verify as verify_bundle
        view = bundle_view or bundle
        manifest = load_manifest(view)
        for rel in (manifest["loader"], manifest["python"], manifest["python"] + "._pth"):
            if not os.path.isfile(os.path.join(view, rel)):
                raise FileNotFoundError(f"bundle {view} lacks {rel}: rebuild it with `python -m flex.bundle`")
        if verify:
            verify_bundle(view)
        text = bundle_launcher_text(bundle, manifest, config, node, log, agent_socket).encode()
    else:
        text = launcher_text(python, root, config, node, log, agent_socket).encode()
    os.makedirs(target_dir, mode=0o755, exist_ok=True)
    path = os.path.join(target_dir, EXECUTABLE)
    if not fast_launcher:
        _write_atomic(path, text, 0o755)
        for stale in ("block.py", "block.agent"):
            if os.path.exists(os.path.join(target_dir, stale)):
                os.unlink(os.path.join(target_dir, stale))
        return path
    if not agent_socket:
        raise ValueError("--fast-launcher forwards to the node agent: give --agent-socket too")
    # order matters: kubelet may run `block` at any moment, so what it falls back to exists before it does
    _write_atomic(os.path.join(target_dir, "block.py"), text, 0o755)
    _write_atomic(os.path.join(target_dir, "block.agent"),
                  f"{agent_socket}\n{config or os.environ.get('TESSERA_CONFIG', '')}\n{node}\n".encode(), 0o644)
    with open(fast_launcher, "rb") as f:
        _write_atomic(path, f.read(), 0o755)
    return path


def copy_tree_atomic(src: str, dest: str) -> None:
    """Replace `dest` by a copy of `src` (copy beside it, then swap by rename)."""
    import shutil
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".copy-", dir=parent)
    shutil.copytree(src, os.path.join(tmp, "new"), symlinks=True)
    old = None
    if os.path.exists(dest):
        old = os.path.join(tmp, "old")
        os.rename(dest, old)
    os.rename(os.path.join(tmp, "new"), dest)
    shutil.rmtree(tmp, ignore_errors=True)


def copy_file_atomic(src: str, dest: str, mode: int = 0o600) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".cfg-", dir=os.path.dirname(os.path.abspath(dest)))
    with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
        out.write(inp.read())
    os.chmod(tmp, mode)
    os.replace(tmp, dest)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flex.install", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--plugin-dir", default="/usr/libexec/kubernetes/kubelet-plugins",
                       help="the directory holding volume/exec, i.e. kubelet's --volume-plugin-dir minus its "
                            "trailing volume/exec (default %(default)s, from kubelet's default "
                            "/usr/libexec/kubernetes/kubelet-plugins/volume/exec)")
    where.add_argument("--volume-plugin-dir", default="", help="kubelet's --volume-plugin-dir itself (the driver "
                       "goes to DIR/tessera~block); for kubelets not using the default")
    p.add_argument("--bundle", default="", metavar="DIR", help="host path of a self-contained runtime built by "
                   "`python -m flex.bundle` (copied there by --copy-runtime): the launcher runs it, not --python")
    p.add_argument("--no-verify", action="store_true", help="with --bundle: skip importing the shim through the "
                   "bundle before installing")
    p.add_argument("--python", default=sys.executable, help="without --bundle: interpreter with the shim's "
                   "dependencies (default %(default)s)")
    p.add_argument("--code-root", default=REPO, help="without --bundle: directory holding the flex/, csi/ and "
                   "backends/ packages (default %(default)s)")
    p.add_argument("--config", default="", help="Tessera config file (default: /etc/tessera/config.yaml if present)")
    p.add_argument("--node-name", default="", help="this node's Kubernetes name (default: the hostname)")
    p.add_argument("--log", default="", help="shim log file (default /var/log/tessera-flex.log)")
    p.add_argument("--agent-socket", default="", help="unix socket of the optional node agent (flex.agent); calls go "
                   "there when it answers, in-process otherwise")
    p.add_argument("--fast-launcher", default="", help="a built flex/fastpath/block.c to install as `block` "
                   "(needs --agent-socket)")
    p.add_argument("--build-fast-launcher", metavar="OUT", default="", help="compile flex/fastpath/block.c to OUT "
                   "and exit (image build step; needs a C compiler)")
    p.add_argument("--copy-runtime", nargs=2, metavar=("SRC", "DEST"), help="copy a runtime tree (the bundle) to "
                   "the host first")
    p.add_argument("--copy-config", nargs=2, metavar=("SRC", "DEST"), help="copy the config file to the host first")
    p.add_argument("--wait", action="store_true", help="after installing, sleep until SIGTERM (DaemonSet)")
    a = p.parse_args(argv)
    if a.build_fast_launcher:
        print(f"built {build_fast_launcher(a.build_fast_launcher)}")
        return 0
    if a.copy_runtime:
        copy_tree_atomic(*a.copy_runtime)
    if a.copy_config:
        copy_file_atomic(*a.copy_config)
    view = a.copy_runtime[1] if a.copy_runtime and a.bundle else ""
    from .bundle import BundleError
    try:
        path = install(a.plugin_dir, a.python, a.code_root, a.config, a.node_name, a.log, a.agent_socket,
                       a.fast_launcher, volume_plugin_dir=a.volume_plugin_dir, bundle=a.bundle, bundle_view=view,
                       verify=bool(a.bundle) and not a.no_verify)
    except (BundleError, FileNotFoundError, ValueError) as e:
        print(f"flex.install: nothing installed: {e}", file=sys.stderr)
        return 1
    print(f"installed {path}" + (f" (runtime {a.bundle})" if a.bundle else ""), flush=True)
    if a.wait:
        import signal
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while True:
            signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main())
