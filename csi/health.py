"""The one readiness check, shared by the CSI Probe RPC and the HTTP /healthz and /readyz endpoints.

Why one function: a kubelet liveness probe on /healthz and the CSI livenessprobe sidecar's Probe call must agree, or
a pod is restarted by one while the other calls it healthy. The checks follow the services the process serves: a
controller checks that its storage answers, a node plugin that this node can attach (see Backend.node_probe).
"""
from __future__ import annotations

import json
import logging
from typing import Optional

from backends.errors import TesseraError

from .registry import Backends

log = logging.getLogger(__name__)


def probe(backends: Backends, controller: bool, node: bool) -> Optional[str]:
    """None when every backend is ready for the services served; otherwise the first reason it is not."""
    for b in backends:
        try:
            if controller:
                b.probe()
            if node:
                b.node_probe()
        except TesseraError as e:
            log.warning('{"event": "probe", "backend": "%s", "ready": false, "message": %s}', b.name,
                        json.dumps(str(e)[:500]))
            return f"backend {b.name}: {str(e)[:500]}"
    return None
