"""CSI conformance ("sanity") suite, written from the CSI spec v1.12, runnable against any CSI endpoint.

How to run
    pytest tests/sanity                                   the default profiles: file (embedded default) and rbd
    pytest tests/sanity --csi-endpoint unix:///p/csi.sock use a plugin that is already listening there
    pytest tests/sanity --sanity-config cfg.yaml --sanity-param backend=fast --sanity-volume-size 512Mi
    pytest tests/sanity --sanity-profile file --sanity-profile rbd   (or `all`): one session, every profile

Profiles (tests/sanity/profiles.py): a named recipe for a plugin under test — config file, StorageClass parameters,
volume size, the session fixtures it needs (e.g. a Ceph cluster), pytest marks. Other helpers register theirs in
`tests/sanity/profile_<name>.py` (imported automatically) or any module named with `--sanity-profile-module`. Every
test that uses the `plugin` fixture is parametrized over the selected profiles; the test id carries the profile name.
Without --sanity-profile the single profile is built from the command line: `endpoint` when --csi-endpoint is given,
`custom` when --sanity-config/--sanity-param/--sanity-volume-size are, else every profile registered with
default=True: `file` (the embedded default) and `rbd` (the test Ceph cluster, fuse mounter).
--sanity-param and --sanity-volume-size also apply on top of named profiles.

Per profile and session a server is started (`tessera-csi serve --endpoint unix://<tmp>/csi.sock --node-id
sanity-node --state-dir <tmp>/state [--config FILE]`) and stopped with SIGTERM at the end; the suite fails a test
during which the server died. Staging and target directories are created by the tester under a temporary directory,
as the CSI community's csi-sanity does (staging dir and target parent exist; the plugin creates the target).

Capability gating: a test of an optional feature skips with a reason starting "not applicable:" ONLY when the plugin
does not advertise that capability; tests/conftest.py reports such skips separately and never as passes.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
import re
import sys
import uuid
from dataclasses import dataclass, field
from typing import Optional

import grpc
import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from csi._pb import csi_pb2 as pb  # noqa: E402
from tests.sanity import harness, profiles  # noqa: E402
from tests.sanity.harness import CTRL, NODE, PLUGIN, Client, Ledger, ServerProcess  # noqa: E402

_SIZE_RE = re.compile(r"^(\d+)\s*([KMGT]i?)?B?$", re.I)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise pytest.UsageError(f"--sanity-volume-size {text!r}: expected bytes or e.g. 64Mi, 1Gi")
    return int(m.group(1)) * _UNITS[(m.group(2) or "")[:1].lower()]


def pytest_addoption(parser):
    g = parser.getgroup("sanity", "CSI conformance suite")
    g.addoption("--csi-endpoint", default=None, help="unix:///path of an existing CSI plugin (else one is started)")
    g.addoption("--sanity-config", default=None, help="config file for the started tessera-csi serve")
    g.addoption("--sanity-param", action="append", default=[], metavar="K=V",
                help="StorageClass parameter added to CreateVolume (repeatable)")
    g.addoption("--sanity-volume-size", default=None, help="size of test volumes (default 64Mi; xfs tests use >= 300Mi)")
    g.addoption("--sanity-profile", action="append", default=[], help="registered profile to run (repeatable, or all)")
    g.addoption("--sanity-profile-module", action="append", default=[], help="extra module registering profiles")
    g.addoption("--sanity-rpc-timeout", type=float, default=180.0, help="per-RPC deadline in seconds")


def _load_profile_modules(config) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    for info in pkgutil.iter_modules([here]):
        if info.name.startswith("profile_"):
            importlib.import_module(f"tests.sanity.{info.name}")
    for mod in config.getoption("--sanity-profile-module"):
        importlib.import_module(mod)


def _params_from_cli(config) -> dict[str, str]:
    out = {}
    for kv in config.getoption("--sanity-param"):
        k, sep, v = kv.partition("=")
        if not sep or not k:
            raise pytest.UsageError(f"--sanity-param {kv!r}: expected KEY=VALUE")
        out[k] = v
    return out


def selected_profiles(config) -> list[profiles.Profile]:
    _load_profile_modules(config)
    names = config.getoption("--sanity-profile")
    params = _params_from_cli(config)
    size_opt = config.getoption("--sanity-volume-size")
    endpoint = config.getoption("--csi-endpoint")
    cfg = config.getoption("--sanity-config")
    if names:
        if "all" in names:
            chosen = list(profiles.REGISTRY.values())
        else:
            unknown = [n for n in names if n not in profiles.REGISTRY]
            if unknown:
                raise pytest.UsageError(f"unknown sanity profile(s) {unknown}; registered: {sorted(profiles.REGISTRY)}")
            chosen = [profiles.REGISTRY[n] for n in names]
    elif endpoint:
        chosen = [profiles.Profile("endpoint", setup=lambda req, wd: profiles.ProfileSetup(endpoint=endpoint))]
    elif cfg or params or size_opt:
        chosen = [profiles.Profile("custom", setup=lambda req, wd: profiles.ProfileSetup(config=os.path.abspath(cfg))
                                   if cfg else profiles.ProfileSetup())]
    else:
        chosen = [p for p in profiles.REGISTRY.values() if p.default]
    out = []
    for p in chosen:
        merged = dict(p.params)
        merged.update(params)
        out.append(dataclasses.replace(p, params=merged,
                                       volume_size=parse_size(size_opt) if size_opt else p.volume_size))
    return out


def pytest_generate_tests(metafunc):
    if "sanity_profile" in metafunc.fixturenames:
        chosen = selected_profiles(metafunc.config)
        metafunc.parametrize("sanity_profile", [pytest.param(p, id=p.name, marks=p.marks) for p in chosen],
                             indirect=True, scope="session")


@pytest.fixture(scope="session")
def sanity_profile(request) -> profiles.Profile:
    return request.param


@dataclass
class Plugin:
    """The plugin under test, as one profile presents it."""
    profile: profiles.Profile
    client: Client
    workdir: str
    server: Optional[ServerProcess]
    node_info: pb.NodeGetInfoResponse
    plugin_caps: set[int]
    controller_caps: set[int]
    node_caps: set[int]
    params: dict[str, str] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.profile.volume_size

    def size_for(self, fs_type: str) -> int:
        return max(self.size, 300 * harness.MIB) if fs_type == "xfs" else self.size

    @property
    def node_id(self) -> str:
        return self.node_info.node_id

    def has(self, cap: str) -> bool:
        return CTRL.Value(cap) in self.controller_caps

    def has_node(self, cap: str) -> bool:
        return NODE.Value(cap) in self.node_caps

    def require(self, cap: str) -> None:
        if not self.has(cap):
            pytest.skip(f"not applicable: the plugin does not advertise controller capability {cap}")

    def require_node(self, cap: str) -> None:
        if not self.has_node(cap):
            pytest.skip(f"not applicable: the plugin does not advertise node capability {cap}")

    def require_controller(self) -> None:
        if PLUGIN.Value("CONTROLLER_SERVICE") not in self.plugin_caps:
            pytest.skip("not applicable: the plugin does not advertise CONTROLLER_SERVICE")

    def require_block(self) -> None:
        if not self.profile.block:
            pytest.skip(f"not applicable: profile {self.profile.name} declares no raw block support")

    def require_fs(self, fs_type: str) -> None:
        if fs_type not in self.profile.fs_types:
            pytest.skip(f"not applicable: profile {self.profile.name} does not use fsType {fs_type}")

    def unique(self, what: str = "vol") -> str:
        return f"sanity-{what}-{uuid.uuid4().hex[:12]}"

    def accessibility(self) -> Optional[pb.TopologyRequirement]:
        """Ask for this node's topology when the plugin has accessibility constraints (a CO would)."""
        if PLUGIN.Value("VOLUME_ACCESSIBILITY_CONSTRAINTS") not in self.plugin_caps:
            return None
        segs = dict(self.node_info.accessible_topology.segments)
        if not segs:
            return None
        return pb.TopologyRequirement(requisite=[pb.Topology(segments=segs)], preferred=[pb.Topology(segments=segs)])

    def create_request(self, name: Optional[str] = None, size: Optional[int] = None,
                       cap: Optional[pb.VolumeCapability] = None, **kw) -> pb.CreateVolumeRequest:
        req = pb.CreateVolumeRequest(name=name or self.unique(), parameters=self.params,
                                     volume_capabilities=[cap or harness.mount_cap()],
                                     capacity_range=pb.CapacityRange(required_bytes=size or self.size), **kw)
        topo = self.accessibility()
        if topo is not None and not req.HasField("accessibility_requirements"):
            req.accessibility_requirements.CopyFrom(topo)
        return req

    def new_dir(self, kind: str) -> str:
        path = os.path.join(self.workdir, "mnt", f"{kind}-{uuid.uuid4().hex[:10]}")
        os.makedirs(path)
        return path

    def staging_dir(self) -> str:
        """A staging directory, created by the tester as a CO (and csi-sanity) does."""
        return self.new_dir("staging")

    def target_path(self) -> str:
        """A target path whose parent exists; creating the target is the plugin's job (spec)."""
        return os.path.join(self.new_dir("pod"), "target")


@pytest.fixture(scope="session")
def plugin(sanity_profile: profiles.Profile, request, tmp_path_factory):
    prof = sanity_profile
    workdir = str(tmp_path_factory.mktemp(f"sanity-{prof.name}-", numbered=True))
    setup = prof.setup(request, workdir) if prof.setup else profiles.ProfileSetup()
    params = dict(setup.params)
    params.update(prof.params)
    server = None
    endpoint = setup.endpoint
    try:
        if endpoint is None:
            server = ServerProcess(os.path.join(workdir, "srv"), config=setup.config, node_id=prof.node_id).start()
            endpoint = server.endpoint
        client = Client(endpoint, timeout=request.config.getoption("--sanity-rpc-timeout"))
        try:
            info = client.node.NodeGetInfo(pb.NodeGetInfoRequest(), timeout=client.timeout)
            yield Plugin(prof, client, workdir, server, info, client.plugin_caps(), client.controller_caps(),
                         client.node_caps(), params)
        finally:
            client.close()
    finally:
        if server is not None:
            rc = server.stop()
            if rc not in (0, None):
                print(f"tessera-csi serve exited with {rc}:\n{server.log_tail()}", file=sys.stderr)
        if setup.teardown:
            setup.teardown()


@pytest.fixture
def ledger(plugin: Plugin):
    """Resources made by one test, undone at its end; the server must still be alive afterwards."""
    led = Ledger(plugin.client, plugin.node_id, plugin.has("PUBLISH_UNPUBLISH_VOLUME"))
    yield led
    problems = led.cleanup()
    if plugin.server is not None and not plugin.server.alive():
        pytest.fail(f"the plugin process died during this test (exit {plugin.server.proc.returncode}):\n"
                    f"{plugin.server.log_tail(120)}")
    if problems:
        pytest.fail("cleanup failed: " + "; ".join(problems))


# IDs that name nothing: one in Tessera's own form, one as csi-sanity generates them, one of an unknown backend.
UNKNOWN_VOLUME_IDS = ["local:vol-00000000-0000-0000-0000-000000000000", "fake-volume-id-3f1c2a9b7d",
                      "no-such-backend:vol-1"]
UNKNOWN_SNAPSHOT_IDS = ["local:snap-00000000-0000-0000-0000-000000000000", "fake-snapshot-id-3f1c2a9b7d",
                        "no-such-backend:snap-1"]


@pytest.fixture(params=UNKNOWN_VOLUME_IDS, ids=["own-form", "sanity-form", "other-backend"])
def unknown_vol(request) -> str:
    return request.param


@pytest.fixture(params=UNKNOWN_SNAPSHOT_IDS, ids=["own-form", "sanity-form", "other-backend"])
def unknown_snap(request) -> str:
    return request.param
