"""The FlexVolume call contract, as kubelet (pkg/volume/flexvolume) makes the calls: argv shapes, option keys, and
the JSON status object it parses.

Kept free of heavy imports (no pydantic, no backends) because kubelet runs `init` often and waits for it.

Facts that shape this module:
- kubelet reads stdout and stderr *combined* and parses them as one JSON object, so the shim must write nothing but
  that object to either stream (see `flex.shim`, which redirects fds 1 and 2 to a log file).
- A "Not supported" answer is cached per command by kubelet for the life of the process.
- Capabilities that `init` omits default to attach/selinuxRelabel/fsGroup/requiresFSResize true, supportsMetrics
  false; so `init` always states every capability explicitly.
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

SUCCESS = "Success"
FAILURE = "Failure"
NOT_SUPPORTED = "Not supported"

OPT_FS_TYPE = "kubernetes.io/fsType"
OPT_READWRITE = "kubernetes.io/readwrite"
OPT_SECRET_PREFIX = "kubernetes.io/secret/"
OPT_FS_GROUP = "kubernetes.io/mounterArgs.FsGroup"
OPT_PV_NAME = "kubernetes.io/pvOrVolumeName"
OPT_POD_NAME = "kubernetes.io/pod.name"
OPT_POD_NAMESPACE = "kubernetes.io/pod.namespace"
OPT_POD_UID = "kubernetes.io/pod.uid"
OPT_SERVICE_ACCOUNT = "kubernetes.io/serviceAccount.name"

# our own keys in the PV's flexVolume.options
OPT_VOLUME_ID = "volumeID"
OPT_MOUNT_OPTIONS = "mountOptions"   # comma-separated mount flags, like a StorageClass's mountOptions
OPT_ACCESS_MODE = "accessMode"       # CSI access mode name; default SINGLE_NODE_WRITER

# CSI access mode names `accessMode` may hold (backends.base.ALL_MODES, repeated to keep this module light)
ACCESS_MODES = frozenset({"SINGLE_NODE_WRITER", "SINGLE_NODE_READER_ONLY", "SINGLE_NODE_SINGLE_WRITER",
                          "SINGLE_NODE_MULTI_WRITER", "MULTI_NODE_READER_ONLY", "MULTI_NODE_SINGLE_WRITER",
                          "MULTI_NODE_MULTI_WRITER"})

DEVICE_PREFIX = "tessera-pc:"        # an attach "device" carrying the controller's publish context to the node
DEVICE_NODE_KEY = "tessera/nodeID"   # inside the device: the node ID attach granted access to (not a secret)

COMMANDS = ("init", "attach", "detach", "waitforattach", "isattached", "mountdevice", "unmountdevice", "mount",
            "unmount", "expandvolume", "expandfs", "getvolumename")


class UsageError(Exception):
    """kubelet (or an operator) called the shim with arguments that do not fit the command."""


@dataclass
class Reply:
    """The JSON object kubelet parses (DriverStatus). Exit code 0 exactly when status is Success."""
    status: str
    message: str = ""
    device: Optional[str] = None
    attached: Optional[bool] = None
    capabilities: Optional[dict[str, bool]] = None
    volume_new_size: Optional[int] = None

    def to_json(self) -> str:
        out: dict[str, Any] = {"status": self.status}
        if self.message:
            out["message"] = self.message
        if self.device is not None:
            out["device"] = self.device
        if self.attached is not None:
            out["attached"] = self.attached
        if self.capabilities is not None:
            out["capabilities"] = self.capabilities
        if self.volume_new_size is not None:
            out["volumeNewSize"] = self.volume_new_size
        return json.dumps(out, sort_keys=True)

    @property
    def exit_code(self) -> int:
        return 0 if self.status == SUCCESS else 1


def success(message: str = "", **kw: Any) -> Reply:
    return Reply(SUCCESS, message, **kw)


def failure(message: str) -> Reply:
    return Reply(FAILURE, message)


def not_supported(message: str = "") -> Reply:
    return Reply(NOT_SUPPORTED, message)


def capabilities(attach: bool) -> dict[str, bool]:
    """Every capability stated: kubelet assumes true for missing ones. fsGroup stays true (kubelet applies the pod's
    fsGroup after `mount`, as it does for CSI volumes); metrics are a statfs of the pod path, which kubelet can do."""
    return {"attach": attach, "selinuxRelabel": True, "fsGroup": True, "requiresFSResize": True,
            "supportsMetrics": True}


@dataclass
class FlexOptions:
    """kubelet's JSON options, split into what each part of the shim needs."""
    volume_id: str
    pv_name: str = ""
    fs_type: str = ""
    readonly: bool = False
    fs_group: Optional[int] = None
    secrets: dict[str, str] = field(default_factory=dict)
    pod: dict[str, str] = field(default_factory=dict)
    mount_flags: tuple[str, ...] = ()
    access_mode: str = "SINGLE_NODE_WRITER"
    context: dict[str, str] = field(default_factory=dict)  # the rest of flexVolume.options: the volume context


def parse_options(raw: str, require_volume_id: bool = True) -> FlexOptions:
    """Parse the JSON options argument. Secrets arrive base64-encoded under kubernetes.io/secret/<key>."""
    try:
        data = json.loads(raw)
    except (ValueError, TypeError) as e:
        raise UsageError(f"the options argument is not JSON ({e}); kubelet passes the PV's options as one JSON "
                         "object") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise UsageError("the options argument must be a JSON object of strings")
    vol = data.get(OPT_VOLUME_ID, "")
    if require_volume_id and not vol:
        raise UsageError(f"the PV's flexVolume.options has no {OPT_VOLUME_ID!r}: set it to the Tessera volume ID "
                         "('<backend>:<id>', as the tessera flex provisioner does)")
    rw = data.get(OPT_READWRITE, "rw")
    if rw not in ("rw", "ro"):
        raise UsageError(f"{OPT_READWRITE} must be 'rw' or 'ro', not {rw!r}")
    fs_group: Optional[int] = None
    if data.get(OPT_FS_GROUP):
        try:
            fs_group = int(data[OPT_FS_GROUP])
        except ValueError:
            raise UsageError(f"{OPT_FS_GROUP} must be an integer group ID, not {data[OPT_FS_GROUP]!r}") from None
    secrets: dict[str, str] = {}
    for k, v in data.items():
        if k.startswith(OPT_SECRET_PREFIX):
            key = k[len(OPT_SECRET_PREFIX):]
            try:
                secrets[key] = base64.b64decode(v, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise UsageError(f"secret key {key!r} is not valid base64 text (kubelet sends secret values "
                                 "base64-encoded)") from None
    mode = data.get(OPT_ACCESS_MODE) or "SINGLE_NODE_WRITER"
    if mode not in ACCESS_MODES:
        raise UsageError(f"{OPT_ACCESS_MODE} {mode!r} is not a CSI access mode "
                         f"(one of {', '.join(sorted(ACCESS_MODES))})")
    pod = {k: data[k] for k in (OPT_POD_NAME, OPT_POD_NAMESPACE, OPT_POD_UID, OPT_SERVICE_ACCOUNT) if k in data}
    flags = tuple(f.strip() for f in data.get(OPT_MOUNT_OPTIONS, "").split(",") if f.strip())
    context = {k: v for k, v in data.items()
               if not k.startswith("kubernetes.io/") and k not in (OPT_VOLUME_ID, OPT_MOUNT_OPTIONS, OPT_ACCESS_MODE)}
    return FlexOptions(volume_id=vol, pv_name=data.get(OPT_PV_NAME, ""), fs_type=data.get(OPT_FS_TYPE, ""),
                       readonly=rw == "ro", fs_group=fs_group, secrets=secrets, pod=pod, mount_flags=flags,
                       access_mode=mode, context=context)


def _is_json_object(s: str) -> bool:
    return s.lstrip().startswith("{")


def split_json(args: Sequence[str], n_plain: int, command: str, usage: str) -> tuple[str, list[str]]:
    """(the JSON options argument, the other arguments in order). kubelet versions differ in where the JSON goes
    for some calls (isattached put the node name first in old releases), so it is found by shape, not position."""
    js = [a for a in args if _is_json_object(a)]
    plain = [a for a in args if not _is_json_object(a)]
    if len(js) != 1 or len(plain) != n_plain:
        raise UsageError(f"{command} expects: {usage} (got {len(args)} argument(s))")
    return js[0], plain


def encode_device(publish_context: Mapping[str, str], node_id: str = "") -> str:
    """attach's answer: kubelet hands it to waitforattach and mountdevice on the node unchanged. `node_id`: the node
    (with the attributes, e.g. the iSCSI initiator IQN) that attach granted access to, so the node can check that it
    is that node before it tries to log in. The device also lands in the Node object's status.volumesAttached."""
    if not publish_context and not node_id:
        return ""
    data = dict(publish_context)
    if node_id:
        data[DEVICE_NODE_KEY] = node_id
    raw = json.dumps(data, sort_keys=True).encode()
    return DEVICE_PREFIX + base64.urlsafe_b64encode(raw).decode()


def decode_attach(device: str) -> tuple[dict[str, str], str]:
    """(publish context, node ID attach granted access to or "") from attach's device string."""
    if not device.startswith(DEVICE_PREFIX):
        return {}, ""
    try:
        data = json.loads(base64.urlsafe_b64decode(device[len(DEVICE_PREFIX):]))
    except (binascii.Error, ValueError):
        raise UsageError(f"device {device[:60]!r} was not made by this driver's attach") from None
    if not isinstance(data, dict):
        raise UsageError(f"device {device[:60]!r} was not made by this driver's attach")
    pc = {str(k): str(v) for k, v in data.items()}
    return pc, pc.pop(DEVICE_NODE_KEY, "")


def decode_device(device: str) -> dict[str, str]:
    """The publish context alone (what NodeStage gets)."""
    return decode_attach(device)[0]
