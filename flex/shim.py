"""The FlexVolume driver `tessera/block`: kubelet runs it once per volume operation.

Every operation is the CSI node (or controller) code path — `csi.nodeops.NodeOps` / `csi.controllerops.ControllerOps`
built from the same config file — so a Flex volume behaves exactly like the same volume through CSI, and nothing
needs a Tessera daemon on the node.

Mapping (kubelet call → CSI code):
- attach: false (no configured backend needs controller-side access control): kubelet calls only `mount`/`unmount`.
  `mount DIR OPTS` stages the volume at a private path under kubelet's plugin dir (or finds it staged) and publishes
  it at DIR; `unmount DIR` unpublishes and, when no pod uses it any more, unstages.
- attach: true: `attach`/`detach` are ControllerPublish/Unpublish (kube-controller-manager), `waitforattach` passes
  the publish context on, `mountdevice`/`unmountdevice` are NodeStage/NodeUnstage at kubelet's global path, and
  `mount`/`unmount` are NodePublish/NodeUnpublish.
- expandvolume → ControllerExpandVolume; expandfs → NodeExpandVolume.

The node behind `attach`: CSI's ControllerPublish gets the node ID that the node plugin reported, with what the
backend needs to grant access (the iSCSI initiator IQN: `node?iqn=...`, csi/ids.py NodeRef). A Flex `attach` runs in
kube-controller-manager and gets the node *name* only, and it happens before anything runs on the node, so nothing
the node could report in time exists. The backend therefore derives the attributes from the name by a convention
the operator configures and applies to the nodes (`node_attributes_for_name`; iscsi: `initiatorNameTemplate`,
e.g. "iqn.2026-01.com.example:{node}", with every node's InitiatorName set to match). Without that convention
attach fails with a message saying what to set. The node ID granted travels to the node inside attach's device
string; `waitforattach` and `mountdevice` check it against the node's own attributes and fail with both values
when they differ (a login that the target would refuse, with a far less clear error). `detach` unpublishes exactly
the node ID that attach recorded. The device string ends up in the Node object's status, so it never carries
credentials (`Backend.secret_publish_keys`): the node derives them from its own config (`node_publish_secrets`;
iscsi: the CHAP key file, which Flex nodes therefore need as well).

Output discipline: kubelet parses stdout+stderr combined as one JSON object, so file descriptors 1 and 2 are
pointed at a log file before anything else runs and the answer is written to a saved copy of the real stdout.
Environment: TESSERA_CONFIG (default /etc/tessera/config.yaml, else the embedded file backend), TESSERA_NODE_NAME,
TESSERA_FLEX_LOG (default /var/log/tessera-flex.log; when that cannot be opened /tmp/tessera-flex.log, then
/dev/null).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

from . import protocol as P
from .protocol import Reply, UsageError

# Backend types whose volumes need per-node access granted by the controller (ControllerPublish). Kept as names so
# `init` does not import any backend; tests/unit/flex checks it against the backends' Features.
CONTROLLER_ATTACH_TYPES = frozenset({"iscsi"})

DEFAULT_CONFIG = "/etc/tessera/config.yaml"
FALLBACK_LOG = "/tmp/tessera-flex.log"


def config_path() -> Optional[str]:
    p = os.environ.get("TESSERA_CONFIG")
    if p:
        return p
    return DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None


def _raw_config() -> dict:
    """The YAML document alone (no validation): enough for `init`, which must stay fast."""
    path = config_path()
    if path is None:
        return {}
    import yaml
    try:
        loader = yaml.CSafeLoader  # type: ignore[attr-defined]
    except AttributeError:
        loader = yaml.SafeLoader
    with open(path) as f:
        data = yaml.load(f, Loader=loader)
    return data if isinstance(data, dict) else {}


def needs_attach(raw: dict) -> bool:
    backends = raw.get("backends") or {}
    return any(isinstance(b, dict) and b.get("type") in CONTROLLER_ATTACH_TYPES for b in backends.values())


class Shim:
    """One invocation: the config, backends and node/controller logic are built on first use only."""

    def __init__(self) -> None:
        self._config: Any = None
        self._backends: Any = None
        self._records: Any = None

    # ---- lazily built parts -------------------------------------------------------------------------------
    @property
    def config(self):
        if self._config is None:
            from csi.config import load_config
            self._config = load_config(config_path())
        return self._config

    @property
    def node_name(self) -> str:
        import socket
        return os.environ.get("TESSERA_NODE_NAME") or os.environ.get("NODE_NAME") or socket.gethostname()

    @property
    def backends(self):
        if self._backends is None:
            from csi.registry import Backends
            self._backends = Backends(self.config, self.node_name)
        return self._backends

    @property
    def records(self):
        if self._records is None:
            from .records import Records
            self._records = Records(self.config.state_dir)
        return self._records

    def nodeops(self):
        from csi.nodeops import NodeOps
        return NodeOps(self.backends, self.config.node.maxVolumesPerNode, self.config.node.allowedPathPrefixes)

    def controllerops(self):
        from csi.controllerops import ControllerOps
        return ControllerOps(self.backends)

    def backend_of(self, volume_id: str):
        from csi.ids import parse_id
        oid = parse_id(volume_id)
        return self.backends.for_id(oid.backend, f"volume {volume_id!r}")

    def close(self) -> None:
        if self._backends is not None:
            self._backends.close()

    @staticmethod
    def capability(opts: P.FlexOptions):
        from backends.base import CapabilitySpec
        return CapabilitySpec("mount", opts.access_mode, opts.fs_type, tuple(opts.mount_flags))

    def auto_staging_path(self, pod_dir: str, volume_id: str) -> str:
        """Where `mount` stages a volume when kubelet does not (attach: false): inside kubelet's own directory,
        which the pod path shows (so allowedPathPrefixes that admit kubelet paths admit it too). A directory that
        is not a kubelet pod volume path is refused: the plugin's state directory is never a mount point."""
        import hashlib
        key = hashlib.sha256(volume_id.encode()).hexdigest()[:32]
        head, sep, _ = pod_dir.partition("/pods/")
        if not sep or not head:
            from backends.errors import InvalidArgument
            from csi.paths import shown
            raise InvalidArgument(f"mount directory {shown(pod_dir)} is not a kubelet pod volume directory "
                                  "(<kubelet root>/pods/<uid>/volumes/...); nothing was mounted")
        return os.path.join(head, "plugins", "tessera~block", "staging", key)

    # ---- commands -----------------------------------------------------------------------------------------
    def init(self, args: Sequence[str]) -> Reply:
        try:
            raw = _raw_config()
        except Exception as e:  # noqa: BLE001 - any unreadable config is reported the same way
            return P.failure(f"cannot read the Tessera config {config_path()}: {e}; fix the file (check it with "
                             "`tessera-csi config validate FILE`)")
        return P.success(capabilities=P.capabilities(needs_attach(raw)))

    def attach(self, args: Sequence[str]) -> Reply:
        raw, (node,) = P.split_json(args, 1, "attach", "attach <json options> <node name>")
        opts = P.parse_options(raw)
        backend = self.backend_of(opts.volume_id)
        if not backend.features().publish_needed:
            return P.success("no controller-side attach needed for this backend", device="")
        node_id = self.flex_node_id(backend, node)
        pc = self.controllerops().publish(opts.volume_id, node_id, opts.readonly, self.capability(opts), opts.context,
                                          opts.secrets)
        self.records.put_attachment(opts.pv_name, node, opts.volume_id, node_id)
        # kubelet's attach/detach controller stores this answer in the Node object's status, readable by anyone who
        # may read Nodes: credentials stay out of it, and the node derives them itself (node_publish_secrets)
        secret = backend.secret_publish_keys()
        return P.success(device=P.encode_device({k: v for k, v in pc.items() if k not in secret}, node_id))

    @staticmethod
    def flex_node_id(backend, node: str) -> str:
        """The CSI node ID for a node known by name only (see the module doc): the name plus the attributes the
        backend derives from it (`node_attributes_for_name`, e.g. the iSCSI IQN from initiatorNameTemplate)."""
        from csi.ids import NodeRef
        return NodeRef(node, dict(backend.node_attributes_for_name(node))).encode()

    def check_granted_node(self, volume_id: str, device: str) -> dict[str, str]:
        """On the node: the publish context for NodeStage. Attach's device carries its public part and the node ID
        attach granted; check that this node has the attributes granted (it could not log in otherwise), then add
        the credentials the backend keeps out of the device (see `attach`), derived on this node."""
        pc, node_id = P.decode_attach(device)
        backend = self.backend_of(volume_id)
        granted = None
        if node_id:
            from csi.ids import parse_node_id
            granted = parse_node_id(node_id)
        if granted is not None and granted.attributes:
            from backends.errors import FailedPrecondition
            mine = backend.node_attributes()
            for key, want in sorted(granted.attributes.items()):
                have = mine.get(key, "")
                if have != want:
                    fix = backend.node_attribute_remedy(key, want)
                    raise FailedPrecondition(
                        f"volume {volume_id} was attached for node {granted.name} with {key}={want} (derived from "
                        f"the node name by the backend's config, e.g. the iscsi initiatorNameTemplate), but this node "
                        f"({self.node_name}) has {key}={have or '(none)'} and would be refused: {fix}, or change the "
                        "template; kubelet retries")
        if backend.secret_publish_keys() and (pc or node_id):
            from csi.ids import parse_id
            pc.update(backend.node_publish_secrets(parse_id(volume_id).local))
        return pc

    def detach(self, args: Sequence[str]) -> Reply:
        if len(args) != 2:
            raise UsageError("detach expects: detach <pv or volume name> <node name>")
        pv_name, node = args
        att = self.records.get_attachment(pv_name, node)
        if att is None:
            return P.success(f"volume {pv_name} has no Tessera attachment to node {node}; nothing to detach")
        self.controllerops().unpublish(att["volume_id"], att["node_id"], {})
        self.records.drop_attachment(pv_name, node)
        return P.success()

    def isattached(self, args: Sequence[str]) -> Reply:
        raw, (node,) = P.split_json(args, 1, "isattached", "isattached <json options> <node name>")
        opts = P.parse_options(raw)
        backend = self.backend_of(opts.volume_id)
        if not backend.features().publish_needed:
            return P.success(attached=True)
        _, vol = self.controllerops().get_volume(opts.volume_id, opts.secrets)
        attached = node in vol.published_nodes or self.records.get_attachment(opts.pv_name, node) is not None
        return P.success(attached=attached)

    def waitforattach(self, args: Sequence[str]) -> Reply:
        raw, plain = P.split_json(args, 1, "waitforattach", "waitforattach <device> <json options>")
        opts = P.parse_options(raw)
        # a device we cannot read, or one attached for another initiator, is an error now, not at mountdevice
        self.check_granted_node(opts.volume_id, plain[0])
        # the device node itself appears in mountdevice (NodeStage attaches it); pass attach's answer on unchanged
        return P.success(device=plain[0])

    def mountdevice(self, args: Sequence[str]) -> Reply:
        raw, plain = P.split_json(args, 2, "mountdevice", "mountdevice <mount dir> <device> <json options>")
        mount_dir, device = plain
        opts = P.parse_options(raw)
        ops = self.nodeops()
        mount_dir = ops.check_path(mount_dir, "mount directory")  # judged before anything is written or made
        pc = self.check_granted_node(opts.volume_id, device)
        from .records import KIND_DEVICE, MountRecord
        with self.records.volume_lock(opts.volume_id):
            had = self.records.get(mount_dir)
            self.records.put(MountRecord(mount_dir, KIND_DEVICE, opts.volume_id, opts.pv_name, readonly=opts.readonly,
                                         fs_type=opts.fs_type))
            try:
                # NodeOps makes the directory when kubelet has not (and records that it did)
                rec = ops.stage(opts.volume_id, mount_dir, self.capability(opts), opts.context, pc, opts.secrets,
                                create_staging=True)
            except BaseException:
                self._restore(mount_dir, had)  # a failed stage left nothing behind; neither does its record
                raise
        return P.success(f"volume {opts.volume_id} ({rec.device}) mounted at {mount_dir}")

    def unmountdevice(self, args: Sequence[str]) -> Reply:
        if len(args) != 1:
            raise UsageError("unmountdevice expects: unmountdevice <mount dir>")
        path = os.path.normpath(args[0])
        rec = self.records.get(path)
        if rec is None:
            return self._no_record(path)
        with self.records.volume_lock(rec.volume_id):
            self.nodeops().unstage(rec.volume_id, path)
            self.records.drop(path)
        return P.success()

    def mount(self, args: Sequence[str]) -> Reply:
        raw, (target,) = P.split_json(args, 1, "mount", "mount <mount dir> <json options>")
        opts = P.parse_options(raw)
        from .records import KIND_DEVICE, KIND_POD, MountRecord
        ops = self.nodeops()
        target = ops.check_path(target, "mount directory")  # judged before anything is written or made
        cap = self.capability(opts)
        with self.records.volume_lock(opts.volume_id):
            staged = ops.record(opts.volume_id)
            auto = staged is None
            staging = self.auto_staging_path(target, opts.volume_id) if auto else staged.staging_path
            made: list[str] = []
            if auto:
                staging = ops.check_path(staging, "staging directory")
                # the shim's own directories under kubelet's plugins/ (the staging directory itself is NodeOps')
                made = _makedirs(os.path.dirname(staging))
                had = self.records.get(staging)
                try:
                    self.records.put(MountRecord(staging, KIND_DEVICE, opts.volume_id, opts.pv_name,
                                                 auto_staged=True, fs_type=opts.fs_type))
                    ops.stage(opts.volume_id, staging, cap, opts.context, {}, opts.secrets, create_staging=True)
                except BaseException:
                    self._restore(staging, had)
                    _rmdirs(made)
                    raise
            had_target = self.records.get(target)
            self.records.put(MountRecord(target, KIND_POD, opts.volume_id, opts.pv_name, staging_path=staging,
                                         readonly=opts.readonly, fs_type=opts.fs_type, fs_group=opts.fs_group))
            try:
                ops.publish(opts.volume_id, staging, target, cap, opts.readonly, opts.context)
            except BaseException:
                self._restore(target, had_target)
                if auto:
                    self._unstage_if_unused(ops, opts.volume_id)
                    _rmdirs(made)
                raise
        return P.success(f"volume {opts.volume_id} mounted at {target}")

    def unmount(self, args: Sequence[str]) -> Reply:
        if len(args) != 1:
            raise UsageError("unmount expects: unmount <mount dir>")
        path = os.path.normpath(args[0])
        rec = self.records.get(path)
        if rec is None:
            return self._no_record(path)
        ops = self.nodeops()
        with self.records.volume_lock(rec.volume_id):
            ops.unpublish(rec.volume_id, path)
            self.records.drop(path)
            self._unstage_if_unused(ops, rec.volume_id)
        return P.success()

    def expandvolume(self, args: Sequence[str]) -> Reply:
        raw, plain = P.split_json(args, 3, "expandvolume",
                                  "expandvolume <json options> <device mount path> <new size> <old size>")
        opts = P.parse_options(raw)
        new_size = _size(plain[1], "new size")
        size, _ = self.controllerops().expand_volume(opts.volume_id, new_size, 0, opts.secrets)
        return P.success(volume_new_size=size)

    def expandfs(self, args: Sequence[str]) -> Reply:
        raw, plain = P.split_json(args, 4, "expandfs",
                                  "expandfs <json options> <device path> <device mount path> <new size> <old size>")
        opts = P.parse_options(raw)
        _size(plain[2], "new size")
        ops = self.nodeops()
        with self.records.volume_lock(opts.volume_id):
            staged = ops.record(opts.volume_id)
            if staged is None:
                from backends.errors import FailedPrecondition
                raise FailedPrecondition(f"volume {opts.volume_id} is not mounted on node {self.node_name}; kubelet "
                                         "grows the filesystem once a pod using it runs here")
            size = ops.expand(opts.volume_id, staged.staging_path, staged.staging_path)
        return P.success(f"filesystem of volume {opts.volume_id} grown to {size} bytes", volume_new_size=size)

    # ---- helpers ------------------------------------------------------------------------------------------
    def _no_record(self, path: str) -> Reply:
        from csi import mounts
        if mounts.is_mountpoint(path):
            return P.failure(f"{path} is mounted but has no Tessera mount record under {self.records.mount_dir}; it "
                             f"was not mounted by this driver (or its record was deleted): unmount it by hand "
                             f"(umount {path}) and retry")
        return P.success(f"{path} is not mounted and has no Tessera mount record; nothing to unmount")

    def _restore(self, path: str, had) -> None:
        """Put the mount record of `path` back as it was before a call that failed (NodeOps undid its own work)."""
        if had is None:
            self.records.drop(path)
        else:
            self.records.put(had)

    def _unstage_if_unused(self, ops, volume_id: str) -> None:
        """Unstage a volume that `mount` staged itself once no pod target remains (attach: false)."""
        staged = ops.record(volume_id)
        if staged is None:
            return
        dev_rec = self.records.get(staged.staging_path)
        if dev_rec is None or not dev_rec.auto_staged:
            return  # staged by kubelet's mountdevice: unmountdevice undoes it
        from csi import mounts
        if any(mounts.is_mountpoint(t) for t in staged.targets):
            return
        ops.unstage(volume_id, staged.staging_path)  # removes the staging directory it made
        self.records.drop(staged.staging_path)


def _makedirs(path: str) -> list[str]:
    """makedirs, returning the directories it created (outermost first), so a failure can take them back."""
    missing = []
    p = path
    while not os.path.isdir(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    made: list[str] = []
    try:
        for d in reversed(missing):
            os.mkdir(d, 0o750)
            made.append(d)
    except BaseException:
        _rmdirs(made)
        raise
    return made


def _rmdirs(made: list[str]) -> None:
    for d in reversed(made):
        try:
            os.rmdir(d)
        except OSError:
            return


def _size(text: str, what: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise UsageError(f"{what} must be a number of bytes, not {text!r}") from None
    if n < 0:
        raise UsageError(f"{what} must not be negative")
    return n


_HANDLERS: dict[str, Callable[[Shim, Sequence[str]], Reply]] = {
    name: getattr(Shim, name) for name in P.COMMANDS if name != "getvolumename"}


def _open_log() -> int:
    path = os.environ.get("TESSERA_FLEX_LOG")
    candidates = [path] if path else ["/var/log/tessera-flex.log", FALLBACK_LOG]
    for p in candidates:
        try:
            return os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError:
            continue
    return os.open(os.devnull, os.O_WRONLY)


def _describe(command: str, args: Sequence[str]) -> str:
    """The call for the log, without option values (they may carry secrets)."""
    return " ".join([command] + ["<options>" if a.lstrip().startswith("{") else a for a in args])


def run(argv: Sequence[str], shim: Optional[Shim] = None) -> Reply:
    """Answer one kubelet call (argv without the program name). Never raises. `shim`: a long-lived instance (the
    node agent keeps one so the config and backends are built once); by default a fresh one, closed afterwards."""
    if not argv:
        return P.failure("no command given; usage: block <init|attach|detach|waitforattach|isattached|mountdevice|"
                         "unmountdevice|mount|unmount|expandvolume|expandfs> [arguments]")
    command, args = argv[0], list(argv[1:])
    handler = _HANDLERS.get(command)
    if handler is None:
        return P.not_supported(f"{command!r} is not implemented by the tessera/block driver")
    own = shim is None
    shim = shim or Shim()
    try:
        return handler(shim, args)
    except UsageError as e:
        return P.failure(f"{command}: {e}")
    except Exception as e:  # noqa: BLE001 - every failure becomes a Failure answer kubelet can show
        return P.failure(_failure_text(command, e))
    finally:
        if own:
            try:
                shim.close()
            except Exception:  # noqa: BLE001
                pass


def _failure_text(command: str, e: Exception) -> str:
    try:
        from backends.errors import TesseraError
        from csi.config import ConfigError
    except Exception:  # noqa: BLE001
        return f"{command} failed: {type(e).__name__}: {e}"
    if isinstance(e, ConfigError):
        return (f"{command}: the Tessera config {e.source} is invalid: {'; '.join(e.problems)} "
                "(check it with `tessera-csi config validate FILE`)")
    if isinstance(e, TesseraError):
        return f"{command} failed: {e}"
    import traceback
    import logging
    logging.getLogger("tessera.flex").error("%s: unexpected error\n%s", command, traceback.format_exc())
    return f"{command} failed with an internal error ({type(e).__name__}: {e}); details in {_log_name()}"


def _log_name() -> str:
    return os.environ.get("TESSERA_FLEX_LOG") or "/var/log/tessera-flex.log (or /tmp/tessera-flex.log)"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: route fds 1 and 2 to the log, answer, print the one JSON object on the real stdout."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out_fd = os.dup(1)
    log_fd = _open_log()
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    started = time.monotonic()
    if argv and argv[0] != "init":
        import logging
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format=f"%(asctime)s {os.getpid()} %(levelname)s %(name)s %(message)s")
    reply = run(argv)
    if argv and argv[0] != "init" or reply.status != P.SUCCESS:
        sys.stderr.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {os.getpid()} {_describe(argv[0] if argv else '', argv[1:])}"
                         f" -> {reply.status} {reply.message} ({time.monotonic() - started:.3f}s)\n")
        sys.stderr.flush()
    os.write(out_fd, (reply.to_json() + "\n").encode())
    os.close(out_fd)
    return reply.exit_code


if __name__ == "__main__":
    sys.exit(main())
