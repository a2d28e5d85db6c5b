"""Stage 2 of the test guest: runs as PID 1 inside the overlay root (see guest_init.sh).

It prepares what a Kubernetes node would have — kernel modules, udev for the block subsystem, iscsid, configfs —
then runs the one command from spec.json with its output on the console (which the host streams), writes
`status.json` to the shared directory, and powers the guest off. It must never raise: a PID 1 that exits panics the
kernel, and the host would only see "guest died". Only the standard library and /usr/bin/python3 are used here.

spec.json: {"argv": [...], "env": {...}, "cwd": "...", "timeout": seconds, "modules": [...], "scratch": bool}
status.json: {"rc": int, "timed_out": bool, "error": str, "modules_loaded": [...], "modules_missing": [...],
              "boot_seconds": float, "setup_seconds": float, "command_seconds": float, "kernel": str}
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import traceback

GUEST_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LVM_SUPPRESS_FD_WARNINGS": "1",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TESSERA_IN_GUEST": "1",
}


def log(msg: str) -> None:
    print(f"tessera-guest: {msg}", flush=True)


def uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def quiet(argv: list[str], timeout: float = 60) -> int:
    try:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=timeout).returncode
    except (OSError, subprocess.TimeoutExpired) as e:
        log(f"{argv[0]}: {e}")
        return 255


def setup(spec: dict, env: dict[str, str], status: dict) -> list[subprocess.Popen]:
    daemons: list[subprocess.Popen] = []
    quiet(["hostname", "tessera-guest"])
    quiet(["ip", "link", "set", "lo", "up"])
    loaded, missing = [], []
    for mod in spec.get("modules", []):
        (loaded if quiet(["modprobe", mod]) == 0 else missing).append(mod)
    status["modules_loaded"], status["modules_missing"] = loaded, missing
    log(f"modules loaded: {' '.join(loaded) or '-'}; missing: {' '.join(missing) or '-'}")
    if os.path.isdir("/sys/kernel/config") and not os.path.ismount("/sys/kernel/config"):
        quiet(["mount", "-t", "configfs", "configfs", "/sys/kernel/config"])
    # udev: device nodes and /dev/<vg>/<lv>, /dev/disk/by-path links; trigger only block devices (a full coldplug
    # costs seconds for nothing).
    udevd = "/lib/systemd/systemd-udevd"
    log(f"setup: udev ({uptime():.1f}s)")  # the steps below are named so that a stalled boot shows where
    if os.path.exists(udevd):
        daemons.append(subprocess.Popen([udevd], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, env=env))
        quiet(["udevadm", "trigger", "--action=add", "--subsystem-match=block"])
        quiet(["udevadm", "settle", "--timeout=20"], timeout=30)
    # iscsid for the initiator tests; the guest gets its own initiator name (the overlay makes /etc writable).
    if os.path.exists("/usr/sbin/iscsid"):
        log(f"setup: iscsid ({uptime():.1f}s)")
        os.makedirs("/etc/iscsi", exist_ok=True)
        with open("/etc/iscsi/initiatorname.iscsi", "w") as f:
            f.write("InitiatorName=iqn.2026-01.dev.tessera:guest\n")
        daemons.append(subprocess.Popen(["/usr/sbin/iscsid", "-f"], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
    if spec.get("scratch"):
        log(f"setup: scratch disk ({uptime():.1f}s)")
        prepare_scratch(env)
    return daemons


def prepare_scratch(env: dict[str, str]) -> None:
    """The first extra disk becomes an ext4 at /scratch ($TESSERA_SCRATCH): room for loop files and test data
    that would otherwise sit in guest RAM."""
    for dev in ("/dev/ubdb", "/dev/vda"):  # UML: ubda is unused; QEMU: no root disk
        if os.path.exists(dev):
            os.makedirs("/scratch", exist_ok=True)
            if quiet(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-E", "lazy_itable_init=1", dev], 120) == 0 \
                    and quiet(["mount", "-o", "noatime", dev, "/scratch"]) == 0:
                env["TESSERA_SCRATCH"] = "/scratch"
                log(f"scratch: {dev} at /scratch")
                return
            log(f"scratch: could not prepare {dev}")
            return
    log("scratch: no extra disk attached")


def run_command(spec: dict, env: dict[str, str], status: dict) -> None:
    timeout = float(spec.get("timeout", 1200))
    t0 = time.monotonic()
    proc = subprocess.Popen(spec["argv"], cwd=spec.get("cwd") or "/", env=env, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        status["rc"] = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        status["timed_out"] = True
        status["error"] = f"command did not finish within {timeout:.0f}s inside the guest"
        log(status["error"])
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        status["rc"] = 124
    status["command_seconds"] = round(time.monotonic() - t0, 2)


def power_off() -> None:
    os.sync()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.reboot(0x4321FEDC)  # LINUX_REBOOT_CMD_POWER_OFF
    time.sleep(10)


def main() -> None:
    spec_path = sys.argv[1]
    status: dict = {"rc": 255, "timed_out": False, "error": "", "kernel": os.uname().release}
    shared = os.path.dirname(spec_path)
    daemons: list[subprocess.Popen] = []
    try:
        boot = uptime()
        status["boot_seconds"] = round(boot, 2)
        log(f"up: kernel {os.uname().release}, userspace reached after {boot:.2f}s (guest clock)")
        with open(spec_path) as f:
            spec = json.load(f)
        env = dict(GUEST_ENV)
        for key in ("GLIBC_TUNABLES", "OPENSSL_ia32cap"):  # set on the kernel command line for UML, see guest.py
            if os.environ.get(key):
                env[key] = os.environ[key]
        env.update(spec.get("env", {}))
        t0 = time.monotonic()
        daemons = setup(spec, env, status)
        status["setup_seconds"] = round(time.monotonic() - t0, 2)
        log(f"ready after {uptime():.2f}s; running: {' '.join(spec['argv'])}")
        run_command(spec, env, status)
        log(f"command exited {status['rc']} after {status['command_seconds']}s")
    except BaseException as e:  # PID 1 must reach power_off
        status["error"] = f"guest stage 2 failed: {e!r}"
        traceback.print_exc()
    finally:
        for d in daemons:
            try:
                d.kill()
            except OSError:
                pass
        try:
            tmp = os.path.join(shared, ".status.json.tmp")
            with open(tmp, "w") as f:
                json.dump(status, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(shared, "status.json"))
        except OSError as e:
            log(f"cannot write status.json: {e}")
        power_off()


if __name__ == "__main__":
    main()
