"""Sanity profiles: one named way to get a plugin under test (config file, StorageClass parameters, volume size,
fixtures it depends on). The sanity tests parametrize over the selected profiles in one pytest session.

Registering a profile (another backend's helper): create `tests/sanity/profile_<name>.py` (every such module is
imported by the sanity conftest) containing

    from tests.sanity.profiles import Profile, ProfileSetup, register

    def _setup(request, workdir):
        cluster = request.getfixturevalue("ceph_cluster")     # any session-scoped fixture
        path = os.path.join(workdir, "config.yaml")
        ...write a tessera config using cluster...
        return ProfileSetup(config=path, params={"backend": "fast"})

    register(Profile("rbd", setup=_setup, volume_size=64 << 20, marks=(pytest.mark.ceph,)))

and run `pytest tests/sanity --sanity-profile rbd` (repeatable; `--sanity-profile all` selects every registered one).
A plain `pytest tests/sanity` runs the profiles registered with `default=True` (file and rbd, both run on the host).
A module outside tests/sanity can be loaded with `--sanity-profile-module dotted.name`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

MIB = 1 << 20


@dataclass
class ProfileSetup:
    """What a profile's setup produced: a config file for `tessera-csi serve` (None = embedded default), extra
    StorageClass parameters, an existing endpoint to use instead of starting a server, and a teardown."""
    config: Optional[str] = None
    params: dict[str, str] = field(default_factory=dict)
    endpoint: Optional[str] = None
    teardown: Optional[Callable[[], None]] = None


@dataclass
class Profile:
    name: str
    # setup(request, workdir) -> ProfileSetup; request is the session FixtureRequest (use getfixturevalue for
    # fixture dependencies), workdir a fresh directory for this profile. None: embedded default, no config.
    setup: Optional[Callable[[Any, str], ProfileSetup]] = None
    params: dict[str, str] = field(default_factory=dict)
    volume_size: int = 64 * MIB
    fs_types: tuple[str, ...] = ("ext4", "xfs")
    block: bool = True  # the plugin serves raw block volumes with this profile
    marks: tuple = ()
    node_id: str = "sanity-node"
    description: str = ""
    # run by a plain `pytest tests/sanity` (and so by `make test` on the host); guest-only profiles are chosen
    # explicitly by the e2e suites instead
    default: bool = False
    # ControllerModifyVolume: two sets of mutable parameters the profile's backend honours (the second changes every
    # key of the first), as csi-sanity's TestVolumeMutableParameters; empty: the profile declares none, and the
    # suite checks the plugin then refuses ModifyVolume
    mutable_parameters: tuple[dict[str, str], ...] = ()


REGISTRY: dict[str, Profile] = {}


def register(profile: Profile) -> Profile:
    if profile.name in REGISTRY and REGISTRY[profile.name] is not profile:
        raise ValueError(f"sanity profile {profile.name!r} is registered twice")
    REGISTRY[profile.name] = profile
    return profile


# node-enforced I/O limits (cgroup io.max) of the node-local backends: file and lvm
IO_MAX_MUTABLE = ({"io_max_wiops": "100", "io_max_rbps": "10485760"},
                  {"io_max_wiops": "250", "io_max_rbps": "0"})

register(Profile("file", description="embedded default: the file backend under the server's state directory",
                 default=True, mutable_parameters=IO_MAX_MUTABLE))
