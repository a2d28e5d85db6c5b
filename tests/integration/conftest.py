"""Fixtures shared by the integration tests that drive a real `tessera-csi serve` over gRPC. A module provides its
own `server` fixture (a tests.sanity.harness.ServerProcess configured for what it tests); these build on it."""
from __future__ import annotations

import uuid

import pytest

from csi._pb import csi_pb2 as pb
from tests.sanity.harness import Client, Ledger


@pytest.fixture(scope="module")
def client(server):
    c = Client(server.endpoint, timeout=300)
    yield c
    c.close()


@pytest.fixture
def ledger(client, server):
    """What one test made, undone at its end; the server must still be alive afterwards."""
    led = Ledger(client, client.node.NodeGetInfo(pb.NodeGetInfoRequest(), timeout=30).node_id, False)
    yield led
    problems = led.cleanup()
    assert server.alive(), f"server died:\n{server.log_tail()}"
    assert not problems, problems


@pytest.fixture
def dirs(tmp_path):
    """Staging dirs and target parents made by the tester, as a CO does."""
    class Dirs:
        def staging(self) -> str:
            p = tmp_path / f"staging-{uuid.uuid4().hex[:8]}"
            p.mkdir()
            return str(p)

        def target(self) -> str:
            p = tmp_path / f"pod-{uuid.uuid4().hex[:8]}"
            p.mkdir()
            return str(p / "target")
    return Dirs()
