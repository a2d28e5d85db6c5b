"""`python -m flex.provisioner`: run the Flex dynamic provisioner (in-cluster, or with --kubeconfig)."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from typing import Optional, Sequence

from . import decide


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="tessera-flex-provisioner", description=__doc__)
    p.add_argument("--config", default=os.environ.get("TESSERA_CONFIG"), help="Tessera YAML config")
    p.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: in-cluster service account)")
    p.add_argument("--provisioner-name", default=decide.PROVISIONER_NAME)
    p.add_argument("--node-name", default=os.environ.get("NODE_NAME") or socket.gethostname(),
                   help="this node (for node-local backends it provisions only claims scheduled here and deletes "
                        "only volumes that live here)")
    p.add_argument("--identity", default=os.environ.get("POD_NAME") or socket.gethostname())
    p.add_argument("--lease-namespace", default=os.environ.get("POD_NAMESPACE", "kube-system"))
    p.add_argument("--lease-name", default="tessera-flex-provisioner")
    p.add_argument("--lease-duration", type=int, default=15)
    p.add_argument("--resync", type=float, default=30.0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    from kubernetes import client, config as kconfig

    from csi.config import ConfigError, load_config
    from csi.controllerops import ControllerOps
    from csi.registry import Backends

    from .controller import Provisioner
    from .kube import Kube
    from .leader import LeaderElector
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"tessera-flex-provisioner: invalid configuration {e.source}:", file=sys.stderr)
        for prob in e.problems:
            print(f"  {prob}", file=sys.stderr)
        return 2
    if args.kubeconfig:
        kconfig.load_kube_config(args.kubeconfig)
    else:
        kconfig.load_incluster_config()
    kube = Kube(client.ApiClient())
    elector = LeaderElector(kube, args.lease_namespace, args.lease_name, args.identity, args.lease_duration)
    prov = Provisioner(kube, ControllerOps(Backends(cfg, args.node_name)), elector, args.node_name,
                       args.provisioner_name)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(1))
    prov.run(lambda: bool(stopping), resync=args.resync)
    return 0


if __name__ == "__main__":
    sys.exit(main())
