"""The built image (deploy/image/Dockerfile), exercised the way a cluster runs it: its entrypoint, its PATH and its
user, inside its own root file system (tests/image/rootfs.py).

- `tessera-csi version` as the image's default user;
- the file backend's conformance suite (tests/sanity, `--csi-endpoint`) run from the host against the plugin serving
  from inside the image, as root, as the node DaemonSet runs it;
- one RBD volume created, staged and published by the plugin inside the image against the test Ceph cluster (fuse
  mounter: the host kernel has no rbd/nbd modules, as in tests/integration/rbd).
The shipped configurations are validated inside the image by test_image_configs.py.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from csi._pb import csi_pb2 as pb
from tests.image import build
from tests.image.rootfs import Container, nsenter, stop, wait_for_socket
from tests.sanity.harness import CTRL, Client, Ledger, mount_cap

# The first build on a fresh machine happens in the first test's setup (minutes; see build.py); the session
# fixture is shared, so later tests start at once.
pytestmark = pytest.mark.timeout(2400)
MIB = 1 << 20


def _project_version() -> str:
    text = (build.REPO / "pyproject.toml").read_text()
    return re.search(r'^version\s*=\s*"([^"]+)"', text, re.M).group(1)


def test_image_runs_as_an_unprivileged_user_with_the_entrypoint_on_its_path(container: Container):
    assert container.run_as.entrypoint == ["tessera-csi"], container.run_as
    assert container.run_as.user not in ("", "0", "root"), "the image's default user is root"
    r = container.run(["version"])
    assert r.returncode == 0, f"tessera-csi version in the image failed ({r.returncode}):\n{r.stdout}{r.stderr}"
    assert _project_version() in r.stdout, f"`tessera-csi version` printed {r.stdout!r}"


def test_image_holds_the_node_tools_on_its_path(container: Container):
    """The programs the backends call on a node, found through the image's PATH as its user sees it."""
    # what backends/ and csi/ call by name (grep for run([...]) / argv = [...]), plus thin_check that lvm2 calls
    # for thin pools
    tools = ["mkfs.ext4", "mkfs.xfs", "blkid", "losetup", "mount", "umount", "blockdev", "blkdiscard", "resize2fs",
             "xfs_growfs", "dd", "cp", "rbd", "rbd-nbd", "rbd-fuse", "lvcreate", "lvs", "vgs", "lvchange",
             "lvextend", "lvremove", "lvconvert", "thin_check", "iscsiadm", "tgtadm", "udevadm"]
    r = container.run(tools, entrypoint=["sh", "-c", 'for t in "$@"; do command -v "$t" >/dev/null || echo "$t"; done',
                                          "sh"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [], f"not on the image's PATH: {r.stdout.split()}"


def _serve(container: Container, workdir: Path, extra: list[str], readonly: tuple[str, ...] = ()):
    sock = workdir / "csi.sock"
    log = workdir / "server.log"
    p = container.start(["serve", "--endpoint", f"unix://{sock}", "--node-id", "image-node",
                         "--state-dir", str(workdir / "state"), *extra], log=log, user="0",
                        shared=[str(workdir)], readonly=readonly)
    wait_for_socket(str(sock), p, log)
    return p, f"unix://{sock}", log


def test_file_backend_conformance_against_the_plugin_in_the_image(container: Container, tmp_path_factory):
    """The whole conformance suite, from the host's venv, against `tessera-csi serve` (embedded default: the file
    backend) inside the image, as root (the node DaemonSet's user).

    The tester sees the plugin's mounts as kubelet sees a node plugin's under `mountPropagation: Bidirectional`:
    the shared directory is a peer of the plugin's view of it (tests/image/rootfs.py), so a mount the plugin makes
    there appears to the tester as a propagated copy. Flags changed by a later remount (e.g. `mount -o bind,ro`,
    which mount(8) does as bind + remount) would stay on the plugin's copy only, as they would on a real node: the
    read-only publish checks of the suite catch that (csi/bindmount.py sets the flags before the mount appears)."""
    work = tmp_path_factory.mktemp("image-file")
    p, endpoint, log = _serve(container, work, [])
    try:
        r, text = _sanity(p, endpoint, work / "tester", work / "sanity.txt", ["tests/sanity"])
        summary = next((line for line in reversed(text.strip().splitlines())
                        if re.search(r"\d+ (passed|failed|error)|no tests ran", line)), "")  # pytest's own line
        print(f"conformance suite against the image: {summary}")
        assert r.returncode == 0, f"tests/sanity against the image's plugin failed:\n{text[-8000:]}\n" \
                                  f"--- server log ---\n{log.read_text()[-4000:]}"
        assert re.search(r"\d+ passed", summary), summary
        assert p.poll() is None, f"the plugin exited during the suite:\n{log.read_text()[-4000:]}"
    finally:
        rc = stop(p)
        assert rc == 0, f"the plugin in the image did not stop cleanly on SIGTERM ({rc}):\n{log.read_text()[-4000:]}"


def _sanity(p, endpoint: str, basetemp: Path, report: Path, select: list[str]):
    """tests/sanity run from the host's venv inside the plugin's mount namespace; (result, its output)."""
    with open(report, "w") as out:
        argv = [sys.executable, "-m", "pytest", "--csi-endpoint", endpoint, "--basetemp", str(basetemp), "-q",
                "-p", "no:cacheprovider", *select]
        r = subprocess.run(nsenter(p, argv, wd=str(build.REPO)),
                           cwd=build.REPO, stdout=out, stderr=subprocess.STDOUT, timeout=1800)
    return r, report.read_text()


@pytest.mark.ceph
def test_rbd_volume_created_staged_published_by_the_plugin_in_the_image(container: Container, ceph_cluster,
                                                                         tmp_path_factory):
    work = tmp_path_factory.mktemp("image-rbd")
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump({"backends": {"ceph": {
        "type": "rbd", "monitors": [ceph_cluster.monitors], "user": ceph_cluster.csi_user,
        "keyringPath": ceph_cluster.csi_keyring, "pool": ceph_cluster.pool, "mounter": "fuse",
        "connectTimeout": 10, "opTimeout": 20}}}))
    ceph_dir = os.path.dirname(os.path.abspath(ceph_cluster.csi_keyring))
    p, endpoint, log = _serve(container, work, ["--config", str(config)], readonly=(ceph_dir,))
    client = Client(endpoint, timeout=120)
    try:
        caps = client.controller_caps()
        node_id = client.node.NodeGetInfo(pb.NodeGetInfoRequest(), timeout=30).node_id  # as the CO learns it
        ledger = Ledger(client, node_id, CTRL.Value("PUBLISH_UNPUBLISH_VOLUME") in caps)
        cap = mount_cap("ext4")
        vol = ledger.create_volume(pb.CreateVolumeRequest(
            name=f"image-{uuid.uuid4().hex[:8]}", parameters={"backend": "ceph"}, volume_capabilities=[cap],
            capacity_range=pb.CapacityRange(required_bytes=64 * MIB)))
        image_name = vol.volume_context["image"]
        r = ceph_cluster.cluster.rados()
        try:
            io = r.open_ioctx(ceph_cluster.pool)
            import rbd
            assert image_name in rbd.RBD().list(io), f"CreateVolume in the image made no RBD image {image_name}"
            pc = ledger.controller_publish(vol.volume_id, cap)
            staging = work / "staging"
            staging.mkdir()
            target = work / "pod" / "target"
            target.parent.mkdir()
            ledger.stage(vol, str(staging), cap, pc)
            ledger.publish(vol, str(staging), str(target), cap, publish_context=pc)
            check = subprocess.run(nsenter(p, ["sh", "-c", 'findmnt -n -o FSTYPE --mountpoint "$1" && '
                                                           'echo from-the-image > "$1/f" && sync -f "$1/f" && '
                                                           'cat "$1/f"', "sh", str(target)]),
                                   capture_output=True, text=True, timeout=120)
            assert check.stdout.split() == ["ext4", "from-the-image"], \
                f"the published target in the plugin's namespace: {check.stdout!r} {check.stderr!r}"
            problems = ledger.cleanup()
            assert not problems, f"unpublish/unstage/delete through the image's plugin: {problems}\n" \
                                 f"{log.read_text()[-4000:]}"
            assert image_name not in rbd.RBD().list(io), f"DeleteVolume left RBD image {image_name}"
            io.close()
        finally:
            r.shutdown()
    finally:
        client.close()
        rc = stop(p)
        assert rc == 0, f"the plugin in the image did not stop cleanly on SIGTERM ({rc}):\n{log.read_text()[-4000:]}"
