"""Fixtures for the in-guest LVM data tests: a loop-backed VG (thick, and thin with a pool), a real
`tessera-csi serve --mode all` configured for it, and a per-test ledger that undoes what the test made."""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Iterator

import pytest
import yaml

from tests.conftest import require
from tests.e2e.vg import LoopVg, device_mapper_available, make_loop_vg
from tests.sanity.harness import Client, Ledger, ServerProcess

NODE = "e2e-node"


@dataclass
class LvmEnv:
    thin: bool
    vg: LoopVg
    workdir: str
    config: str
    server: ServerProcess
    client: Client
    ledger: Ledger = None  # type: ignore[assignment]
    node: str = NODE

    def restart(self) -> None:
        """Stop and start the server (same state dir): what a controller crash and restart looks like."""
        self.client.close()
        assert self.server.stop() == 0, self.server.log_tail()
        self.server = ServerProcess(os.path.join(self.workdir, "srv"), self.config, node_id=NODE,
                                    extra_args=["--mode", "all"]).start()
        self.client = Client(self.server.endpoint)
        self.ledger.client = self.client


@pytest.fixture(scope="module", params=["thick", "thin"])
def lvm_server(request) -> Iterator[LvmEnv]:
    require(device_mapper_available(), "device-mapper (these tests run inside the e2e guest: tests/e2e)")
    thin = request.param == "thin"
    vg = make_loop_vg(4 << 30, thin_pool_size=(2 << 30) if thin else None, prefix=f"e2e{request.param}")
    workdir = tempfile.mkdtemp(prefix=f"lvm-{request.param}-", dir=os.environ.get("TESSERA_SCRATCH") or None)
    opts = {"type": "lvm", "volumeGroup": vg.name}
    if thin:
        opts["thinPool"] = vg.thin_pool
    config = os.path.join(workdir, "config.yaml")
    with open(config, "w") as f:
        yaml.safe_dump({"backends": {"lvm": opts}}, f)
    server = ServerProcess(os.path.join(workdir, "srv"), config, node_id=NODE, extra_args=["--mode", "all"]).start()
    env = LvmEnv(thin=thin, vg=vg, workdir=workdir, config=config, server=server, client=Client(server.endpoint))
    try:
        yield env
    finally:
        env.client.close()
        rc = env.server.stop()
        log = env.server.log_tail(80)
        vg.destroy()
        shutil.rmtree(workdir, ignore_errors=True)
        assert rc == 0, f"server exited {rc}:\n{log}"


@pytest.fixture
def lvm(lvm_server: LvmEnv) -> Iterator[LvmEnv]:
    lvm_server.ledger = Ledger(lvm_server.client, NODE, use_controller_publish=False)
    yield lvm_server
    problems = lvm_server.ledger.cleanup()
    assert lvm_server.server.alive(), f"server died:\n{lvm_server.server.log_tail()}"
    assert not problems, f"cleanup failed: {problems}\n{lvm_server.server.log_tail()}"
