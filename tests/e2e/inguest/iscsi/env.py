"""Fixtures for the in-guest iSCSI tests: a loop-backed thin VG, a real `tessera-csi serve --mode all` with the
iscsi backend on LIO, and the guest's open-iscsi initiator (iscsid started by the guest harness). The node ID the
tests use is the one NodeGetInfo returns, so the initiator IQN travels to ControllerPublish as it does in a cluster."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Iterator

import pytest

from csi._pb import csi_pb2 as pb
from tests.conftest import require
from tests.e2e.lio import lio_available, write_config
from tests.e2e.vg import LoopVg, device_mapper_available, make_loop_vg
from tests.sanity.harness import Client, Ledger, ServerProcess

NODE = "e2e-node"


@dataclass
class IscsiEnv:
    vg: LoopVg
    workdir: str
    server: ServerProcess
    client: Client
    node_id: str
    ledger: Ledger = None  # type: ignore[assignment]


def sessions() -> list[str]:
    """Target IQNs of the open-iscsi sessions on this machine."""
    out = subprocess.run(["iscsiadm", "-m", "session"], capture_output=True, text=True).stdout
    return sorted(line.split()[3] for line in out.splitlines() if line.startswith("tcp:"))


@pytest.fixture(scope="module")
def iscsi_server() -> Iterator[IscsiEnv]:
    require(lio_available() and device_mapper_available(),
            "LIO target + iscsi_tcp + device-mapper (these tests run inside the e2e guest: tests/e2e)")
    vg = make_loop_vg(2 << 30, thin_pool_size=1536 << 20, prefix="e2eiscsi")
    workdir = tempfile.mkdtemp(prefix="iscsi-", dir=os.environ.get("TESSERA_SCRATCH") or None)
    config = write_config(os.path.join(workdir, "config.yaml"), vg=vg.name, thin_pool=vg.thin_pool)
    server = ServerProcess(os.path.join(workdir, "srv"), config, node_id=NODE, extra_args=["--mode", "all"]).start()
    client = Client(server.endpoint)
    node_id = client.node.NodeGetInfo(pb.NodeGetInfoRequest()).node_id
    env = IscsiEnv(vg, workdir, server, client, node_id)
    try:
        yield env
    finally:
        client.close()
        rc = server.stop()
        log = server.log_tail(80)
        vg.destroy()
        shutil.rmtree(workdir, ignore_errors=True)
        assert rc == 0, f"server exited {rc}:\n{log}"


@pytest.fixture
def iscsi(iscsi_server: IscsiEnv) -> Iterator[IscsiEnv]:
    iscsi_server.ledger = Ledger(iscsi_server.client, iscsi_server.node_id, use_controller_publish=True)
    yield iscsi_server
    problems = iscsi_server.ledger.cleanup()
    assert iscsi_server.server.alive(), f"server died:\n{iscsi_server.server.log_tail()}"
    assert not problems, f"cleanup failed: {problems}\n{iscsi_server.server.log_tail()}"
    assert sessions() == [], "sessions left behind after cleanup"
