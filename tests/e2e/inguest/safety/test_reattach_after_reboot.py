"""A node's stage records outlive a reboot; its devices do not (issue 11, item 3). After a simulated reboot — every
publish unmounted and every device detached behind the plugin's back, a *second* volume attached first so that it
takes the first volume's old device — NodeStage + NodePublish of the first volume must show the first volume's
bytes: the plugin proves its recorded device is still that volume's (`Backend.node_attachment_valid`) and attaches
again when it is not, never binding the device its record names.

Checked from outside the plugin: the data read through the new publish target, and the device numbers.
"""
from __future__ import annotations

import os
import subprocess
import time

import grpc

from csi._pb import csi_pb2 as pb
from backends import lvm_top, node_proof
from tests.e2e.inguest.safety.env import MIB, PORTALS, Node, Pair, pread_direct, pwrite_direct
from tests.sanity.harness import Client, block_cap

SIZE = 16 * MIB
CAP = block_cap()


def _sh(argv: list[str]) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1"})
    assert out.returncode == 0, f"{' '.join(argv)}: {out.stderr.strip()}"
    return out.stdout.strip()


def _stage_publish(p: Pair, vol: pb.Volume, tag: str) -> str:
    staging = p.stage(p.a, vol, CAP, tag)
    return p.publish(p.a, vol, CAP, staging, tag)


def _unmount_all_under(root: str) -> None:
    """What a reboot does to the publish targets: every mount below `root` is gone (deepest first)."""
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4]
            if mp.startswith(root.rstrip("/") + "/"):
                points.append(mp)
    for mp in sorted(points, key=len, reverse=True):
        _sh(["umount", mp])


def _dev_node(rdev: int) -> str:
    """/dev/<name> of a device number, by the kernel's name for it (no udev needed)."""
    return "/dev/" + os.path.basename(os.path.realpath(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"))


def _restart(node: Node) -> None:
    node.client.close()
    rc = node.server.stop()
    assert rc == 0, f"{node.name} exited {rc}:\n{node.server.log_tail(40)}"
    node.server.start()
    node.client = Client(node.server.endpoint)


def _write_patterns(p: Pair) -> tuple[pb.Volume, bytes, str, pb.Volume, bytes, str]:
    a = p.create("ds-reboot-a", SIZE, CAP)
    b = p.create("ds-reboot-b", SIZE, CAP)
    ta, tb = _stage_publish(p, a, "reboot-a"), _stage_publish(p, b, "reboot-b")
    data_a, data_b = os.urandom(MIB), os.urandom(MIB)
    pwrite_direct(ta, data_a, 0)
    pwrite_direct(tb, data_b, 0)
    assert pread_direct(ta, MIB, 0) == data_a and pread_direct(tb, MIB, 0) == data_b
    return a, data_a, ta, b, data_b, tb


def _restage_reads(p: Pair, a: pb.Volume, data_a: bytes, data_b: bytes, b_device: str,
                   pc: "dict | None" = None, context: "dict | None" = None) -> None:
    """Restart node a's plugin; NodeStage + NodePublish of volume A show A's bytes through a device that is not
    the one B now holds."""
    _restart(p.a)
    # a CO that still believes A staged publishes straight away: refused, or A's bytes — never B's device
    try:
        early = p.publish(p.a, a, CAP, p.path("node-a-stage-reboot-a"), "reboot-a-early")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, f"{e.code().name}: {e.details()}"
    else:
        assert pread_direct(early, MIB, 0) != data_b, \
            "NodePublish without a new NodeStage bound volume B's device (A's old device number): the stale " \
            "record was trusted"
    staging = p.stage(p.a, a, CAP, "reboot-a", pc, context)
    target = p.publish(p.a, a, CAP, staging, "reboot-a")
    got = pread_direct(target, MIB, 0)
    assert got != data_b, "NodePublish of volume A bound volume B's device (A's old device number): the stale " \
                          "record was trusted"
    assert got == data_a, "volume A's publish target does not show A's data"
    assert os.stat(target).st_rdev != os.stat(b_device).st_rdev


# ---- RBD (krbd) ----------------------------------------------------------------------------------------------
def test_rbd_reboot_with_device_numbers_swapped_restages_the_right_image(rbd: Pair, ceph_cluster) -> None:
    p = rbd
    a, data_a, ta, b, data_b, tb = _write_patterns(p)
    old_a = os.stat(ta).st_rdev
    devices = [_dev_node(os.stat(t).st_rdev) for t in (ta, tb)]
    # the "reboot": publishes unmounted, every mapping gone, behind the plugin's back
    _unmount_all_under(p.workdir)
    for dev in devices:
        _sh(["rbd", "device", "unmap", dev])
    # the first image mapped after it is B, which takes the lowest free id: A's old rbdN
    pool, image_b = b.volume_context["pool"], b.volume_context["image"]
    b_dev = _sh(["rbd", "--conf", ceph_cluster.conf, "--keyring", ceph_cluster.admin_keyring, "device", "map",
                 "--pool", pool, "--image", image_b])
    p.undo(f"unmap {b_dev} (B, mapped by the test)", lambda: _sh(["rbd", "device", "unmap", b_dev]))
    assert os.stat(b_dev).st_rdev == old_a, \
        f"B was mapped as {b_dev}, not at A's old device number: the test proves nothing (something else mapped?)"
    assert pread_direct(b_dev, MIB, 0) == data_b
    # the kernel's own record of A's old device number now names B: what node_attachment_valid reads
    assert node_proof.krbd_is(old_a, pool, image_b) is True
    assert node_proof.krbd_is(old_a, pool, a.volume_context["image"]) is False
    _restage_reads(p, a, data_a, data_b, b_dev)
    assert pread_direct(b_dev, MIB, 0) == data_b, "volume B changed while A was re-staged"


# ---- thick LVM -----------------------------------------------------------------------------------------------
def test_lvm_reboot_with_device_numbers_swapped_restages_the_right_lv(thick: Pair, thick_vg) -> None:
    p = thick
    a, data_a, ta, b, data_b, tb = _write_patterns(p)
    lv_a, lv_b = (v.volume_id.split(":", 1)[1] for v in (a, b))
    # A is staged through Tessera's device layer over its LV (backends/lvm_top.py); the device number B is to take
    # is A's LV's, under that layer
    old_a = os.stat(f"/dev/{thick_vg.name}/{lv_a}").st_rdev
    _unmount_all_under(p.workdir)
    for lv in (lv_a, lv_b):  # a reboot takes the layers with it, then the LVs
        layer = lvm_top.top_name(thick_vg.name, lv)
        assert lvm_top.find(layer) is not None, f"volume {lv} was not staged through its layer {layer}"
        _sh(["dmsetup", "remove", layer])
    _sh(["lvchange", "-an", f"{thick_vg.name}/{lv_a}", f"{thick_vg.name}/{lv_b}"])
    # B is activated first and takes the lowest free device-mapper minor: A's old one
    _sh(["lvchange", "-ay", f"{thick_vg.name}/{lv_b}"])
    b_dev = f"/dev/{thick_vg.name}/{lv_b}"
    p.undo(f"deactivate {b_dev}", lambda: _sh(["lvchange", "-an", f"{thick_vg.name}/{lv_b}"]))
    assert os.stat(b_dev).st_rdev == old_a, \
        f"B was activated at {os.stat(b_dev).st_rdev:#x}, not at A's old device number {old_a:#x}: no proof"
    assert pread_direct(b_dev, MIB, 0) == data_b
    assert node_proof.dm_is_lv(old_a, thick_vg.name, lv_b) is True
    assert node_proof.dm_is_lv(old_a, thick_vg.name, lv_a) is False
    _restage_reads(p, a, data_a, data_b, b_dev)
    assert pread_direct(b_dev, MIB, 0) == data_b, "volume B changed while A was re-staged"


# ---- iSCSI (LIO + open-iscsi) --------------------------------------------------------------------------------
def _sessions() -> dict[str, str]:
    """targetname -> sid of every iSCSI session of this initiator (from sysfs)."""
    root = "/sys/class/iscsi_session"
    out = {}
    for sess in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        with open(os.path.join(root, sess, "targetname")) as f:
            out[f.read().strip()] = sess.removeprefix("session")
    return out


def _session_disks(iqn: str) -> list[int]:
    """Device numbers of the SCSI disks on this initiator's session to `iqn`."""
    import glob
    sid = _sessions().get(iqn)
    if sid is None:
        return []
    out = []
    for dev in glob.glob(f"/sys/class/iscsi_session/session{sid}/device/target*/*:*:*:*/block/*/dev"):
        with open(dev) as f:
            major, minor = f.read().strip().split(":")
        out.append(os.makedev(int(major), int(minor)))
    return sorted(out)


def _logout(iqn: str) -> None:
    sid = _sessions().get(iqn)
    if sid is not None:
        _sh(["iscsiadm", "-m", "session", "-r", sid, "-u"])


def test_iscsi_reboot_with_disks_swapped_restages_the_right_lun(iscsi: Pair) -> None:
    p = iscsi
    ctx = {"targetPortals": PORTALS[0]}
    vols, targets, datas = [], [], []
    for tag in ("a", "b"):
        vol = p.create(f"ds-reboot-iscsi-{tag}", SIZE, CAP)
        pc = p.controller_publish(p.a, vol, CAP, False)
        staging = p.stage(p.a, vol, CAP, f"reboot-{tag}", pc, {**vol.volume_context, **ctx})
        targets.append(p.publish(p.a, vol, CAP, staging, f"reboot-{tag}"))
        vols.append((vol, pc))
        datas.append(os.urandom(MIB))
        pwrite_direct(targets[-1], datas[-1], 0)
    (a, pca), (b, _) = vols
    data_a, data_b = datas
    old_a = os.stat(targets[0]).st_rdev
    iqn_a, iqn_b = a.volume_context["targetIqn"], b.volume_context["targetIqn"]
    lun = int(pca.get("lun") or a.volume_context.get("lun") or 0)
    assert node_proof.scsi_is(old_a, iqn_a, lun) is True
    assert node_proof.scsi_is(old_a, iqn_b, lun) is False
    assert node_proof.scsi_is(old_a, iqn_a, lun + 1) is False
    # the "reboot": publishes unmounted, every session logged out behind the plugin's back; B logs in first and
    # takes the lowest free SCSI disk index: A's old sdX and device number
    _unmount_all_under(p.workdir)
    old_b = os.stat(targets[1]).st_rdev
    for iqn in (iqn_a, iqn_b):
        _logout(iqn)
    for _ in range(200):  # the kernel frees a disk's index when its last user lets go (bounded: 20 s)
        if not any(os.path.exists(f"/sys/dev/block/{os.major(d)}:{os.minor(d)}") for d in (old_a, old_b)):
            break
        time.sleep(0.1)
    subprocess.run(["udevadm", "settle", "--timeout=10"], capture_output=True)
    _sh(["iscsiadm", "-m", "node", "-T", iqn_b, "-p", PORTALS[0], "--login"])
    p.undo(f"log out of {iqn_b} (logged in by the test)", lambda: _logout(iqn_b))
    # os-brick's node records say node.session.scan=manual: scan B's LUN as os-brick does (the host's scan file)
    host = os.path.basename(os.path.dirname(os.path.realpath(
        f"/sys/class/iscsi_session/session{_sessions()[iqn_b]}/device")))
    with open(f"/sys/class/scsi_host/{host}/scan", "w") as f:
        f.write(f"- - {lun}")
    for _ in range(200):  # the disk appears a moment after the login (bounded: 20 s)
        if _session_disks(iqn_b):
            break
        time.sleep(0.1)
    got = _session_disks(iqn_b)
    assert got == [old_a], f"B's disk came up as {[f'{os.major(d)}:{os.minor(d)}' for d in got]}, not at A's old " \
                           f"device number {os.major(old_a)}:{os.minor(old_a)}: the test proves nothing"
    b_dev = _dev_node(old_a)
    assert node_proof.scsi_is(old_a, iqn_b, lun)
    assert pread_direct(b_dev, MIB, 0) == data_b
    assert node_proof.scsi_is(old_a, iqn_a, lun) is False
    _restage_reads(p, a, data_a, data_b, b_dev, pc=pca, context={**a.volume_context, **ctx})
    assert pread_direct(b_dev, MIB, 0) == data_b, "volume B changed while A was re-staged"
