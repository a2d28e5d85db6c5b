"""Install the FlexVolume executable for `tessera/block` into kubelet's plugin directory.

    python -m flex.install --plugin-dir /usr/libexec/kubernetes/kubelet-plugins [--python PY] [--code-root DIR]
                           [--config /etc/tessera/config.yaml] [--node-name NODE] [--log FILE]
                           [--copy-runtime SRC DEST] [--copy-config SRC DEST] [--wait]

In the DaemonSet (deploy/kubernetes/flex) the container sees the host under /host: `--copy-runtime` first copies the
image's self-contained runtime (a relocatable Python with the dependencies, plus the code) to the host, into a new
directory renamed into place so a running shim never sees a half-copied tree; `--copy-config` does the same for the
config file; `--python`/`--code-root`/`--config` then name *host* paths, and `--wait` keeps the pod alive (so the
DaemonSet re-installs after an image update) until SIGTERM.

Writes `<plugin-dir>/volume/exec/tessera~block/block`: a launcher whose shebang is the interpreter that has the
shim's dependencies (this one by default) and which puts the code root on sys.path and sets the environment kubelet
cannot pass (config path, node name, log file). The file is written to a temporary name and renamed into place,
because kubelet watches that directory and may run a half-written file otherwise.
"""
from __future__ import annotations

import argparse
import os
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


def install(plugin_dir: str, python: str = sys.executable, root: str = REPO, config: str = "",
            node: str = "", log: str = "", agent_socket: str = "", fast_launcher: str = "") -> str:
    """Write the launcher atomically; returns the path kubelet runs. With `fast_launcher` (a built
    flex/fastpath/block.c) that binary becomes `block`, forwarding to the agent, and the Python launcher
    `block.py` next to it runs every call the agent does not answer."""
    target_dir = os.path.join(plugin_dir, "volume", "exec", DRIVER_DIR)
    os.makedirs(target_dir, mode=0o755, exist_ok=True)
    text = launcher_text(python, root, config, node, log, agent_socket).encode()
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
    p.add_argument("--plugin-dir", default="/usr/libexec/kubernetes/kubelet-plugins",
                   help="kubelet's --volume-plugin-dir (default %(default)s)")
    p.add_argument("--python", default=sys.executable, help="interpreter with the shim's dependencies")
    p.add_argument("--code-root", default=REPO, help="directory holding the flex/, csi/ and backends/ packages")
    p.add_argument("--config", default="", help="Tessera config file (default: /etc/tessera/config.yaml if present)")
    p.add_argument("--node-name", default="", help="this node's Kubernetes name (default: the hostname)")
    p.add_argument("--log", default="", help="shim log file (default /var/log/tessera-flex.log)")
    p.add_argument("--agent-socket", default="", help="unix socket of the optional node agent (flex.agent); calls go "
                   "there when it answers, in-process otherwise")
    p.add_argument("--fast-launcher", default="", help="a built flex/fastpath/block.c to install as `block` "
                   "(needs --agent-socket)")
    p.add_argument("--build-fast-launcher", metavar="OUT", default="", help="compile flex/fastpath/block.c to OUT "
                   "and exit (image build step; needs a C compiler)")
    p.add_argument("--copy-runtime", nargs=2, metavar=("SRC", "DEST"), help="copy a runtime tree to the host first")
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
    path = install(a.plugin_dir, a.python, a.code_root, a.config, a.node_name, a.log, a.agent_socket, a.fast_launcher)
    print(f"installed {path}", flush=True)
    if a.wait:
        import signal
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while True:
            signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main())
