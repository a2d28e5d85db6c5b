#!/usr/bin/env python3
"""A throw-away Ceph cluster (one mon, one memstore OSD, optional mgr) under one directory, for tests and benches.

Why this exists: the RBD backend must be proven against real Ceph, and a developer's machine or a CI runner has no
cluster. Debian's ceph packages can run a complete one as plain child processes, with data in RAM, bound to
127.0.0.1 on free non-default ports, with every path Ceph would take from /etc/ceph, /var/lib/ceph, /var/run/ceph or
/var/log/ceph pointed inside the directory. It is ready in a few seconds and stops in under one.

    python tests/ceph/cluster.py start DIR [--mgr]    # bootstrap (or restart the daemons of) a cluster in DIR
    python tests/ceph/cluster.py env DIR              # shell lines: export CEPH_CONF=... (for rbd/ceph/rados CLIs)
    python tests/ceph/cluster.py stop DIR             # stop the daemons by PID (OSD first, then mgr, then mon)

State lives in DIR/cluster.json, so `stop` and `env` work from another process. `start` on a directory that
already holds a stopped cluster restarts its daemons (the memstore OSD keeps its data across a clean stop because
`osd fast shutdown = false`).
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Optional

POOL = "rbd"
CSI_USER = "csi"
STATE_FILE = "cluster.json"
# How long a client of this cluster waits for a mon/OSD before giving up (seconds). Without these a client on
# a stopped cluster blocks forever.
CLIENT_TIMEOUT = 10


def _gen_key() -> str:
    """A cephx secret in the format ceph-authtool --gen-print-key prints (type, created, length, 16 random bytes);
    made here so bootstrapping needs no extra process per key."""
    secret = os.urandom(16)
    header = struct.pack("<hiih", 1, int(time.time()), 0, len(secret))
    return base64.b64encode(header + secret).decode()


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_ports(count: int) -> int:
    """A base port such that base..base+count-1 are free (random, so parallel clusters rarely even try the same)."""
    for _ in range(200):
        base = random.randrange(20000, 60000 - count)
        if all(_port_free(p) for p in range(base, base + count)):
            return base
    raise RuntimeError("no free port range found on 127.0.0.1")


def _write_keyring(path: str, entity: str, key: str, caps: dict[str, str]) -> None:
    lines = [f"[{entity}]", f"\tkey = {key}"]
    lines += [f'\tcaps {k} = "{v}"' for k, v in caps.items()]
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write("\n".join(lines) + "\n")


@dataclass
class Cluster:
    """Everything a test needs to reach the cluster. `monitors` is the comma-separated v1 address list that
    librados, the rbd CLI and krbd all accept."""
    dir: str
    fsid: str
    mon_port_v2: int
    mon_port_v1: int
    port_min: int
    port_max: int
    admin_key: str
    csi_key: str
    osd_uuid: str
    osd_key: str
    mgr_key: str
    pool: str = POOL
    pids: dict[str, int] = field(default_factory=dict)
    with_mgr: bool = False

    # ---- paths -------------------------------------------------------------------------------------------------
    @property
    def conf(self) -> str:
        return os.path.join(self.dir, "ceph.conf")

    @property
    def monitors(self) -> str:
        return self.mon_host

    @property
    def mon_host(self) -> str:
        return f"[v2:127.0.0.1:{self.mon_port_v2},v1:127.0.0.1:{self.mon_port_v1}]"

    @property
    def admin_keyring(self) -> str:
        return os.path.join(self.dir, "ceph.client.admin.keyring")

    @property
    def csi_keyring(self) -> str:
        return os.path.join(self.dir, f"ceph.client.{CSI_USER}.keyring")

    @property
    def csi_user(self) -> str:
        return CSI_USER

    @property
    def log_dir(self) -> str:
        return os.path.join(self.dir, "log")

    def save(self) -> None:
        tmp = os.path.join(self.dir, STATE_FILE + ".tmp")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(asdict(self), f, indent=1)
        os.replace(tmp, os.path.join(self.dir, STATE_FILE))

    @classmethod
    def load(cls, directory: str) -> "Cluster":
        with open(os.path.join(directory, STATE_FILE)) as f:
            return cls(**json.load(f))

    def env(self) -> dict[str, str]:
        """Environment for the ceph/rbd/rados CLIs (the conf names the admin keyring)."""
        return {"CEPH_CONF": self.conf}

    # ---- configuration -----------------------------------------------------------------------------------------
    def write_conf(self) -> None:
        d = self.dir
        conf = f"""# written by tests/ceph/cluster.py: a throw-away test cluster, everything inside {d}
[global]
fsid = {self.fsid}
mon host = {self.mon_host}
mon initial members = a
public addr = 127.0.0.1
ms bind ipv6 = false
ms bind port min = {self.port_min}
ms bind port max = {self.port_max}
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
run dir = {d}/run
admin socket = {d}/run/$cluster-$name.$pid.asok
log file = {d}/log/$cluster-$name.log
crash dir = {d}/crash
keyring = {d}/ceph.$name.keyring
log to stderr = false
err to stderr = false
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon warn on pool no redundancy = false
mon allow pool delete = true
osd crush chooseleaf type = 0
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon osd initial require min compat client = mimic
mon data avail warn = 1
mon data avail crit = 0
mon mgr mkfs grace = 100000
mon osd down out interval = 0
client mount timeout = {CLIENT_TIMEOUT}
rados mon op timeout = {CLIENT_TIMEOUT}
rados osd op timeout = {CLIENT_TIMEOUT}

[mon]
mon data = {d}/mon.$id
keyring = {d}/mon.keyring
paxos propose interval = 0.01
mon cluster log file = {d}/log/$cluster.log

[osd]
osd data = {d}/osd.$id
keyring = {d}/osd.$id/keyring
osd objectstore = memstore
memstore device bytes = {4 << 30}
osd fast shutdown = false
osd max object name len = 256
osd max object namespace len = 64
osd op complaint time = 120
# A client killed with SIGKILL keeps its watches (and an image's exclusive lock) until this expires; 30 s by
# default. Tests kill processes on purpose, so expire them sooner.
osd client watch timeout = 5

[mgr]
mgr data = {d}/mgr.$id
keyring = {d}/mgr.$id/keyring

[client]
log file = {d}/log/$cluster-$name.$pid.log
"""
        with open(self.conf, "w") as f:
            f.write(conf)

    # ---- daemons -----------------------------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(os.path.join(self.log_dir, f"{name}.stdout"), "ab")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        out.close()
        self.pids[name] = proc.pid
        self.save()

    def _alive(self, name: str) -> bool:
        pid = self.pids.get(name)
        if not pid:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        try:  # a zombie child of this process counts as gone
            done, _ = os.waitpid(pid, os.WNOHANG)
            return done == 0
        except ChildProcessError:
            return True

    def start_mon(self) -> None:
        if not self._alive("mon"):
            self._spawn("mon", ["ceph-mon", "-f", "-i", "a", "-c", self.conf])

    def start_osd(self) -> None:
        if not self._alive("osd"):
            self._spawn("osd", ["ceph-osd", "-f", "-i", "0", "-c", self.conf])

    def start_mgr(self) -> None:
        if not self._alive("mgr"):
            os.makedirs(os.path.join(self.dir, "mgr.x"), exist_ok=True)
            _write_keyring(os.path.join(self.dir, "mgr.x", "keyring"), "mgr.x", self.mgr_key, {})
            self._spawn("mgr", ["ceph-mgr", "-f", "-i", "x", "-c", self.conf])
        self.with_mgr = True
        self.save()

    def stop_daemon(self, name: str, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; a daemon that is already gone is fine."""
        pid = self.pids.get(name)
        if not pid:
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            self.pids.pop(name, None)
            self.save()
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._alive(name):
            time.sleep(0.02)
        if self._alive(name):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            while self._alive(name):
                time.sleep(0.02)
        self.pids.pop(name, None)
        self.save()

    def stop(self) -> None:
        """OSD first: a mon stopped before the OSD makes the OSD wait 5 s for it on shutdown. Clients that serve
        block I/O to the kernel go first of all (see `release_block_clients`)."""
        self.release_block_clients()
        for name in ("osd", "mgr", "mon"):
            self.stop_daemon(name)

    def release_block_clients(self) -> list[int]:
        """SIGKILL every rbd-fuse and rbd-nbd process still serving an image of this cluster.

        Why: such a daemon outliving its cluster waits on RADOS forever, and so does every I/O the kernel sends it —
        a loop device over an rbd-fuse file, an nbd device, and then every `sync` on the machine, in D state, for
        good (seen: a test run interrupted with its volumes still staged hung later runs and unrelated tests). A
        killed FUSE daemon closes /dev/fuse, which aborts its connection; a killed rbd-nbd closes the nbd socket:
        the pending I/O then fails instead of hanging. Returns the PIDs killed."""
        marks = (self.dir, f"127.0.0.1:{self.mon_port_v1}", f"127.0.0.1:{self.mon_port_v2}")
        killed = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().decode(errors="replace").split("\0")
            except OSError:
                continue
            if not argv or os.path.basename(argv[0]) not in ("rbd-fuse", "rbd-nbd"):
                continue
            if any(m in arg for arg in argv for m in marks):
                try:
                    os.kill(int(entry), signal.SIGKILL)
                    killed.append(int(entry))
                except ProcessLookupError:
                    pass
        return killed

    def start(self, timeout: float = 60.0) -> None:
        """(Re)start the daemons of an existing cluster and wait until it serves I/O."""
        self.start_mon()
        self.start_osd()
        if self.with_mgr:
            self.start_mgr()
        self.wait_ready(timeout)

    # ---- client side -------------------------------------------------------------------------------------------
    def rados(self, user: str = "admin", timeout: int = CLIENT_TIMEOUT):
        """A connected rados.Rados (the caller shuts it down)."""
        import rados
        keyring = self.admin_keyring if user == "admin" else self.csi_keyring
        r = rados.Rados(rados_id=user, conffile=self.conf, conf={"keyring": keyring})
        r.connect(timeout=timeout)
        return r

    def mon_command(self, r, prefix: str, inbuf: bytes = b"", **args) -> dict:
        cmd = dict(args, prefix=prefix, format="json")
        ret, out, err = r.mon_command(json.dumps(cmd), inbuf, timeout=CLIENT_TIMEOUT)
        if ret != 0:
            raise RuntimeError(f"ceph {prefix}: {err} (ret {ret})")
        return json.loads(out) if out.strip() else {}

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until the OSD is up and the pool takes writes (and, with a mgr, pool stats are reported)."""
        import rados
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            for name in ("mon", "osd") + (("mgr",) if self.with_mgr else ()):
                if not self._alive(name):
                    raise RuntimeError(f"ceph {name} exited; see {self.log_dir}")
            try:
                r = self.rados(timeout=5)
                try:
                    st = self.mon_command(r, "osd stat")
                    if st.get("num_up_osds") == 1 and st.get("num_in_osds") == 1 and r.pool_exists(self.pool):
                        with r.open_ioctx(self.pool) as io:
                            io.write_full("tessera-ready-probe", b"x")
                            if not self.with_mgr or r.get_cluster_stats()["kb"] > 0:
                                return
                finally:
                    r.shutdown()
            except (rados.Error, RuntimeError) as e:
                last = e
            time.sleep(0.1)
        raise TimeoutError(f"ceph cluster in {self.dir} not ready after {timeout:.0f}s (last: {last})")


def bootstrap(directory: str, mgr: bool = False, timeout: float = 60.0) -> Cluster:
    """Create a fresh cluster in `directory` (must be empty or missing) and wait until RBD images can be made."""
    import rados
    import rbd
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    if os.path.exists(os.path.join(directory, STATE_FILE)):
        raise FileExistsError(f"{directory} already holds a cluster; use start to restart it")
    for sub in ("run", "log", "crash", "osd.0", "mon.a"):
        os.makedirs(os.path.join(directory, sub), exist_ok=True)
    base = _pick_ports(40)
    c = Cluster(dir=directory, fsid=str(uuid.uuid4()), mon_port_v2=base, mon_port_v1=base + 1, port_min=base + 2,
                port_max=base + 39, admin_key=_gen_key(), csi_key=_gen_key(), osd_uuid=str(uuid.uuid4()),
                osd_key=_gen_key(), mgr_key=_gen_key(), with_mgr=mgr)
    c.write_conf()
    c.save()
    # Keyrings: the mon keyring (outside the mon data dir) also seeds the auth database with admin and mgr.
    mon_keyring = os.path.join(directory, "mon.keyring")
    admin_caps = {"mon": "allow *", "osd": "allow *", "mgr": "allow *", "mds": "allow *"}
    with open(os.open(mon_keyring, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(f'[mon.]\n\tkey = {_gen_key()}\n\tcaps mon = "allow *"\n')
        f.write(f"[client.admin]\n\tkey = {c.admin_key}\n" + "".join(f'\tcaps {k} = "{v}"\n' for k, v in admin_caps.items()))
        f.write(f'[mgr.x]\n\tkey = {c.mgr_key}\n\tcaps mon = "allow profile mgr"\n\tcaps osd = "allow *"\n'
                f'\tcaps mds = "allow *"\n')
    _write_keyring(c.admin_keyring, "client.admin", c.admin_key, admin_caps)
    _write_keyring(c.csi_keyring, f"client.{CSI_USER}", c.csi_key, {})
    monmap = os.path.join(directory, "monmap")
    subprocess.run(["monmaptool", "--create", "--fsid", c.fsid, "--addv", "a", c.mon_host, monmap],
                   check=True, capture_output=True)
    subprocess.run(["ceph-mon", "--mkfs", "-i", "a", "--monmap", monmap, "--keyring", mon_keyring, "-c", c.conf],
                   check=True, capture_output=True)
    c.start_mon()
    # The OSD's key must be known to the mon before `ceph-osd --mkfs`, which fetches its config from the mon.
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = c.rados(timeout=5)
            break
        except rados.Error:
            if time.monotonic() > deadline or not c._alive("mon"):
                raise
            time.sleep(0.05)
    try:
        c.mon_command(r, "osd new", json.dumps({"cephx_secret": c.osd_key}).encode(), uuid=c.osd_uuid, id=0)
        _write_keyring(os.path.join(directory, "osd.0", "keyring"), "osd.0", c.osd_key, {})
        subprocess.run(["ceph-osd", "--mkfs", "-i", "0", "--osd-uuid", c.osd_uuid, "-c", c.conf],
                       check=True, capture_output=True, timeout=timeout)
        c.start_osd()
        if mgr:
            c.start_mgr()
        c.mon_command(r, "osd pool create", pool=c.pool, pg_num=8, pgp_num=8)
        c.mon_command(r, "osd pool application enable", pool=c.pool, app="rbd")
        # Least privilege for the driver: exactly what ceph documents for RBD clients.
        c.mon_command(r, "auth import", _keyring_text(f"client.{CSI_USER}", c.csi_key, {
            "mon": "profile rbd", "osd": f"profile rbd pool={c.pool}", "mgr": f"profile rbd pool={c.pool}"}).encode())
    finally:
        r.shutdown()
    c.wait_ready(timeout)
    r = c.rados()
    try:
        with r.open_ioctx(c.pool) as io:
            rbd.RBD().pool_init(io, True)
            rbd.RBD().create(io, "tessera-probe", 1 << 20)
            rbd.RBD().remove(io, "tessera-probe")
    finally:
        r.shutdown()
    return c


def _keyring_text(entity: str, key: str, caps: dict[str, str]) -> str:
    return f"[{entity}]\n\tkey = {key}\n" + "".join(f'\tcaps {k} = "{v}"\n' for k, v in caps.items())


def start(directory: str, mgr: bool = False, timeout: float = 60.0) -> Cluster:
    """Bootstrap a new cluster, or restart the daemons of the one already in `directory`."""
    if os.path.exists(os.path.join(directory, STATE_FILE)):
        c = Cluster.load(os.path.abspath(directory))
        if mgr:
            c.with_mgr = True
        c.start(timeout)
        return c
    return bootstrap(directory, mgr=mgr, timeout=timeout)


def stop(directory: str) -> None:
    Cluster.load(os.path.abspath(directory)).stop()


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="bootstrap or restart a cluster in DIR")
    s.add_argument("dir")
    s.add_argument("--mgr", action="store_true", help="also run a ceph-mgr (needed for pool usage statistics)")
    sub.add_parser("stop", help="stop the cluster in DIR").add_argument("dir")
    sub.add_parser("env", help="print shell exports for the ceph/rbd CLIs").add_argument("dir")
    sub.add_parser("info", help="print the cluster facts as JSON (includes keys)").add_argument("dir")
    a = p.parse_args(argv)
    if a.cmd == "start":
        t0 = time.monotonic()
        c = start(a.dir, mgr=a.mgr)
        print(f"ceph cluster ready in {time.monotonic() - t0:.1f}s: monitors {c.monitors}, pool {c.pool}, "
              f"conf {c.conf}, user client.{c.csi_user} keyring {c.csi_keyring}", file=sys.stderr)
        # The daemons run in their own sessions; they outlive this command until `stop`.
    elif a.cmd == "stop":
        stop(a.dir)
    elif a.cmd == "env":
        c = Cluster.load(os.path.abspath(a.dir))
        for k, v in c.env().items():
            print(f"export {k}={v}")
    elif a.cmd == "info":
        c = Cluster.load(os.path.abspath(a.dir))
        print(json.dumps({"monitors": c.monitors, "conf": c.conf, "pool": c.pool, "admin_keyring": c.admin_keyring,
                          "csi_user": c.csi_user, "csi_keyring": c.csi_keyring, "pids": c.pids}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
