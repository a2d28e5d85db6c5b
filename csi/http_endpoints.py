"""The plugin's HTTP port: Prometheus `/metrics`, and `/healthz` and `/readyz` answering from the same check as the
CSI Probe RPC (csi.health), so that a kubelet probe on this port and the livenessprobe sidecar agree.

Why not prometheus_client's own server: it answers every path with the metrics text, so a `/healthz` probe saw 200
whatever the plugin's state. Here an unknown path is 404 and the health paths say 200 `ok` or 503 with the reason.
"""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest


class _Handler(BaseHTTPRequestHandler):
    check: Callable[[], Optional[str]]
    check_lock: threading.Lock

    def do_GET(self) -> None:  # noqa: N802 - the http.server naming
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
        elif path in ("/healthz", "/readyz"):
            with self.check_lock:  # probes of a slow storage do not pile up
                problem = self.check()
            if problem is None:
                self._send(200, b"ok\n")
            else:
                self._send(503, f"not ready: {problem}\n".encode())
        else:
            self._send(404, b"not found: /metrics, /healthz or /readyz\n")

    def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - scrapes are not worth a log line each
        pass


def serve(address: str, check: Callable[[], Optional[str]]) -> ThreadingHTTPServer:
    """Serve on HOST:PORT (HOST empty: every address) in a daemon thread; return the server (call shutdown())."""
    host, _, port = address.rpartition(":")
    handler = type("Handler", (_Handler,), {"check": staticmethod(check), "check_lock": threading.Lock()})
    server = ThreadingHTTPServer((host.strip("[]") or "0.0.0.0", int(port)), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
