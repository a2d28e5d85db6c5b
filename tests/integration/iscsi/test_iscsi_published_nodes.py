"""published_node_ids on iSCSI (real tgtd): the CSI Controller service answers, in ControllerGetVolume and
ListVolumes, the node IDs a volume is controller-published to, from the publications recorded on the volume, and
advertises LIST_VOLUMES_PUBLISHED_NODES only when every configured backend can tell."""
from __future__ import annotations

import os

import pytest

from csi._pb import csi_pb2 as pb
from csi.config import parse_config
from csi.controller import ControllerService
from csi.controllerops import ControllerOps
from csi.ids import NodeRef
from csi.registry import Backends

from tests.integration.iscsi.tgt import PREFIX, Tgtd, iscsi_tool, lun_url

pytestmark = pytest.mark.iscsi

MIB = 1 << 20
NODE1 = NodeRef("node1", {"iqn": "iqn.2026-11.dev.tessera.test:node1"})
# a node whose plugin reports one more attribute than the IQN: its ID must come back exactly as it was sent
NODE2 = NodeRef("node2", {"iqn": "iqn.2026-11.dev.tessera.test:node2", "zone": "b"})
MNMW = pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume(),
                           access_mode=pb.VolumeCapability.AccessMode(mode=pb.VolumeCapability.AccessMode.Mode.Value(
                               "MULTI_NODE_MULTI_WRITER")))
PUBLISHED_NODES = pb.ControllerServiceCapability.RPC.Type.Value("LIST_VOLUMES_PUBLISHED_NODES")


def service(tgtd: Tgtd, workdir: str, with_file: bool = False) -> tuple[ControllerService, Backends]:
    backends_cfg = {"san": {"type": "iscsi", "portals": [tgtd.portal], "iqnPrefix": PREFIX, "targetDriver": "tgt",
                            "tgtControlPort": tgtd.control_port,
                            "backingStore": {"file": {"directory": os.path.join(workdir, "store")}}}}
    if with_file:
        backends_cfg["local"] = {"type": "file", "directory": os.path.join(workdir, "files")}
    cfg = parse_config({"stateDir": os.path.join(workdir, "state"), "defaultBackend": "san",
                        "backends": backends_cfg})
    backends = Backends(cfg, "target-host")
    return ControllerService(ControllerOps(backends)), backends


def caps(svc: ControllerService) -> set[int]:
    return {c.rpc.type for c in svc.ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest(), None).capabilities}


def published(svc: ControllerService, vid: str) -> tuple[list[str], list[str]]:
    got = svc.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=vid), None)
    entries = [e for e in svc.ListVolumes(pb.ListVolumesRequest(), None).entries if e.volume.volume_id == vid]
    assert len(entries) == 1
    return sorted(got.status.published_node_ids), sorted(entries[0].status.published_node_ids)


def test_published_node_ids_follow_publish_and_unpublish(tgtd: Tgtd, tmp_path) -> None:
    svc, backends = service(tgtd, str(tmp_path))
    try:
        assert PUBLISHED_NODES in caps(svc)
        vol = svc.CreateVolume(pb.CreateVolumeRequest(name="pvc-pub", volume_capabilities=[MNMW],
                                                      capacity_range=pb.CapacityRange(required_bytes=64 * MIB)),
                               None).volume
        assert published(svc, vol.volume_id) == ([], [])
        pc = svc.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
            volume_id=vol.volume_id, node_id=NODE1.encode(), volume_capability=MNMW), None).publish_context
        assert published(svc, vol.volume_id) == ([NODE1.encode()], [NODE1.encode()])
        # the record matches reality: node1's initiator can reach the LUN
        chap = (pc["chapUser"], pc["chapPassword"])
        lun = int(pc["lun"])
        iqn = vol.volume_context["targetIqn"]
        assert iscsi_tool("iscsi-inq", lun_url(tgtd, iqn, lun, chap), NODE1.attributes["iqn"]).returncode == 0
        svc.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
            volume_id=vol.volume_id, node_id=NODE2.encode(), volume_capability=MNMW), None)
        both = sorted([NODE1.encode(), NODE2.encode()])
        assert published(svc, vol.volume_id) == (both, both)
        svc.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=vol.volume_id,
                                                                          node_id=NODE1.encode()), None)
        assert published(svc, vol.volume_id) == ([NODE2.encode()], [NODE2.encode()])
        assert iscsi_tool("iscsi-inq", lun_url(tgtd, iqn, lun, chap), NODE1.attributes["iqn"]).returncode != 0
        svc.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=vol.volume_id), None)  # all
        assert published(svc, vol.volume_id) == ([], [])
        svc.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id), None)
    finally:
        backends.close()


def test_not_advertised_beside_a_backend_that_cannot_tell(tgtd: Tgtd, tmp_path) -> None:
    """The capability is all or nothing (the CO reads an empty list as "published nowhere"): beside the file
    backend, which keeps no publication record, it is not advertised."""
    svc, backends = service(tgtd, str(tmp_path), with_file=True)
    try:
        assert PUBLISHED_NODES not in caps(svc)
    finally:
        backends.close()
