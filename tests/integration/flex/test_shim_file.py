"""The FlexVolume shim driven exactly as kubelet drives it (argv + JSON, stdout+stderr parsed together, exit code),
on the host with the real file backend: real loop devices, real mkfs, real mounts.

The PVC-to-mount walk: the provisioner's PV (decide.build_pv) gives the options kubelet passes; then the calls
kubelet makes for attach: false (mount/unmount) and for attach: true (attach, waitforattach, mountdevice, mount,
unmount, unmountdevice, detach); data written survives a re-mount; the volume is deleted at the end.

At the end, Flex `attach`/`isattached`/`detach` for the iscsi backend against a real tgtd (started here, as in
tests/integration/iscsi), checked from outside with libiscsi's tools: attach for a node grants exactly that node's
IQN (derived from initiatorNameTemplate), detach takes it away, a node whose IQN differs refuses before any login."""
from __future__ import annotations

import base64
import json
import os
import subprocess

import pytest

from tests.integration.flex.kubelet import options


def _provision(node, name: str, size: int = 64 << 20, fs_type: str = "ext4"):
    """What the Flex provisioner does for a claim: CreateVolume, then the PV whose flexVolume.options kubelet sends."""
    from backends.base import CapabilitySpec
    from flex.provisioner import decide
    ops = node.controller_ops()
    vid, vol = ops.create_volume(name, size, 0, [CapabilitySpec("mount", "SINGLE_NODE_WRITER", fs_type)], {}, {})
    pvc = {"metadata": {"name": "claim", "namespace": "apps", "uid": name}, "spec": {"accessModes": ["ReadWriteOnce"]}}
    sc = {"metadata": {"name": "flex"}, "provisioner": decide.PROVISIONER_NAME}
    req = decide.VolumeRequest(name, size, 0, ["SINGLE_NODE_WRITER"], fs_type, {}, [])
    pv = decide.build_pv(pvc, sc, req, vid, vol.capacity_bytes, vol.context, vol.topology)
    return ops, vid, pv


def _kubelet_options(pv: dict, **kw) -> str:
    flex = pv["spec"]["flexVolume"]
    return options(flex["options"]["volumeID"], pv["metadata"]["name"], fs_type=flex["fsType"],
                   extra={k: v for k, v in flex["options"].items() if k != "volumeID"}, **kw)


def _loops_for(path_prefix: str) -> list[str]:
    out = subprocess.run(["losetup", "-a", "-n", "-O", "NAME,BACK-FILE", "--raw"], capture_output=True, text=True)
    return [line.split()[0] for line in out.stdout.splitlines() if path_prefix in line]


def _fstype(path: str) -> str:
    return subprocess.run(["findmnt", "-n", "-o", "FSTYPE", path], capture_output=True, text=True).stdout.strip()


def test_init_answers_capabilities_only_json(flexnode):
    a = flexnode.kubelet.call("init")
    assert a.rc == 0 and a.stderr == ""
    assert a.reply == {"status": "Success", "capabilities": {"attach": False, "selinuxRelabel": True,
                                                             "fsGroup": True, "requiresFSResize": True,
                                                             "supportsMetrics": True}}
    assert a.stdout.count("\n") == 1


def test_attach_capability_follows_the_config(flexnode, tmp_path):
    import yaml
    with open(flexnode.config) as f:
        cfg = yaml.safe_load(f)
    cfg["backends"]["san"] = {"type": "iscsi"}  # only the type matters to init (it does not validate, for speed)
    cfg["defaultBackend"] = "local"
    with open(flexnode.config, "w") as f:
        yaml.safe_dump(cfg, f)
    assert flexnode.kubelet.ok("init")["capabilities"]["attach"] is True


@pytest.mark.parametrize("command,args", [("getvolumename", ['{"volumeID":"local:x"}']), ("frobnicate", [])])
def test_unsupported_calls(flexnode, command, args):
    a = flexnode.kubelet.call(command, *args)
    assert a.reply["status"] == "Not supported" and a.rc == 1 and a.stderr == ""


def test_bad_calls_fail_with_actionable_messages(flexnode):
    k = flexnode.kubelet
    d = flexnode.pod_dir("p0", "pv0")
    a = k.call("mount", d, '{"kubernetes.io/fsType":"ext4"}')
    assert a.rc == 1 and "volumeID" in a.reply["message"] and "options" in a.reply["message"]
    a = k.call("mount", d)
    assert a.rc == 1 and "mount <mount dir> <json options>" in a.reply["message"]
    a = k.call("mount", d, '{"volumeID":"local:vol-00000000-0000-5000-8000-000000000000"}')
    assert a.rc == 1 and "does not exist" in a.reply["message"]
    a = k.call("mount", d, '{"volumeID":"nosuch:vol-1"}')
    assert a.rc == 1 and "no backend named 'nosuch'" in a.reply["message"]
    a = k.call("mount", d, '{"volumeID":"local:v","kubernetes.io/secret/key":"%%%"}')
    assert a.rc == 1 and "base64" in a.reply["message"]
    # nothing was mounted and no record was left for the failed calls
    assert flexnode.mounts_under() == []
    assert os.listdir(os.path.join(flexnode.state_dir, "flex", "mounts")) == []
    env_bad = dict(k.env, TESSERA_CONFIG=os.path.join(flexnode.root, "missing.yaml"))
    p = subprocess.run([k.exe, "mount", d, '{"volumeID":"local:v"}'], capture_output=True, text=True, env=env_bad)
    reply = json.loads(p.stdout)
    assert p.returncode == 1 and p.stderr == "" and "missing.yaml" in reply["message"] and "does not exist" in reply["message"]


def test_unmount_paths_without_records(flexnode):
    d = flexnode.pod_dir("p0", "pv0")
    a = flexnode.kubelet.call("unmount", d)
    assert a.ok and "nothing to unmount" in a.reply["message"]
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", d], check=True)
    try:
        a = flexnode.kubelet.call("unmount", d)
        assert a.rc == 1 and "no Tessera mount record" in a.reply["message"] and f"umount {d}" in a.reply["message"]
    finally:
        subprocess.run(["umount", d], check=True)


def test_pvc_to_mount_walk_attach_false(flexnode):
    """kubelet with attach: false calls only mount/unmount; two pods, a re-mount, data kept, clean teardown."""
    k = flexnode.kubelet
    ops, vid, pv = _provision(flexnode, "walk1")
    name = pv["metadata"]["name"]
    secret = base64.b64encode(b"s3cret").decode()
    opts = _kubelet_options(pv, **{"pod_name": "web-0", "pod_namespace": "apps", "pod_uid": "p1",
                                   "serviceAccount_name": "default"},)
    opts_js = json.loads(opts)
    opts_js["kubernetes.io/mounterArgs.FsGroup"] = "2000"
    opts_js["kubernetes.io/secret/token"] = secret
    opts = json.dumps(opts_js)
    d1 = flexnode.pod_dir("p1", name)
    a = k.call("mount", d1, opts)
    assert a.ok and a.stderr == "", a.reply
    assert _fstype(d1) == "ext4"
    with open(os.path.join(d1, "hello.txt"), "w") as f:
        f.write("written through flex\n")
    # the secret value never reaches the log
    with open(flexnode.log) as f:
        assert "s3cret" not in f.read() and secret not in open(flexnode.log).read()
    # a second pod on the same node shares the staged volume
    d2 = flexnode.pod_dir("p2", name)
    assert k.call("mount", d2, opts).ok
    with open(os.path.join(d2, "hello.txt")) as f:
        assert f.read() == "written through flex\n"
    assert len(_loops_for(flexnode.root)) == 1
    assert k.call("unmount", d1).ok
    assert os.path.exists(os.path.join(d2, "hello.txt")) and len(_loops_for(flexnode.root)) == 1
    assert k.call("unmount", d2).ok
    assert flexnode.mounts_under() == [] and _loops_for(flexnode.root) == []
    assert os.listdir(os.path.join(flexnode.state_dir, "flex", "mounts")) == []
    # a later pod gets the data back
    d3 = flexnode.pod_dir("p3", name)
    assert k.call("mount", d3, opts).ok
    with open(os.path.join(d3, "hello.txt")) as f:
        assert f.read() == "written through flex\n"
    assert k.call("unmount", d3).ok
    assert k.call("unmount", d3).ok  # kubelet retries: still Success
    assert flexnode.mounts_under() == [] and _loops_for(flexnode.root) == []
    ops.delete_volume(vid, {})
    a = k.call("mount", flexnode.pod_dir("p4", name), opts)
    assert a.rc == 1 and "does not exist" in a.reply["message"]


def test_pvc_to_mount_walk_attach_true(flexnode):
    """The calls kubelet and the attach/detach controller make for attach: true."""
    k = flexnode.kubelet
    ops, vid, pv = _provision(flexnode, "walk2", size=320 << 20, fs_type="xfs")  # xfs needs >= 300 MiB
    name = pv["metadata"]["name"]
    opts = _kubelet_options(pv)
    a = k.call("attach", opts, "flex-node")
    assert a.ok
    device = a.reply["device"]
    assert k.ok("isattached", opts, "flex-node")["attached"] is True
    assert k.ok("waitforattach", device, opts)["device"] == device
    g = flexnode.global_dir(name)
    assert k.call("mountdevice", g, device, opts).ok
    assert _fstype(g) == "xfs"
    d = flexnode.pod_dir("p1", name)
    assert k.call("mount", d, opts).ok
    with open(os.path.join(d, "data.bin"), "wb") as f:
        f.write(os.urandom(1 << 20))
    digest = subprocess.run(["sha256sum", os.path.join(d, "data.bin")], capture_output=True, text=True).stdout.split()[0]
    assert k.call("unmount", d).ok
    assert _fstype(g) == "xfs"  # unmount leaves the device mount to unmountdevice
    assert k.call("unmountdevice", g).ok
    assert flexnode.mounts_under() == [] and _loops_for(flexnode.root) == []
    # re-mount and read back
    assert k.call("mountdevice", g, device, opts).ok
    d2 = flexnode.pod_dir("p2", name)
    assert k.call("mount", d2, opts).ok
    out = subprocess.run(["sha256sum", os.path.join(d2, "data.bin")], capture_output=True, text=True).stdout.split()[0]
    assert out == digest
    # grow: expandvolume (controller side) then expandfs (node side, online xfs growth)
    before = os.statvfs(d2)
    new_size = 400 << 20
    r = k.ok("expandvolume", opts, g, str(new_size), str(320 << 20))
    assert r["volumeNewSize"] >= new_size
    r = k.ok("expandfs", opts, "", g, str(new_size), str(320 << 20))
    after = os.statvfs(d2)
    assert after.f_blocks * after.f_frsize > before.f_blocks * before.f_frsize + (64 << 20)
    assert k.call("unmount", d2).ok
    assert k.call("unmountdevice", g).ok
    assert k.call("detach", name, "flex-node").ok
    assert flexnode.mounts_under() == [] and _loops_for(flexnode.root) == []
    ops.delete_volume(vid, {})


def test_readonly_mount(flexnode):
    k = flexnode.kubelet
    ops, vid, pv = _provision(flexnode, "ro1")
    d = flexnode.pod_dir("p1", pv["metadata"]["name"])
    assert k.call("mount", d, _kubelet_options(pv)).ok
    assert k.call("unmount", d).ok
    d2 = flexnode.pod_dir("p2", pv["metadata"]["name"])
    assert k.call("mount", d2, _kubelet_options(pv, readonly=True)).ok
    assert json.loads(_kubelet_options(pv, readonly=True))["kubernetes.io/readwrite"] == "ro"
    with pytest.raises(OSError):
        open(os.path.join(d2, "x"), "w")
    assert k.call("unmount", d2).ok
    ops.delete_volume(vid, {})


def test_access_mode_from_the_pv_reaches_the_node(flexnode):
    """A ReadWriteOncePod claim: the provisioner's PV says SINGLE_NODE_SINGLE_WRITER, so the shim allows one pod."""
    from backends.base import CapabilitySpec
    from flex.provisioner import decide
    k = flexnode.kubelet
    ops = flexnode.controller_ops()
    claim = {"metadata": {"name": "claim", "namespace": "apps", "uid": "rwop1"},
             "spec": {"accessModes": ["ReadWriteOncePod"], "resources": {"requests": {"storage": "64Mi"}}}}
    sc = {"metadata": {"name": "flex"}, "provisioner": decide.PROVISIONER_NAME}
    req = decide.volume_request(claim, sc, "flex-node")
    caps = [CapabilitySpec("mount", m, req.fs_type) for m in req.access_modes]
    vid, vol = ops.create_volume(req.name, req.required_bytes, 0, caps, {}, {})
    pv = decide.build_pv(claim, sc, req, vid, vol.capacity_bytes, vol.context, vol.topology)
    assert json.loads(_kubelet_options(pv))["accessMode"] == "SINGLE_NODE_SINGLE_WRITER"
    d1 = flexnode.pod_dir("p1", pv["metadata"]["name"])
    d2 = flexnode.pod_dir("p2", pv["metadata"]["name"])
    assert k.call("mount", d1, _kubelet_options(pv)).ok
    a = k.call("mount", d2, _kubelet_options(pv))
    assert a.rc == 1 and "SINGLE_NODE_SINGLE_WRITER" in a.reply["message"], a.reply
    assert k.call("unmount", d1).ok
    assert k.call("mount", d2, _kubelet_options(pv)).ok
    assert k.call("unmount", d2).ok
    assert flexnode.mounts_under() == [] and _loops_for(flexnode.root) == []
    ops.delete_volume(vid, {})


def test_unmount_after_reboot_uses_the_record(flexnode):
    """A node reboot drops every mount and loop device; the records on disk still let unmount finish cleanly."""
    k = flexnode.kubelet
    ops, vid, pv = _provision(flexnode, "reboot1")
    d = flexnode.pod_dir("p1", pv["metadata"]["name"])
    assert k.call("mount", d, _kubelet_options(pv)).ok
    flexnode.cleanup()  # "reboot": mounts and loop devices gone, state dir kept
    assert flexnode.mounts_under() == []
    assert os.listdir(os.path.join(flexnode.state_dir, "flex", "mounts"))
    assert k.call("unmount", d).ok
    assert os.listdir(os.path.join(flexnode.state_dir, "flex", "mounts")) == []
    assert not os.listdir(os.path.join(flexnode.state_dir, "node", "staged"))
    # and the volume mounts again afterwards
    assert k.call("mount", d, _kubelet_options(pv)).ok
    assert k.call("unmount", d).ok
    ops.delete_volume(vid, {})


def test_full_pvc_to_mount_walk_with_provisioner(flexnode):
    """PVC → provisioner → PV → shim mountdevice/mount → data → re-mount → delete, all real but the API server."""
    from backends.errors import NotFound
    from tests.integration.flex.walk import pvc_to_mount_walk
    ops = flexnode.controller_ops()

    def gone(vid):
        try:
            ops.get_volume(vid)
        except NotFound:
            return True
        return False

    facts = pvc_to_mount_walk(flexnode.kubelet, flexnode.kubelet_dir, ops, "flex-node", {"backend": "local"},
                              size="64Mi", volume_gone=gone)
    assert facts["capabilities"]["attach"] is False
    assert flexnode.mounts_under() == [] and _loops_for(flexnode.root) == []


def test_failed_publish_undoes_the_staging_it_made(flexnode):
    """mount stages first; when the bind mount then fails, the shim must not leave the device attached and mounted."""
    k = flexnode.kubelet
    ops, vid, pv = _provision(flexnode, "fail1")
    parent = os.path.dirname(flexnode.pod_dir("p1", pv["metadata"]["name"]))
    target = os.path.join(parent, "not-a-dir")
    with open(target, "w") as f:
        f.write("x")
    a = k.call("mount", target, _kubelet_options(pv))
    assert a.rc == 1 and "not a directory" in a.reply["message"], a.reply
    assert flexnode.mounts_under() == [] and _loops_for(flexnode.root) == []
    assert os.listdir(os.path.join(flexnode.state_dir, "flex", "mounts")) == []
    assert not os.listdir(os.path.join(flexnode.state_dir, "node", "staged"))
    ops.delete_volume(vid, {})


# ---- iSCSI: Flex attach/detach against a real tgtd ------------------------------------------------------------
# Its own tgtd (module-scoped, own ports): the session fixture of tests/integration/iscsi is not visible here, and
# importing it would start a second session tgtd on the same control port.
TEMPLATE = "iqn.2026-11.dev.tessera.test.node:{node}"


@pytest.fixture(scope="module")
def flex_tgtd():
    from tests.conftest import require
    from tests.integration.iscsi import tgt
    require(os.geteuid() == 0, "root (tgtd)")
    with tgt.running_tgtd(salt=7919) as t:  # its own tgtd, beside the session one tests/integration/iscsi uses
        yield t


class IscsiFlex:
    """A controller host (kube-controller-manager's shim) and a node, sharing one tgtd; `node_config` changes what
    the node side reads (initiatorName), as a node's own config would."""

    def __init__(self, root: str, tgtd, template: str = TEMPLATE) -> None:
        import yaml

        from tests.integration.flex.kubelet import Kubelet
        from tests.integration.iscsi.tgt import PREFIX
        self.root, self.tgtd = root, tgtd
        self.backend_cfg = {"type": "iscsi", "portals": [tgtd.portal], "iqnPrefix": PREFIX, "targetDriver": "tgt",
                            "tgtControlPort": tgtd.control_port,
                            "backingStore": {"file": {"directory": os.path.join(root, "store")}},
                            # one CHAP key for the controller host and the nodes: Flex nodes derive the secret
                            "chapKeyFile": os.path.join(root, "chap.key")}
        with open(self.backend_cfg["chapKeyFile"], "wb") as f:
            f.write(os.urandom(32))
        if template:
            self.backend_cfg["initiatorNameTemplate"] = template
        self.config = os.path.join(root, "config.yaml")
        with open(self.config, "w") as f:
            yaml.safe_dump({"stateDir": os.path.join(root, "state"), "backends": {"san": self.backend_cfg}}, f)
        self.kcm = Kubelet(self.config, os.path.join(root, "shim.log"), node="controller")

    def node(self, name: str, initiator: str):
        import yaml

        from tests.integration.flex.kubelet import Kubelet
        cfg = os.path.join(self.root, f"config-{name}.yaml")
        with open(cfg, "w") as f:
            yaml.safe_dump({"stateDir": os.path.join(self.root, f"state-{name}"),
                            "backends": {"san": dict(self.backend_cfg, initiatorName=initiator)}}, f)
        return Kubelet(cfg, os.path.join(self.root, "shim.log"), node=name)

    def node_secrets(self, name: str, initiator: str, volume_id: str) -> dict:
        """The CHAP credentials the node side derives from its own config (what mountdevice hands NodeStage)."""
        from csi.config import load_config
        from csi.ids import parse_id
        from csi.registry import Backends
        self.node(name, initiator)
        backends = Backends(load_config(os.path.join(self.root, f"config-{name}.yaml")), name)
        try:
            return backends.for_id("san", "x").node_publish_secrets(parse_id(volume_id).local)
        finally:
            backends.close()

    def ops(self):
        from csi.config import load_config
        from csi.controllerops import ControllerOps
        from csi.registry import Backends
        return ControllerOps(Backends(load_config(self.config), "controller"))

    def provision(self, name: str):
        """CreateVolume and the PV the provisioner writes for it (as _provision, on the iscsi backend)."""
        from backends.base import CapabilitySpec
        from flex.provisioner import decide
        ops = self.ops()
        vid, vol = ops.create_volume(name, 64 << 20, 0, [CapabilitySpec("mount", "SINGLE_NODE_WRITER", "ext4")], {},
                                     {})
        pvc = {"metadata": {"name": "claim", "namespace": "apps", "uid": name},
               "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "64Mi"}}}}
        sc = {"metadata": {"name": "flex-iscsi"}, "provisioner": decide.PROVISIONER_NAME}
        req = decide.volume_request(pvc, sc, "")
        pv = decide.build_pv(pvc, sc, req, vid, vol.capacity_bytes, vol.context, vol.topology)
        return ops, vid, pv

    def acls(self, ops, vid: str) -> list[str]:
        backend, _ = ops.get_volume(vid)
        st = backend.driver.state(backend.iqn(vid.partition(":")[2]))
        return sorted(st.acls) if st else []

    def login_ok(self, ops, vid: str, initiator: str, chap) -> bool:
        from tests.integration.iscsi.tgt import iscsi_tool, lun_url
        backend, _ = ops.get_volume(vid)
        url = lun_url(self.tgtd, backend.iqn(vid.partition(":")[2]), backend.lun, chap)
        return iscsi_tool("iscsi-inq", url, initiator).returncode == 0


def _iqn(node: str) -> str:
    return TEMPLATE.format(node=node)


@pytest.mark.iscsi
def test_iscsi_flex_attach_grants_exactly_that_node(flex_tgtd, tmp_path):
    from csi.ids import parse_node_id
    from flex import protocol as P
    env = IscsiFlex(str(tmp_path), flex_tgtd)
    kcm = env.kcm
    assert kcm.ok("init")["capabilities"]["attach"] is True
    ops, vid, pv = env.provision("pvc-flex-iscsi-1")
    name = pv["metadata"]["name"]
    opts = _kubelet_options(pv)
    try:
        assert env.acls(ops, vid) == []
        a = kcm.call("attach", opts, "node-1")
        assert a.ok, a.reply
        pc, granted = P.decode_attach(a.reply["device"])
        assert parse_node_id(granted).attributes == {"iqn": _iqn("node-1")}
        # the answer lands in the Node object's status: no CHAP secret in it; the node derives the secret itself
        assert set(pc) == {"lun"}
        node_pc = env.node_secrets("node-1", _iqn("node-1"), vid)
        chap = (node_pc["chapUser"], node_pc["chapPassword"])
        assert chap[1] not in a.reply["device"]
        # the target holds exactly node-1's IQN: node-1 gets in with the CHAP secret, node-2 does not
        assert env.acls(ops, vid) == [_iqn("node-1")]
        assert env.login_ok(ops, vid, _iqn("node-1"), chap)
        assert not env.login_ok(ops, vid, _iqn("node-2"), chap)
        assert kcm.ok("isattached", opts, "node-1")["attached"] is True
        assert kcm.ok("isattached", opts, "node-2")["attached"] is False
        assert kcm.call("attach", opts, "node-1").reply["device"] == a.reply["device"]  # retried: same answer
        assert env.acls(ops, vid) == [_iqn("node-1")]
        # the CHAP secret never reaches the shim's log
        with open(os.path.join(str(tmp_path), "shim.log")) as f:
            assert chap[1] not in f.read()
        # node-1 (IQN per the template) accepts the device; waitforattach passes it on unchanged
        node1 = env.node("node-1", _iqn("node-1"))
        assert node1.ok("waitforattach", a.reply["device"], opts)["device"] == a.reply["device"]
        # detach removes exactly that grant
        assert kcm.call("detach", name, "node-2").ok  # never attached there: nothing to do
        assert env.acls(ops, vid) == [_iqn("node-1")]
        assert kcm.call("detach", name, "node-1").ok
        assert env.acls(ops, vid) == []
        assert not env.login_ok(ops, vid, _iqn("node-1"), chap)
        assert kcm.ok("isattached", opts, "node-1")["attached"] is False
        assert kcm.call("detach", name, "node-1").ok  # kubelet retries: still Success
    finally:
        ops.delete_volume(vid, {})


@pytest.mark.iscsi
def test_iscsi_flex_node_with_another_iqn_refuses_before_login(flex_tgtd, tmp_path):
    env = IscsiFlex(str(tmp_path), flex_tgtd)
    ops, vid, pv = env.provision("pvc-flex-iscsi-2")
    opts = _kubelet_options(pv)
    try:
        device = env.kcm.ok("attach", opts, "node-3")["device"]
        node = env.node("node-3", "iqn.1993-08.org.debian:01:0123456789ab")  # the distribution's random IQN
        for call in (("waitforattach", device, opts),
                     ("mountdevice", os.path.join(str(tmp_path), "global"), device, opts)):
            a = node.call(*call)
            assert a.rc == 1, a.reply
            msg = a.reply["message"]
            assert f"InitiatorName={_iqn('node-3')}" in msg and "iqn.1993-08.org.debian:01:0123456789ab" in msg, msg
        assert env.kcm.call("detach", pv["metadata"]["name"], "node-3").ok
        assert env.acls(ops, vid) == []
    finally:
        ops.delete_volume(vid, {})


@pytest.mark.iscsi
def test_iscsi_flex_attach_without_template_says_what_to_set(flex_tgtd, tmp_path):
    env = IscsiFlex(str(tmp_path), flex_tgtd, template="")
    ops, vid, pv = env.provision("pvc-flex-iscsi-3")
    try:
        a = env.kcm.call("attach", _kubelet_options(pv), "node-1")
        assert a.rc == 1 and "initiatorNameTemplate" in a.reply["message"] and "node-1" in a.reply["message"], a.reply
        assert env.acls(ops, vid) == []
        assert env.kcm.ok("isattached", _kubelet_options(pv), "node-1")["attached"] is False
    finally:
        ops.delete_volume(vid, {})
