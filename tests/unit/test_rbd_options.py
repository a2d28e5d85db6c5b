"""RBD backend configuration and parameter checks (no cluster needed)."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from backends.base import Runtime
from backends.errors import InvalidArgument
from backends.rbd import RbdBackend, RbdOptions

pytest.importorskip("rbd", reason="MISSING: python3-rbd")


def backend(**kw) -> RbdBackend:
    opts = dict(monitors=["127.0.0.1:6789"], pool="kube")
    opts.update(kw)
    return RbdBackend("ceph", RbdOptions(**opts), Runtime("tessera.csi.dev", "n", "/tmp/x", "t"))


def test_monitors_or_conf_required():
    with pytest.raises(ValidationError, match="monitors or cephConf"):
        RbdOptions(pool="kube")
    RbdOptions(cephConf="/etc/ceph/ceph.conf", pool="kube")


def test_key_and_keyring_conflict_and_key_not_in_repr():
    with pytest.raises(ValidationError, match="not both"):
        RbdOptions(monitors=["m"], pool="kube", key="AQB=", keyringPath="/k")
    assert "AQBsecret" not in repr(RbdOptions(monitors=["m"], pool="kube", key="AQBsecret"))


def test_unknown_option_is_an_error():
    with pytest.raises(ValidationError):
        RbdOptions(monitors=["m"], pool="kube", monitor=["typo"])


@pytest.mark.parametrize("features, message", [
    (["layering", "fast-diff"], "needs 'object-map'"),
    (["exclusive-lock"], "'layering' is required"),
    (["layering", "journaling"], "unknown image feature"),
])
def test_feature_checks(features, message):
    with pytest.raises(ValidationError, match=message):
        RbdOptions(monitors=["m"], pool="kube", imageFeatures=features)


def test_storageclass_parameters():
    b = backend()
    b.validate_parameters({"pool": "fast", "imageFeatures": "layering,exclusive-lock", "mounter": "fuse",
                           "stripeUnit": "65536", "stripeCount": "4", "dataPool": "ec-data"})
    for bad in ({"poool": "x"}, {"pool": "a/b"}, {"mounter": "iscsi"}, {"stripeCount": "0"},
                {"imageFeatures": "object-map"}):
        with pytest.raises(InvalidArgument):
            b.validate_parameters(bad)


def test_secrets_need_both_fields():
    b = backend()
    assert b._credentials({"userID": "client.csi", "userKey": "K"}) == ("csi", "K")
    assert b._credentials({}) == ("admin", None)
    with pytest.raises(InvalidArgument):
        b._credentials({"userID": "csi"})


def test_local_ids():
    assert RbdBackend._split("kube.tessera-vol-1234", "tessera-vol-") == ("kube", "tessera-vol-1234")
    assert RbdBackend._split("kube.tessera-snap-1", "tessera-vol-") is None
    assert RbdBackend._split("tessera-vol-1", "tessera-vol-") is None


def test_feature_bits_are_librbds():
    """The backend keeps librbd's feature bits as constants (so checking a config does not load librbd); they must
    be the library's own values, or images would be created with other features than asked."""
    import rbd

    from backends.rbd import FEATURE_BITS
    assert FEATURE_BITS == {"layering": rbd.RBD_FEATURE_LAYERING, "exclusive-lock": rbd.RBD_FEATURE_EXCLUSIVE_LOCK,
                            "object-map": rbd.RBD_FEATURE_OBJECT_MAP, "fast-diff": rbd.RBD_FEATURE_FAST_DIFF,
                            "deep-flatten": rbd.RBD_FEATURE_DEEP_FLATTEN}


def test_checking_a_config_does_not_load_librbd():
    """A controller that has served no RBD request holds no librbd in memory (~13 MiB of resident pages)."""
    import subprocess
    import sys
    code = ("import sys; from backends.rbd import RbdOptions, _feature_bits; "
            "RbdOptions(monitors=['m'], pool='kube', imageFeatures=['layering', 'exclusive-lock']); "
            "_feature_bits(['layering']); print('rbd' in sys.modules, 'rados' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
