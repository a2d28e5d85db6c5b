"""Optional node agent for the FlexVolume shim: the same calls, answered by a process that keeps the node code loaded.

    python -m flex.agent --socket /run/tessera/flex-agent.sock [--config FILE] [--node-name NODE]

Why: kubelet starts the shim afresh for every call, and importing the node code (pydantic models, the config, the
backends) costs ~200 ms per call; NodeStage+NodePublish of a warm volume is ~45 ms. With the agent running, the
installed launcher passes the call over a unix socket (flex.agent_client) and only pays a bare interpreter start.
Without it — not installed, crashed, being upgraded — the launcher runs the call in-process: nothing depends on the
agent being there. Both paths run `flex.shim.run`, the same code; the agent answers only for the config file it was
started with (another config falls back to in-process).

It must see the host's mounts as the shim would (run it on the host, or in a privileged container with the kubelet
directory mounted with Bidirectional propagation, like a CSI node plugin).
"""
from __future__ import annotations

import argparse
import logging
import os
import socketserver
import sys
import threading
from typing import Optional, Sequence

log = logging.getLogger("tessera.flex.agent")


class _State:
    def __init__(self, config: str) -> None:
        self.config = config
        self.lock = threading.Lock()
        self.shim = None
        self.mtime = None

    def current(self):
        """The shared Shim, rebuilt when the config file changed (so an edited config applies without a restart)."""
        from flex.shim import Shim
        try:
            mtime = os.stat(self.config).st_mtime_ns if self.config else None
        except FileNotFoundError:
            mtime = None
        with self.lock:
            if self.shim is None or mtime != self.mtime:
                old = self.shim
                self.shim = Shim()
                self.mtime = mtime
                if old is not None:
                    old.close()
            return self.shim


def make_server(socket_path: str, config: str, node: str) -> socketserver.ThreadingUnixStreamServer:
    os.environ["TESSERA_CONFIG"] = config
    if node:
        os.environ["TESSERA_NODE_NAME"] = node
    from flex import shim as shim_mod
    state = _State(config)

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            raw = self.rfile.read()  # the client shuts its write side after the request
            try:
                fields = raw.decode().split("\0")
            except UnicodeDecodeError:
                return
            if len(fields) < 3:
                return  # no reply: the client falls back to running the call itself
            req_config, req_node, argv = fields[0], fields[1], fields[2:]
            if req_config != config or (req_node or node) != node:
                return  # another config or node: the client runs the call in-process
            reply = shim_mod.run(argv, state.current())
            log.info("%s -> %s %s", shim_mod._describe(argv[0], argv[1:]), reply.status, reply.message)
            self.wfile.write(f"{reply.exit_code}\0{reply.to_json()}\n".encode())

    # warm up: import the node/controller code and build config + backends now, not on kubelet's first call
    import csi.controllerops  # noqa: F401
    import csi.nodeops  # noqa: F401
    import flex.records  # noqa: F401
    state.current().backends

    if os.path.exists(socket_path):
        os.unlink(socket_path)
    os.makedirs(os.path.dirname(socket_path) or ".", mode=0o700, exist_ok=True)
    server = socketserver.ThreadingUnixStreamServer(socket_path, Handler)
    server.daemon_threads = True
    os.chmod(socket_path, 0o600)
    return server


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flex.agent", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--socket", default="/run/tessera/flex-agent.sock")
    p.add_argument("--config", default=os.environ.get("TESSERA_CONFIG", ""))
    p.add_argument("--node-name", default=os.environ.get("NODE_NAME", ""))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    server = make_server(a.socket, a.config, a.node_name)
    import signal
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    log.info("flex agent serving on %s (config %s)", a.socket, a.config or "<default>")
    try:
        server.serve_forever()
    finally:
        server.server_close()
        try:
            os.unlink(a.socket)
        except FileNotFoundError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
