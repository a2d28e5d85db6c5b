"""`tessera-csi`: serve the CSI plugin, or check a config file."""
from __future__ import annotations

import argparse
import faulthandler
import os
import socket
import sys
from typing import Optional, Sequence

from . import constants


def _node_name(flag: Optional[str]) -> str:
    return flag or os.environ.get("NODE_NAME") or os.environ.get("KUBE_NODE_NAME") or socket.gethostname()


def _serve(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config
    from backends.errors import TesseraError
    from .server import EndpointError, build, serve_forever
    from .logfmt import configure
    configure(args.log_format, args.log_level)
    # A native library (librbd, librados) that aborts or faults takes the process with it; the Python stacks of
    # every thread on stderr (the pod log) tell which RPC was inside it when that happened.
    faulthandler.enable(all_threads=True)
    try:
        config = load_config(args.config, args.state_dir)
    except ConfigError as e:
        print(f"tessera-csi: invalid configuration {e.source}:", file=sys.stderr)
        for p in e.problems:
            print(f"  {p}", file=sys.stderr)
        return 2
    try:
        srv = build(config, args.endpoint, _node_name(args.node_id), args.mode)
    except (EndpointError, TesseraError) as e:
        # a backend refusing to serve here (a second iSCSI controller on one target, ...) says why, without a
        # traceback: the message names what to do
        print(f"tessera-csi: cannot start: {e}", file=sys.stderr)
        return 2
    if args.metrics_address:
        _serve_http(args, config, srv.backends)
    backends = ", ".join(f"{n}({c.type})" for n, c in config.backends.items())
    print(f"tessera-csi: serving CSI on {args.endpoint} (mode {args.mode}, driver {config.driver_name}, "
          f"backends {backends})", flush=True)
    serve_forever(srv)
    return 0


def _serve_http(args: argparse.Namespace, config, backends) -> None:
    """/metrics (with the backends' usage gauges), /healthz and /readyz on --metrics-address."""
    from . import health, http_endpoints, usage_metrics
    controller, node = args.mode in ("all", "controller"), args.mode in ("all", "node")
    records = os.path.join(config.state_dir, "node", "staged") if node else None
    usage_metrics.register(usage_metrics.UsageCollector(backends, records, args.usage_interval, controller)).start()
    http_endpoints.serve(args.metrics_address, lambda: health.probe(backends, controller, node))


def _inspect(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config
    from .registry import Backends
    try:
        config = load_config(args.config, args.state_dir)
    except ConfigError as e:
        for p in e.problems:
            print(f"{e.source}: {p}", file=sys.stderr)
        return 2
    backends = Backends(config, _node_name(args.node_id))
    try:
        return args.inspect(config, backends, args)
    finally:
        backends.close()


def _validate(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config
    try:
        config = load_config(args.file)
    except ConfigError as e:
        for p in e.problems:
            print(f"{e.source}: {p}", file=sys.stderr)
        return 1
    print(f"{args.file}: OK ({len(config.backends)} backend(s): "
          f"{', '.join(f'{n}({c.type})' for n, c in config.backends.items())}; default {config.default_backend})")
    return 0


def _completion(args: argparse.Namespace) -> int:
    from .completion import script
    print(script(parser(), args.shell), end="")
    return 0


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 1.0 <= value <= 86400.0:
        raise argparse.ArgumentTypeError(f"{text} seconds: between 1 and 86400")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tessera-csi", description="Tessera CSI storage driver")
    p.add_argument("--version", action="version", version=f"tessera-csi {constants.VENDOR_VERSION}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve the CSI plugin on a unix socket")
    s.add_argument("--endpoint", default=os.environ.get("CSI_ENDPOINT", f"unix://{constants.NODE_SOCKET_PATH}"),
                   help="unix:///path/to/csi.sock")
    s.add_argument("--config", default=None, help=f"YAML config (default {constants.DEFAULT_CONFIG_PATH} if present, "
                                                   "else the embedded file backend)")
    s.add_argument("--node-id", default=None, help="node name (default $NODE_NAME or the hostname)")
    s.add_argument("--state-dir", default=None, help=f"state directory (default {constants.DEFAULT_STATE_DIR})")
    s.add_argument("--mode", default="all", choices=["all", "controller", "node"])
    s.add_argument("--metrics-address", default=None,
                   help="HOST:PORT for Prometheus /metrics and the /healthz and /readyz probes")
    s.add_argument("--usage-interval", type=_positive_seconds, default=30.0,
                   help="seconds between refreshes of the backends' capacity and count gauges")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="text: a prefixed line per record; json: one JSON object per line, C libraries' stderr "
                        "lines included")
    s.set_defaults(func=_serve)
    c = sub.add_parser("config", help="configuration tools")
    csub = c.add_subparsers(dest="config_command", required=True)
    v = csub.add_parser("validate", help="check a config file and list every problem")
    v.add_argument("file")
    v.set_defaults(func=_validate)
    from .inspect_cli import add_parser as add_inspect
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=None, help="the plugin's YAML config (default as for serve)")
    common.add_argument("--state-dir", default=None, help="state directory (node records)")
    common.add_argument("--node-id", default=None, help="node name (default $NODE_NAME or the hostname)")
    add_inspect(sub, common)
    comp = sub.add_parser("completion", help="print a shell completion script (eval \"$(tessera-csi completion bash)\")")
    comp.add_argument("shell", choices=["bash", "zsh"])
    comp.set_defaults(func=_completion)
    ver = sub.add_parser("version", help="print the version")
    ver.set_defaults(func=lambda a: print(f"tessera-csi {constants.VENDOR_VERSION}") or 0)
    return p


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas before any thread starts. Why: glibc gives each thread that meets a locked arena a
    new one (up to 8 per core), and gRPC's worker threads plus librados' threads each keep a mostly empty arena that
    is never returned (bench/bench_rbd.py: 117 MiB after 3 x 500 concurrent creates without the cap, 109-110 MiB with
    it). Same effect as MALLOC_ARENA_MAX=2 in the environment, without a re-exec; that variable (the container image
    sets it) wins: glibc has read it already."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return
    try:
        import ctypes
        ctypes.CDLL(None).mallopt(-8, arenas)  # M_ARENA_MAX; not glibc (musl): no such symbol, nothing to do
    except (OSError, AttributeError):
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    _limit_malloc_arenas()
    args = parser().parse_args(argv)
    if getattr(args, "inspect", None) is not None:
        return _inspect(args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
