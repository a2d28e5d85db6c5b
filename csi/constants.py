"""Names shared by the code, the deploy files and the docs; tests import them to keep all three in step."""
from __future__ import annotations

DRIVER_NAME = "tessera.csi.dev"
VENDOR_VERSION = "0.1.0"
TOPOLOGY_NODE_KEY = "topology.tessera.csi.dev/node"

DEFAULT_CONFIG_PATH = "/etc/tessera/config.yaml"
DEFAULT_STATE_DIR = "/var/lib/tessera"
DEFAULT_FILE_BACKEND_NAME = "local"
DEFAULT_FILE_BACKEND_DIR = "/var/lib/tessera/file"

# Socket paths used by the Kubernetes deployment (kubelet's plugin directory layout).
KUBELET_DIR = "/var/lib/kubelet"
NODE_SOCKET_PATH = f"{KUBELET_DIR}/plugins/{DRIVER_NAME}/csi.sock"
CONTROLLER_SOCKET_PATH = "/csi/csi.sock"
REGISTRATION_SOCKET_DIR = f"{KUBELET_DIR}/plugins_registry"

# StorageClass parameters read by the controller for every backend; backends read their own on top.
PARAM_BACKEND = "backend"
PARAM_FS_TYPE = "fsType"  # informational: the CO passes fsType in the volume capability
# Parameters added by external-provisioner --extra-create-metadata; accepted and stored, never required.
EXTRA_METADATA_PARAMS = (
    "csi.storage.k8s.io/pvc/name",
    "csi.storage.k8s.io/pvc/namespace",
    "csi.storage.k8s.io/pv/name",
    "csi.storage.k8s.io/volumesnapshot/name",
    "csi.storage.k8s.io/volumesnapshot/namespace",
    "csi.storage.k8s.io/volumesnapshotcontent/name",
)

SUPPORTED_FS_TYPES = ("ext4", "xfs")
DEFAULT_FS_TYPE = "ext4"
DEFAULT_VOLUME_SIZE = 1 << 30  # used when the CO gives no capacity range
MIB = 1 << 20
GIB = 1 << 30

# FlexVolume
FLEX_DRIVER_DIR = "tessera~block"
FLEX_EXECUTABLE = "block"
