"""FakeApiServer: a FAKE Kubernetes API server for the provisioner tests.

It is a fake because no real kube-apiserver (with etcd) can run on the test machines. It implements only what the
provisioner uses, over real HTTP on 127.0.0.1 so the real `kubernetes` client library is exercised end to end:
list/get/create/delete PersistentVolumes, list/get/create PVCs (plus a `watch=true` stream of PVC changes), list
StorageClasses, create Events, get/create/replace Leases with resourceVersion conflicts (409) like the real server,
get Secrets (kept as the API serves them: `type` and base64 `data`; `fake_secret` builds one).
Objects are plain JSON kept in memory; every write bumps one global resourceVersion.
"""
from __future__ import annotations

import copy
import json
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import parse_qs, urlparse

# (kind, namespaced) per URL collection
_ROUTES = [
    (re.compile(r"^/api/v1/persistentvolumes(?:/(?P<name>[^/]+))?$"), "pv", False),
    (re.compile(r"^/api/v1/persistentvolumeclaims$"), "pvc", True),
    (re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/persistentvolumeclaims(?:/(?P<name>[^/]+))?$"), "pvc", True),
    (re.compile(r"^/apis/storage.k8s.io/v1/storageclasses(?:/(?P<name>[^/]+))?$"), "sc", False),
    (re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/events(?:/(?P<name>[^/]+))?$"), "event", True),
    (re.compile(r"^/apis/coordination.k8s.io/v1/namespaces/(?P<ns>[^/]+)/leases(?:/(?P<name>[^/]+))?$"), "lease", True),
    (re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/secrets(?:/(?P<name>[^/]+))?$"), "secret", True),
]
_LIST_KIND = {"pv": "PersistentVolumeList", "pvc": "PersistentVolumeClaimList", "sc": "StorageClassList",
              "event": "EventList", "lease": "LeaseList", "secret": "SecretList"}


def fake_secret(namespace: str, name: str, data: dict, type_: str = "Opaque") -> dict:
    """A Secret object for FakeApiServer.put("secret", ...): values base64-encoded, as the API serves them."""
    import base64
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
            "type": type_, "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


class FakeApiServer:
    def __init__(self) -> None:
        self.objects: dict[str, dict[tuple[str, str], dict]] = {k: {} for k in _LIST_KIND}
        self.rv = 0
        self.log: list[tuple[str, str]] = []          # (method, path) of every request
        self.watch_log: list[tuple[int, str, dict]] = []  # (rv, type, pvc) for PVC watches
        self.cond = threading.Condition()
        self.fail_next: dict[tuple[str, str], int] = {}  # (method, kind) -> HTTP status to answer once
        self._httpd: Optional[ThreadingHTTPServer] = None

    # ---- store --------------------------------------------------------------------------------------------
    def put(self, kind: str, obj: dict) -> dict:
        """Create or overwrite an object directly (test setup, or playing the PV controller)."""
        with self.cond:
            obj = copy.deepcopy(obj)
            m = obj.setdefault("metadata", {})
            m.setdefault("uid", str(uuid.uuid4()))
            m.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            self.rv += 1
            m["resourceVersion"] = str(self.rv)
            key = (m.get("namespace", ""), m["name"])
            existed = key in self.objects[kind]
            self.objects[kind][key] = obj
            if kind == "pvc":
                self.watch_log.append((self.rv, "MODIFIED" if existed else "ADDED", copy.deepcopy(obj)))
            self.cond.notify_all()
            return copy.deepcopy(obj)

    def get(self, kind: str, name: str, ns: str = "") -> Optional[dict]:
        with self.cond:
            o = self.objects[kind].get((ns, name))
            return copy.deepcopy(o) if o else None

    def items(self, kind: str) -> list[dict]:
        with self.cond:
            return [copy.deepcopy(o) for o in self.objects[kind].values()]

    # ---- HTTP ---------------------------------------------------------------------------------------------
    def start(self) -> "FakeApiServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str, msg: str) -> None:
                self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": msg,
                                  "reason": reason, "code": code})

            def _route(self):
                u = urlparse(self.path)
                for rx, kind, namespaced in _ROUTES:
                    m = rx.match(u.path)
                    if m:
                        return kind, (m.groupdict().get("ns") or ""), m.groupdict().get("name"), parse_qs(u.query)
                return None, "", None, {}

            def _body(self) -> dict:
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n) or b"{}")

            def _handle(self, method: str) -> None:
                server.log.append((method, urlparse(self.path).path))
                kind, ns, name, q = self._route()
                if kind is None:
                    return self._status(404, "NotFound", f"fake apiserver: no route for {self.path}")
                injected = server.fail_next.pop((method, kind), None)
                if injected:
                    return self._status(injected, "InternalError", "fake apiserver: injected failure")
                if method == "GET" and name is None and q.get("watch", ["false"])[0] in ("true", "1"):
                    return self._watch(int(q.get("resourceVersion", ["0"])[0] or 0),
                                       float(q.get("timeoutSeconds", ["5"])[0]))
                with server.cond:
                    store = server.objects[kind]
                    if method == "GET" and name is None:
                        items = [copy.deepcopy(o) for (ons, _), o in sorted(store.items()) if not ns or ons == ns]
                        return self._send(200, {"kind": _LIST_KIND[kind], "apiVersion": "v1", "items": items,
                                                "metadata": {"resourceVersion": str(server.rv)}})
                    if method == "GET":
                        o = store.get((ns, name))
                        return self._send(200, o) if o else self._status(404, "NotFound", f"{kind} {name} not found")
                    if method == "POST":
                        body = self._body()
                        body.setdefault("metadata", {})
                        if ns:
                            body["metadata"]["namespace"] = ns
                        if (ns, body["metadata"].get("name")) in store:
                            return self._status(409, "AlreadyExists", f"{kind} {body['metadata']['name']} exists")
                        return self._send(201, server.put(kind, body))
                    if method == "PUT":
                        body = self._body()
                        cur = store.get((ns, name))
                        if cur is None:
                            return self._status(404, "NotFound", f"{kind} {name} not found")
                        want = (body.get("metadata") or {}).get("resourceVersion")
                        if want and want != cur["metadata"]["resourceVersion"]:
                            return self._status(409, "Conflict", f"{kind} {name}: the object has been modified")
                        body["metadata"]["uid"] = cur["metadata"]["uid"]
                        if ns:
                            body["metadata"]["namespace"] = ns
                        return self._send(200, server.put(kind, body))
                    if method == "DELETE":
                        o = store.pop((ns, name), None)
                        if o is None:
                            return self._status(404, "NotFound", f"{kind} {name} not found")
                        server.rv += 1
                        return self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
                return self._status(405, "MethodNotAllowed", method)

            def _watch(self, since: int, timeout: float) -> None:
                deadline = time.monotonic() + min(timeout, 30)
                with server.cond:
                    while not any(rv > since for rv, _, _ in server.watch_log) and time.monotonic() < deadline:
                        server.cond.wait(max(0.0, deadline - time.monotonic()))
                    events = [{"type": t, "object": o} for rv, t, o in server.watch_log if rv > since]
                data = b"".join(json.dumps(e).encode() + b"\n" for e in events)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

            def do_PUT(self):
                self._handle("PUT")

            def do_DELETE(self):
                self._handle("DELETE")

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def stop(self) -> None:
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()
