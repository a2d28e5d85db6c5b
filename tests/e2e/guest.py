#!/usr/bin/env python3
"""Boot one real-kernel guest over the host's root filesystem, run one command in it, and report.

Why: the host kernel of CI machines has no device-mapper, iSCSI initiator/target, rbd or nbd, and cannot load modules;
Debian's own 6.1 kernels can. The guest's root is the host `/`, read-only, under a tmpfs overlay, so the project's
venv (/work/main/.venv or wherever it lives) and every host tool appear at the same paths, writes go to guest RAM,
and the host cannot be changed — except one shared directory, mounted read-write at its own path, which carries
`spec.json` in and `status.json`, junit XML and logs out.

Guests (`TESSERA_GUEST`, or `--kind`):
- `uml` (default): User-Mode Linux, Debian's /usr/bin/linux.uml (6.1), modules from /usr/lib/uml/modules/<ver>
  bound at /lib/modules/<ver>; root through hostfs; extra disks as /dev/ubdb, /dev/ubdc, ... from host sparse files;
  guest RAM in a file on /dev/shm (TMPDIR); `uml_dir=`/`umid=` keep its control socket out of ~/.uml.
- `qemu`: QEMU booting Debian's linux-image-amd64 with a generated busybox initramfs that mounts the host root over
  9p. TCG unless the host has a working KVM (kvm_intel/kvm_amd loaded; `/dev/kvm` alone is not enough — PVM-style
  KVM fails on stock kernels). Disks are virtio: /dev/vda, /dev/vdb, ... (no root disk)
The output says which ran ("tessera-guest: kind=uml" / "kind=qemu-tcg" / "kind=qemu-kvm").

UML and big XSAVE areas: UML 6.1 moves FPU state with PTRACE_SETREGSET(NT_X86_XSTATE) using a fixed-size buffer;
on a host with AVX-512/AMX/PKU the kernel wants the full (larger) size and fails with EFAULT, killing the guest at
its first process ("ptrace set fp regs failed, errno = 14"). Workaround (`TESSERA_UML_XSTATE=auto|fxsr|native`):
a seccomp filter makes UML's probe PTRACE_GETREGSET(NT_X86_XSTATE) fail, so UML falls back to
PTRACE_GETFPREGS/SETFPREGS (x87+SSE state only); and because UML then no longer switches AVX state between guest
processes (they share one host process), glibc and OpenSSL in the guest are told not to use AVX
(GLIBC_TUNABLES / OPENSSL_ia32cap on the kernel command line). Programs that use AVX on their own in the guest could
still see their vector registers clobbered; QEMU/TCG is the cross-check without that caveat.

Command line:
    tests/e2e/guest.py [--kind uml|qemu] [--timeout S] [--shared DIR] [--disk SIZE_MIB ...] -- argv...
exits with the command's status (or 2 when the guest died / timed out, with a message saying so).
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence, TextIO

HERE = os.path.dirname(os.path.abspath(__file__))
INIT = os.path.join(HERE, "guest_init.sh")
UML_BINARY = "/usr/bin/linux.uml"
UML_MODULES = "/usr/lib/uml/modules"

# Loaded in this order inside the guest; a module this kernel lacks is reported, not fatal (suites that need it fail).
# `cbc`: libceph needs cbc(aes) for the cephx key `rbd map` hands the kernel; a real node loads it on demand, the
# guest does not (without it: "rbd: failed to add secret ... (2) No such file or directory").
GUEST_MODULES = ["loop", "dm_mod", "dm_thin_pool", "dm_snapshot", "configfs", "target_core_mod", "iscsi_target_mod",
                 "target_core_iblock", "target_core_file", "iscsi_tcp", "sd_mod", "cbc", "rbd", "nbd"]

UML_SSE_ONLY_ENV = {
    "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX2,-AVX,-AVX_Fast_Unaligned_Load",
    "OPENSSL_ia32cap": "~0x1800000000000000:0",
}


class GuestError(Exception):
    """The guest could not be started at all (missing binary, bad arguments)."""


@dataclass
class GuestResult:
    kind: str                      # uml | qemu-tcg | qemu-kvm
    rc: int                        # the command's exit status; 124 on timeout; -1 if unknown (guest died)
    ok: bool                       # the command ran to completion and exited 0
    error: str = ""                # why it is not ok, for a person
    boot_seconds: float = 0.0      # host wall time from start to "ready" (modules, udev, iscsid done)
    total_seconds: float = 0.0
    status: dict = field(default_factory=dict)  # status.json written by the guest
    shared_dir: str = ""
    log_path: str = ""
    tail: list[str] = field(default_factory=list)  # last console lines, for error messages
    stalled: bool = False          # killed by the silence watchdog (`silence_limit`): the guest, not the command


def host_has_kvm() -> bool:
    """KVM only when a real kvm_intel/kvm_amd is loaded: a PVM-flavoured /dev/kvm boots stock kernels into failures."""
    return os.path.exists("/dev/kvm") and any(os.path.isdir(f"/sys/module/{m}") for m in ("kvm_intel", "kvm_amd"))


def choose_kind(kind: Optional[str] = None) -> str:
    kind = (kind or os.environ.get("TESSERA_GUEST") or "uml").lower()
    if kind not in ("uml", "qemu"):
        raise GuestError(f"unknown guest kind {kind!r} (TESSERA_GUEST=uml|qemu)")
    return kind


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def uml_needs_fxsr() -> bool:
    mode = os.environ.get("TESSERA_UML_XSTATE", "auto")
    if mode in ("fxsr", "native"):
        return mode == "fxsr"
    return bool(_cpu_flags() & {"avx512f", "amx_tile", "pku", "ospke"})


def _xstate_hider():
    """A preexec_fn installing a seccomp filter that returns EIO for ptrace(PTRACE_GETREGSET, pid, NT_X86_XSTATE, ...)
    (see module doc). Everything that loads or allocates (libc handle, BPF program) is made here, in the parent:
    the child, forked from a threaded process (parallel lanes), only calls prctl before exec."""
    libc = ctypes.CDLL(None, use_errno=True)
    ld, jeq, ret = 0x20, 0x15, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_RET|K
    allow, eio = 0x7FFF0000, 0x00050000 | 5
    prog = [(ld, 0, 0, 4), (jeq, 0, 6, 0xC000003E),   # arch == x86_64
            (ld, 0, 0, 0), (jeq, 0, 4, 101),          # nr == ptrace
            (ld, 0, 0, 16), (jeq, 0, 2, 0x4204),      # request == PTRACE_GETREGSET
            (ld, 0, 0, 32), (jeq, 1, 0, 0x202),       # addr == NT_X86_XSTATE
            (ret, 0, 0, allow), (ret, 0, 0, eio)]
    buf = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in prog))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog), ctypes.addressof(buf))
    fprog_ref = ctypes.byref(fprog)
    prctl = libc.prctl
    message = b"tessera-guest: cannot install the seccomp filter for UML\n"

    def hide() -> None:
        if prctl(38, 1, 0, 0, 0) != 0 or prctl(22, 2, fprog_ref, 0, 0) != 0:  # NO_NEW_PRIVS, SECCOMP
            os.write(2, message)
            os._exit(127)
    hide.keep = (buf, fprog)  # type: ignore[attr-defined]  # the filter's memory lives as long as the closure
    return hide


# Guests are started one at a time even when lanes run in parallel threads: fork+preexec from a threaded process
# is safest when no other thread is forking at the same moment.
_SPAWN_LOCK = threading.Lock()


# Paths where the guest mounts a fresh tmpfs of its own, hiding the host's content there.
GUEST_TMPFS = ("/tmp", "/var/tmp", "/run", "/dev/shm")


def exposed_dirs(cwd: str) -> list[str]:
    """Host directories the guest command needs (the repository with its venv, the working directory, the Python
    environment) that lie under one of the guest's own tmpfs mounts: guest_init.sh shows each again there as an
    overlay of the host's copy (a CI checkout under /tmp would otherwise vanish in the guest)."""
    repo = os.path.dirname(os.path.dirname(HERE))
    wanted = {os.path.realpath(p) for p in (repo, cwd, sys.prefix)}
    under = [p for p in wanted if any(p == t or p.startswith(t + "/") for t in GUEST_TMPFS)]
    for p in under:
        if any(c in p for c in " :\t\n"):
            raise GuestError(f"{p} must be shown in the guest but its path holds a space or colon; move it")
    # a directory inside another one listed needs no overlay of its own
    return sorted(p for p in under if not any(p != q and p.startswith(q + "/") for q in under))


def _make_disk(path: str, size_mib: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size_mib << 20)


def _uml_argv(shared: str, workdir: str, disks: Sequence[str], mem_mb: int, fxsr: bool,
              extra: Sequence[str] = ()) -> list[str]:
    if not os.access(UML_BINARY, os.X_OK):
        raise GuestError(f"{UML_BINARY} is missing: apt-get install user-mode-linux")
    argv = [UML_BINARY, f"mem={mem_mb}M", "rootfstype=hostfs", "rootflags=/", "ro", f"init={INIT}",
            f"uml_dir={workdir}", f"umid=g{os.getpid()}", "con=null", "con0=null,fd:1", "ssl=null", "quiet",
            f"TESSERA_SHARED={shared}", "TESSERA_KIND=uml", *extra]
    if fxsr:
        argv += [f"{k}={v}" for k, v in UML_SSE_ONLY_ENV.items()]
    for i, d in enumerate(disks, start=1):
        argv.append(f"ubd{i}={d}")
    return argv


def _boot(cmd: list[str], env: dict[str, str], workdir: str, preexec, log_path: str, tail: collections.deque,
          ready_at: list[float], stream: TextIO, t0: float, boot_timeout: float, timeout: float,
          silence_limit: Optional[float] = None) -> tuple[str, subprocess.Popen, bool]:
    """Start the guest once, stream its console, wait for it to finish; (error or "", the process, whether the
    silence watchdog killed it). Silence is measured on raw console bytes (pytest's progress dots count), from the
    moment the guest is ready."""
    with open(log_path, "w") as log:
        with _SPAWN_LOCK:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    env=env, cwd=workdir, start_new_session=True, preexec_fn=preexec)

        heard = [time.monotonic()]  # when the console last said anything

        def line_out(raw: bytes) -> None:
            line = raw.decode("utf-8", "replace").replace("\r", "")
            log.write(line)
            tail.append(line.rstrip("\n"))
            if not ready_at and "tessera-guest: ready after" in line:
                ready_at.append(time.monotonic() - t0)
            stream.write(line)
            stream.flush()

        def pump() -> None:
            assert proc.stdout is not None
            pending = b""
            while True:
                chunk = proc.stdout.read1(65536)
                if not chunk:
                    break
                heard[0] = time.monotonic()
                *lines, pending = (pending + chunk).split(b"\n")
                for raw in lines:
                    line_out(raw + b"\n")
            if pending:
                line_out(pending)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        deadline = t0 + boot_timeout + timeout + 60
        error = ""
        stalled = False
        try:
            while proc.poll() is None:
                now = time.monotonic()
                if not ready_at and now > t0 + boot_timeout:
                    error = f"guest did not get ready within {boot_timeout:.0f}s (boot hung?)"
                elif now > deadline:
                    error = f"guest did not finish within {deadline - t0:.0f}s"
                elif silence_limit and ready_at and now - heard[0] > silence_limit:
                    stalled = True
                    error = (f"guest console silent for {silence_limit:.0f}s after {now - t0:.0f}s: the guest "
                             "stalled (a UML guest whose clock stopped was seen so), killed")
                if error:
                    break
                time.sleep(0.2)
        finally:  # also on KeyboardInterrupt / a pytest-timeout: never leave a guest behind
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the guest, or helper processes UML left behind
            except ProcessLookupError:
                pass
            proc.wait()
            reader.join(timeout=5)
    return error, proc, stalled


def run_in_guest(argv: Sequence[str], *, shared_dir: Optional[str] = None, kind: Optional[str] = None,
                 timeout: float = 1200.0, boot_timeout: Optional[float] = None, env: Optional[dict[str, str]] = None,
                 cwd: Optional[str] = None, disks_mib: Sequence[int] = (), mem_mb: int = 1536,
                 modules: Sequence[str] = GUEST_MODULES, scratch_mib: int = 0,
                 stream: Optional[TextIO] = None, boot_attempts: int = 2,
                 silence_limit: Optional[float] = None) -> GuestResult:
    """Boot a guest, run `argv` in it (cwd defaults to the current directory, which the guest sees too), stream the
    console to `stream`, and return what happened. Never raises for guest failures: they are in the result.
    `scratch_mib` adds a first extra disk that the guest formats and mounts at /scratch ($TESSERA_SCRATCH).
    `silence_limit`: kill a ready guest whose console says nothing for that many seconds (result.stalled)."""
    kind = choose_kind(kind)
    if boot_timeout is None:  # UML is ready in ~6 s (60 s leaves room for a loaded host); QEMU/TCG needs minutes
        boot_timeout = 60.0 if kind == "uml" else 180.0
    stream = stream or sys.stdout
    own_shared = shared_dir is None
    shared = os.path.abspath(shared_dir or tempfile.mkdtemp(prefix="tessera-guest-"))
    os.makedirs(shared, exist_ok=True)
    for stale in ("status.json", "console.log"):
        try:
            os.unlink(os.path.join(shared, stale))
        except FileNotFoundError:
            pass
    workdir = tempfile.mkdtemp(prefix="tg-", dir="/tmp")  # short path: UML's mconsole socket lives here
    disks = []
    if scratch_mib:
        disks_mib = [scratch_mib] + list(disks_mib)
    for i, size in enumerate(disks_mib):
        path = os.path.join(workdir, f"disk{i}.img")
        _make_disk(path, size)
        disks.append(path)
    spec = {"argv": list(argv), "env": dict(env or {}), "cwd": cwd or os.getcwd(), "timeout": timeout,
            "modules": list(modules), "kind": kind, "scratch": bool(scratch_mib)}
    with open(os.path.join(shared, "spec.json"), "w") as f:
        json.dump(spec, f)

    boot_words = [f"TESSERA_EXPOSE={':'.join(exposed_dirs(spec['cwd']))}"]
    proc_env = dict(os.environ)
    proc_env["TMPDIR"] = "/dev/shm"  # UML maps guest RAM from a file in TMPDIR: keep it in RAM
    preexec = None
    if kind == "uml":
        fxsr = uml_needs_fxsr()
        cmd = _uml_argv(shared, workdir, disks, mem_mb, fxsr, boot_words)
        label = "uml"
        detail = f"User-Mode Linux {UML_BINARY}" + (" (FXSR-only FPU state: host XSAVE area too big for UML 6.1)"
                                                    if fxsr else "")
        if fxsr:
            preexec = _xstate_hider()
    else:
        from qemu_boot import qemu_argv  # local module next to this file
        cmd, label, detail = qemu_argv(shared, workdir, disks, mem_mb, use_kvm=host_has_kvm(), extra=boot_words)
    print(f"tessera-guest: kind={label} ({detail}); shared dir {shared}", file=stream, flush=True)

    log_path = os.path.join(shared, "console.log")
    tail: collections.deque[str] = collections.deque(maxlen=60)
    t_start = time.monotonic()
    for attempt in range(1, boot_attempts + 1):
        t0 = time.monotonic()
        ready_at: list[float] = []
        error, proc, stalled = _boot(cmd, proc_env, workdir, preexec, log_path, tail, ready_at, stream, t0,
                                     boot_timeout, timeout, silence_limit)
        if ready_at or attempt == boot_attempts:
            break
        # A boot that never reached "ready" ran nothing: seen once in ~40 boots (UML stalled before udev/scratch
        # setup with the host under load). Say so loudly and boot a fresh guest; a second hang is a failure.
        kept = os.path.join(shared, f"console-boot{attempt}.log")
        os.replace(log_path, kept)
        print(f"tessera-guest: boot attempt {attempt} hung ({error}); console kept in {kept}; booting again",
              file=stream, flush=True)
        for stale in ("status.json",):
            try:
                os.unlink(os.path.join(shared, stale))
            except FileNotFoundError:
                pass
    total = time.monotonic() - t_start
    status: dict = {}
    try:
        with open(os.path.join(shared, "status.json")) as f:
            status = json.load(f)
    except (OSError, ValueError):
        if not error:
            error = f"guest died before the command finished (exit {proc.returncode}); see {log_path}"
    rc = int(status.get("rc", -1)) if status else -1
    if stalled:
        pass  # the watchdog's words say what happened; nothing the guest wrote before it outranks them
    elif status.get("timed_out"):
        error = status.get("error") or "command timed out inside the guest"
    elif status.get("error") and not error:
        error = status["error"]
    shutil.rmtree(workdir, ignore_errors=True)
    result = GuestResult(kind=label, rc=rc, ok=not error and rc == 0, error=error,
                         boot_seconds=round(ready_at[0], 2) if ready_at else 0.0, total_seconds=round(total, 2),
                         status=status, shared_dir=shared, log_path=log_path, tail=list(tail), stalled=stalled)
    print(f"tessera-guest: kind={label} rc={rc} ready after {result.boot_seconds}s, total {result.total_seconds}s"
          + (f"; ERROR: {error}" if error else ""), file=stream, flush=True)
    if own_shared and result.ok:
        pass  # keep it: callers read junit files from it
    return result


def main(args: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", choices=["uml", "qemu"], default=None, help="default: $TESSERA_GUEST or uml")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds the command may run in the guest")
    p.add_argument("--shared", default=None, help="host dir mounted read-write in the guest (default: a temp dir)")
    p.add_argument("--disk", type=int, action="append", default=[], help="extra sparse disk of this many MiB")
    p.add_argument("--scratch", type=int, default=0, help="MiB of scratch disk mounted at /scratch in the guest")
    p.add_argument("--mem", type=int, default=1536, help="guest RAM in MiB")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE for the command")
    p.add_argument("argv", nargs="+")
    ns = p.parse_args(args)
    env = dict(e.split("=", 1) for e in ns.env)
    try:
        res = run_in_guest(ns.argv, shared_dir=ns.shared, kind=ns.kind, timeout=ns.timeout, disks_mib=ns.disk,
                           mem_mb=ns.mem, env=env, scratch_mib=ns.scratch)
    except GuestError as e:
        print(f"tessera-guest: {e}", file=sys.stderr)
        return 2
    if res.error:
        return 2
    return res.rc


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    sys.exit(main())
