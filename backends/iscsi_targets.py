"""iSCSI target drivers: the part of the iSCSI backend that talks to a Linux target.

Two drivers sit behind one small interface (`TargetDriver`) so the backend never knows which target runs:
- `LioDriver`: the kernel target (LIO) through rtslib-fb, the production choice. LUN 0 carries the volume.
- `TgtDriver`: the userspace `tgtd` through `tgtadm`, for hosts without LIO (and the host test suite). tgt reserves
  LUN 0 of every target for its own "controller" device, so the volume is **LUN 1** there; `driver.lun` says which.

One target per volume: access control (ACL per initiator IQN) and CHAP credentials are then per volume, and deleting
a volume is deleting its target. Neither target keeps its configuration across a restart of tgtd / a reboot by
itself; the backend re-creates a missing export whenever it publishes (`ensure_target` is idempotent), so the
storage (file or LV) is the only state that matters.
"""
from __future__ import annotations

import abc
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

from .errors import BackendUnavailable, Internal, NotFound
from .util import CommandError, run


@dataclass(frozen=True)
class Portal:
    host: str
    port: int = 3260

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Chap:
    user: str
    password: str

    def __repr__(self) -> str:  # never let a traceback or log line show the secret
        return f"Chap(user={self.user!r}, password=***)"


@dataclass
class TargetState:
    iqn: str
    backing: str = ""
    acls: list[str] = field(default_factory=list)
    sessions: list[str] = field(default_factory=list)  # initiator IQNs logged in now


class TargetDriver(abc.ABC):
    """What the backend needs from a target. All methods are idempotent."""

    lun: int = 0

    @abc.abstractmethod
    def ensure_target(self, iqn: str, backing: str, size_bytes: int, portals: Sequence[Portal], chap: bool) -> None:
        """Export `backing` (file or block device) as this driver's LUN of target `iqn`, creating what is missing."""

    @abc.abstractmethod
    def remove_target(self, iqn: str) -> None:
        """Tear the target down (ACLs, LUN, backstore); absent is success. Sessions are dropped."""

    @abc.abstractmethod
    def state(self, iqn: str) -> Optional[TargetState]:
        """The target's ACLs and logged-in initiators, or None when it is not exported."""

    @abc.abstractmethod
    def list_targets(self, prefix: str) -> list[str]:
        """IQNs of exported targets starting with `prefix`."""

    @abc.abstractmethod
    def add_acl(self, iqn: str, initiator: str, chap: Optional[Chap], readonly: bool = False) -> int:
        """Let `initiator` log in to `iqn` (with `chap` when given); `readonly`: the LUN it is given refuses
        writes. Returns that LUN."""

    @abc.abstractmethod
    def remove_acl(self, iqn: str, initiator: Optional[str]) -> None:
        """Revoke `initiator` (None: every initiator)."""

    @abc.abstractmethod
    def refresh_size(self, iqn: str, backing: str, size_bytes: int) -> None:
        """Make the target report the backing store's new size."""

    def probe(self) -> None:
        """BackendUnavailable when the target cannot be configured now."""


# ---- tgt ----------------------------------------------------------------------------------------------------------

_TARGET_RE = re.compile(r"^Target (\d+): (\S+)$")


class TgtDriver(TargetDriver):
    """tgtd through tgtadm. Targets have numeric ids (tid) in tgt; the IQN → tid map is read from `--op show` each
    time (tgtd is the only truth), and new tids are allocated under a process lock (the CSI core only serialises
    per volume)."""

    lun = 1  # LUN 0 is tgt's controller LU
    ro_lun = 2  # the same backing store with tgt's readonly flag, for read-only publishes

    def __init__(self, control_port: Optional[int] = None, timeout: float = 60.0) -> None:
        self.control_port = control_port
        self.timeout = timeout
        self._lock = threading.Lock()

    def _adm(self, *args: str, check: bool = True):  # type: ignore[no-untyped-def]
        argv = ["tgtadm"]
        if self.control_port is not None:
            argv += ["-C", str(self.control_port)]
        argv += ["--lld", "iscsi", *args]
        try:
            return run(argv, timeout=self.timeout, check=check)
        except CommandError as e:
            if "can't connect" in (e.stderr or "") or "Connection refused" in (e.stderr or ""):
                raise BackendUnavailable("tgtd is not running (tgtadm cannot reach its control socket)") from None
            raise

    def _show(self) -> dict[str, tuple[int, TargetState]]:
        """Parse `tgtadm --op show --mode target` into iqn → (tid, state)."""
        out: dict[str, tuple[int, TargetState]] = {}
        cur: Optional[TargetState] = None
        section = ""
        for raw in self._adm("--mode", "target", "--op", "show").stdout.splitlines():
            m = _TARGET_RE.match(raw)
            if m:
                cur = TargetState(iqn=m.group(2))
                out[cur.iqn] = (int(m.group(1)), cur)
                section = ""
                continue
            if cur is None:
                continue
            line = raw.strip()
            if raw.startswith("    ") and not raw.startswith("     ") and line.endswith(":"):
                section = line[:-1]
            elif section == "I_T nexus information" and line.startswith("Initiator:"):
                cur.sessions.append(line.split()[1])
            elif section == "ACL information" and line:
                cur.acls.append(line)
            elif section == "LUN information" and line.startswith("Backing store path:"):
                path = line.split(":", 1)[1].strip()
                if path != "None":
                    cur.backing = path
        return out

    def _tid(self, iqn: str) -> Optional[int]:
        hit = self._show().get(iqn)
        return hit[0] if hit else None

    def probe(self) -> None:
        self._show()

    def ensure_target(self, iqn: str, backing: str, size_bytes: int, portals: Sequence[Portal], chap: bool) -> None:
        # portals: tgtd listens where it was started (--iscsi portal=...); nothing per target.
        with self._lock:
            targets = self._show()
            if iqn in targets:
                tid, st = targets[iqn]
            else:
                tid = max((t for t, _ in targets.values()), default=0) + 1
                self._adm("--mode", "target", "--op", "new", "--tid", str(tid), "--targetname", iqn)
                st = TargetState(iqn)
            if not st.backing:
                self._adm("--mode", "logicalunit", "--op", "new", "--tid", str(tid), "--lun", str(self.lun),
                          "--backing-store", backing)
            elif st.backing != backing:
                raise Internal(f"target {iqn} exports {st.backing}, expected {backing}")

    def remove_target(self, iqn: str) -> None:
        with self._lock:
            tid = self._tid(iqn)
            if tid is None:
                return
            # no new logins, then drop the sessions: a LU with commands in flight refuses deletion for a moment
            for acl in (self._show().get(iqn, (0, TargetState(iqn)))[1].acls):
                self._adm("--mode", "target", "--op", "unbind", "--tid", str(tid), "--initiator-name", acl)
            for attempt in range(50):
                try:
                    self._adm("--mode", "target", "--op", "delete", "--force", "--tid", str(tid))
                    break
                except CommandError as e:
                    if "still active" not in (e.stderr or "") or attempt == 49:
                        raise
                    self._close_connections(tid)
                    time.sleep(0.1)
        self._delete_account(_tgt_user_for(iqn))

    def _close_connections(self, tid: int) -> None:
        sid = None
        for line in self._adm("--mode", "conn", "--op", "show", "--tid", str(tid), check=False).stdout.splitlines():
            parts = line.split(":", 1)
            if len(parts) != 2:
                continue
            key, value = parts[0].strip(), parts[1].strip()
            if key == "Session":
                sid = value
            elif key == "Connection" and sid is not None:
                self._adm("--mode", "conn", "--op", "delete", "--tid", str(tid), "--sid", sid, "--cid", value,
                          check=False)

    def state(self, iqn: str) -> Optional[TargetState]:
        hit = self._show().get(iqn)
        return hit[1] if hit else None

    def list_targets(self, prefix: str) -> list[str]:
        return sorted(i for i in self._show() if i.startswith(prefix))

    def _accounts(self) -> list[str]:
        lines = self._adm("--mode", "account", "--op", "show").stdout.splitlines()
        return [ln.strip() for ln in lines[1:] if ln.strip()]

    def _delete_account(self, user: str) -> None:
        if user in self._accounts():
            self._adm("--mode", "account", "--op", "delete", "--user", user)

    def add_acl(self, iqn: str, initiator: str, chap: Optional[Chap], readonly: bool = False) -> int:
        """tgt's ACLs are per target, not per LUN: a read-only publish is given a second LU over the same backing
        store with tgt's `readonly` flag (writes to it fail at the target). The initiator could still address
        the writable LUN with its own tools; LIO, which masks LUNs per initiator, enforces it completely."""
        tid = self._tid(iqn)
        if tid is None:
            raise NotFound(f"target {iqn} is not exported")
        st = self.state(iqn)
        assert st is not None
        lun = self.lun
        if readonly:
            lun = self.ro_lun
            with self._lock:
                if self.ro_lun not in self._luns(tid):
                    self._adm("--mode", "logicalunit", "--op", "new", "--tid", str(tid), "--lun", str(self.ro_lun),
                              "--backing-store", st.backing)
                self._adm("--mode", "logicalunit", "--op", "update", "--tid", str(tid), "--lun", str(self.ro_lun),
                          "--params", "readonly=1")
        if chap is not None:
            # tgt accounts are global and bound to targets; the password cannot be read back, so (re)create it:
            # the backend derives the same credentials on every publish, so this is a no-op in effect.
            self._delete_account(chap.user)
            self._adm("--mode", "account", "--op", "new", "--user", chap.user, "--password", chap.password)
            self._adm("--mode", "account", "--op", "bind", "--tid", str(tid), "--user", chap.user)
        if initiator not in st.acls:
            self._adm("--mode", "target", "--op", "bind", "--tid", str(tid), "--initiator-name", initiator)
        return lun

    def _luns(self, tid: int) -> list[int]:
        """LUN numbers of target `tid`."""
        out = self._adm("--mode", "target", "--op", "show").stdout.splitlines()
        luns: list[int] = []
        cur = None
        for raw in out:
            m = _TARGET_RE.match(raw)
            if m:
                cur = int(m.group(1))
            elif cur == tid and raw.strip().startswith("LUN:"):
                luns.append(int(raw.split(":", 1)[1]))
        return luns

    def remove_acl(self, iqn: str, initiator: Optional[str]) -> None:
        st = self.state(iqn)
        tid = self._tid(iqn)
        if st is None or tid is None:
            return
        for acl in list(st.acls):
            if initiator is None or acl == initiator:
                self._adm("--mode", "target", "--op", "unbind", "--tid", str(tid), "--initiator-name", acl)

    def refresh_size(self, iqn: str, backing: str, size_bytes: int) -> None:
        # tgtd reads the size when the LU is added; re-adding it is the only way to show a grown backing store.
        with self._lock:
            tid = self._tid(iqn)
            if tid is None:
                return
            for lun in [n for n in self._luns(tid) if n in (self.lun, self.ro_lun)]:
                self._adm("--mode", "logicalunit", "--op", "delete", "--tid", str(tid), "--lun", str(lun))
                self._adm("--mode", "logicalunit", "--op", "new", "--tid", str(tid), "--lun", str(lun),
                          "--backing-store", backing)
                if lun == self.ro_lun:
                    self._adm("--mode", "logicalunit", "--op", "update", "--tid", str(tid), "--lun", str(lun),
                              "--params", "readonly=1")


def _tgt_user_for(iqn: str) -> str:
    """The CHAP user name the backend uses for a target (the volume id, last IQN component)."""
    return iqn.rsplit(":", 1)[-1]


# ---- LIO ----------------------------------------------------------------------------------------------------------

class LioDriver(TargetDriver):
    """The kernel target through rtslib-fb (needs configfs and the target_core/iscsi_target_mod modules).

    Backstores are named after the volume (the IQN's last component): `block` for LVs, `fileio` for files (fileio
    takes the size at creation, so growing a file-backed LUN means re-creating the backstore; the backend therefore
    allows only offline expansion for LIO on files). TPG 1 carries the portals, `generate_node_acls=0` so only ACLs
    get in, and `authentication` follows the CHAP setting."""

    lun = 0

    def __init__(self) -> None:
        try:
            import rtslib_fb  # noqa: F401  (import errors surface as BackendUnavailable at probe time)
        except ImportError as e:  # pragma: no cover - packaging
            raise BackendUnavailable(f"python3-rtslib-fb is not installed: {e}") from None
        self._lock = threading.Lock()

    @staticmethod
    def _rts():  # type: ignore[no-untyped-def]
        import rtslib_fb
        # RTSRoot() points LIO's dbroot (persistent reservations, ALUA state) at this directory and fails when it
        # is missing, which it is on hosts without targetcli installed.
        os.makedirs("/etc/rtslib-fb-target", exist_ok=True)
        return rtslib_fb

    def _fabric(self):  # type: ignore[no-untyped-def]
        rts = self._rts()
        try:
            return rts.FabricModule("iscsi")
        except Exception as e:
            raise BackendUnavailable(f"the LIO iSCSI fabric is unavailable (configfs / iscsi_target_mod): {e}") from None

    def _target(self, iqn: str):  # type: ignore[no-untyped-def]
        rts = self._rts()
        try:
            return rts.Target(self._fabric(), iqn, mode="lookup")
        except rts.utils.RTSLibNotInCFS:
            return None

    def _tpg(self, iqn: str):  # type: ignore[no-untyped-def]
        t = self._target(iqn)
        if t is None:
            return None
        rts = self._rts()
        try:
            return rts.TPG(t, 1, mode="lookup")
        except rts.utils.RTSLibNotInCFS:
            return None

    def probe(self) -> None:
        self._fabric()

    def _storage_object(self, name: str, backing: str, size_bytes: int):  # type: ignore[no-untyped-def]
        rts = self._rts()
        for so in rts.RTSRoot().storage_objects:
            if so.name == name:
                return so
        if backing.startswith("/dev/"):
            return rts.BlockStorageObject(name, dev=backing)
        return rts.FileIOStorageObject(name, dev=backing, size=size_bytes, write_back=False)

    def ensure_target(self, iqn: str, backing: str, size_bytes: int, portals: Sequence[Portal], chap: bool) -> None:
        rts = self._rts()
        name = _tgt_user_for(iqn)
        with self._lock:
            so = self._storage_object(name, backing, size_bytes)
            target = rts.Target(self._fabric(), iqn, mode="any")
            tpg = rts.TPG(target, 1, mode="any")
            tpg.set_attribute("generate_node_acls", "0")
            tpg.set_attribute("demo_mode_write_protect", "1")
            tpg.set_attribute("authentication", "1" if chap else "0")
            have = {(p.ip_address, int(p.port)) for p in tpg.network_portals}
            for p in portals:
                if (p.host, p.port) not in have:
                    rts.NetworkPortal(tpg, p.host, p.port, mode="create")
            if not any(lun.lun == self.lun for lun in tpg.luns):
                rts.LUN(tpg, self.lun, storage_object=so)
            tpg.enable = True

    def remove_target(self, iqn: str) -> None:
        rts = self._rts()
        with self._lock:
            t = self._target(iqn)
            if t is not None:
                t.delete()
            name = _tgt_user_for(iqn)
            for so in list(rts.RTSRoot().storage_objects):
                if so.name == name:
                    so.delete()

    def state(self, iqn: str) -> Optional[TargetState]:
        tpg = self._tpg(iqn)
        if tpg is None:
            return None
        st = TargetState(iqn)
        for lun in tpg.luns:
            if lun.lun == self.lun:
                st.backing = lun.storage_object.udev_path
        for acl in tpg.node_acls:
            st.acls.append(acl.node_wwn)
            sess = acl.session
            if sess and sess.get("state") == "LOGGED_IN":
                st.sessions.append(acl.node_wwn)
        return st

    def list_targets(self, prefix: str) -> list[str]:
        return sorted(t.wwn for t in self._fabric().targets if t.wwn.startswith(prefix))

    def add_acl(self, iqn: str, initiator: str, chap: Optional[Chap], readonly: bool = False) -> int:
        """LIO maps LUNs per initiator: a read-only publish maps the LUN write-protected for that initiator alone
        (its SCSI disk reports write protect; WRITEs fail at the target), others keep theirs."""
        rts = self._rts()
        tpg = self._tpg(iqn)
        if tpg is None:
            raise NotFound(f"target {iqn} is not exported")
        acl = rts.NodeACL(tpg, initiator, mode="any")
        if chap is not None:
            acl.chap_userid = chap.user
            acl.chap_password = chap.password
        for m in list(acl.mapped_luns):
            if m.mapped_lun == self.lun and bool(m.write_protect) != readonly:
                m.delete()  # published before with the other setting (the backend refuses that while in use)
        if not any(m.mapped_lun == self.lun for m in acl.mapped_luns):
            lun = next(lun for lun in tpg.luns if lun.lun == self.lun)
            rts.MappedLUN(acl, self.lun, tpg_lun=lun, write_protect=readonly)
        return self.lun

    def remove_acl(self, iqn: str, initiator: Optional[str]) -> None:
        tpg = self._tpg(iqn)
        if tpg is None:
            return
        for acl in list(tpg.node_acls):
            if initiator is None or acl.node_wwn == initiator:
                acl.delete()

    def refresh_size(self, iqn: str, backing: str, size_bytes: int) -> None:
        # iblock reads the block device's size on every READ CAPACITY: nothing to do for LVs. fileio fixes the
        # size at creation: re-create the backstore (only reached with no ACLs: the backend refuses online growth).
        if backing.startswith("/dev/"):
            return
        rts = self._rts()
        with self._lock:
            tpg = self._tpg(iqn)
            name = _tgt_user_for(iqn)
            if tpg is not None:
                for lun in list(tpg.luns):
                    lun.delete()
            for so in list(rts.RTSRoot().storage_objects):
                if so.name == name:
                    so.delete()
            so = rts.FileIOStorageObject(name, dev=backing, size=size_bytes, write_back=False)
            if tpg is not None:
                rts.LUN(tpg, self.lun, storage_object=so)
