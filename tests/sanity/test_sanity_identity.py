"""Identity service (spec §Identity Service RPC)."""
from __future__ import annotations

import re

from csi._pb import csi_pb2 as pb
from tests.sanity.harness import PLUGIN

# spec: name MUST follow domain name notation, <= 63 characters, begin and end with an alphanumeric character
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", re.I)


def test_get_plugin_info(plugin):
    resp = plugin.client.identity.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=30)
    assert resp.name, "name is REQUIRED"
    assert len(resp.name) <= 63 and _NAME.match(resp.name), f"name {resp.name!r} is not in domain-name notation"
    assert resp.vendor_version, "vendor_version is REQUIRED"
    again = plugin.client.identity.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=30)
    assert again == resp, "GetPluginInfo must answer the same every time"


def test_get_plugin_capabilities(plugin):
    resp = plugin.client.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest(), timeout=30)
    kinds = [c.WhichOneof("type") for c in resp.capabilities]
    assert all(k in ("service", "volume_expansion") for k in kinds), kinds
    for c in resp.capabilities:
        if c.WhichOneof("type") == "service":
            assert c.service.type != PLUGIN.Value("UNKNOWN")
    assert plugin.client.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest(), timeout=30) == resp


def test_probe(plugin):
    resp = plugin.client.identity.Probe(pb.ProbeRequest(), timeout=30)
    # ready is OPTIONAL; when present on a plugin that has finished starting it must be true
    if resp.HasField("ready"):
        assert resp.ready.value is True
    assert plugin.client.identity.Probe(pb.ProbeRequest(), timeout=30) == resp
