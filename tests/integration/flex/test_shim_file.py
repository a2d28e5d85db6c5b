"""The FlexVolume shim driven exactly as kubelet drives it (argv + JSON, stdout+stderr parsed together, exit code),
on the host with the real file backend: real loop devices, real mkfs, real mounts.

The PVC-to-mount walk: the provisioner's PV (decide.build_pv) gives the options kubelet passes; then the calls
kubelet makes for attach: false (mount/unmount) and for attach: true (attach, waitforattach, mountdevice, mount,
unmount, unmountdevice, detach); data written survives a re-mount; the volume is deleted at the end."""
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
