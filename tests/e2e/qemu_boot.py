"""QEMU flavour of the test guest: Debian's linux-image-amd64 with a tiny busybox initramfs, host root over 9p.

Why this exists next to UML: it is a real x86 kernel on emulated hardware (virtio, PCI, ACPI power-off), a
cross-check that the node code does not depend on UML quirks, and it has no FPU-state caveat. It is slower (TCG).

Stage 0 (the initramfs `/init`, busybox): load the virtio/9p/overlay modules (copied from /lib/modules with their
dependencies in modules.dep order), mount the host root read-only over 9p at /lower, and chroot into it to run
guest_init.sh — the same stage 1 as UML, with TESSERA_KIND=qemu (shared dir over 9p, modules at /lib/modules).

Boot speed: the bzImage's xz payload is extracted once into an uncompressed vmlinux (cached under
$XDG_CACHE_HOME or /var/tmp) and booted through its PVH entry point, which skips the in-guest decompression.
"""
from __future__ import annotations

import glob
import io
import lzma
import os
import shutil
import stat
from typing import Sequence

BUSYBOX = "/bin/busybox"
STAGE0_MODULES = ["virtio_pci", "virtio_blk", "9pnet_virtio", "9p", "overlay"]

INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /lower /bin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules/order); do insmod /modules/$m || echo "tessera-guest: stage 0: insmod $m failed"; done
if ! mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=524288,cache=loose hostroot /lower; then
    echo "tessera-guest: stage 0: cannot mount the host root over 9p"; poweroff -f
fi
umount /proc
exec chroot /lower "$TESSERA_INIT"
"""


def kernel_version() -> str:
    vers = sorted(os.path.basename(p)[len("vmlinuz-"):] for p in glob.glob("/boot/vmlinuz-*"))
    vers = [v for v in vers if os.path.isdir(f"/lib/modules/{v}")]
    if not vers:
        raise FileNotFoundError("no /boot/vmlinuz-* with modules in /lib/modules: apt-get install linux-image-amd64")
    return vers[-1]


def _cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or "/var/tmp"
    d = os.path.join(base, "tessera-guest")
    os.makedirs(d, exist_ok=True)
    return d


def vmlinux_for(version: str) -> str:
    """The uncompressed ELF kernel (PVH-bootable) for `version`, extracted from the bzImage once; falls back to the
    bzImage itself when it has no xz payload."""
    bz = f"/boot/vmlinuz-{version}"
    out = os.path.join(_cache_dir(), f"vmlinux-{version}")
    if os.path.exists(out) and os.path.getmtime(out) >= os.path.getmtime(bz):
        return out
    with open(bz, "rb") as f:
        data = f.read()
    at = data.find(b"\xfd7zXZ\x00")
    if at < 0:
        return bz
    dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    try:
        elf = dec.decompress(data[at:])
    except lzma.LZMAError:
        return bz
    if not elf.startswith(b"\x7fELF"):
        return bz
    tmp = out + f".tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(elf)
    os.replace(tmp, out)
    return out


def _module_order(version: str, names: Sequence[str]) -> list[str]:
    """Module files (relative to /lib/modules/<v>) for `names` and their dependencies, dependencies first."""
    base = f"/lib/modules/{version}"
    deps: dict[str, list[str]] = {}
    with open(os.path.join(base, "modules.dep")) as f:
        for line in f:
            mod, _, rest = line.partition(":")
            deps[mod] = rest.split()
    by_name = {os.path.basename(m).split(".ko")[0].replace("-", "_"): m for m in deps}
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for d in reversed(deps.get(path, [])):
            visit(d)
        order.append(path)

    for n in names:
        if n in by_name:  # built-in modules are simply absent from modules.dep
            visit(by_name[n])
    return order


def _cpio_entry(out: io.BytesIO, name: str, mode: int, data: bytes = b"", ino: int = 1) -> None:
    name_b = name.encode() + b"\x00"
    hdr = "070701" + "".join(f"{v:08X}" for v in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name_b), 0))
    out.write(hdr.encode() + name_b)
    out.write(b"\x00" * ((4 - (110 + len(name_b)) % 4) % 4))
    out.write(data)
    out.write(b"\x00" * ((4 - len(data) % 4) % 4))


def build_initramfs(version: str, path: str) -> None:
    """A newc cpio: busybox, /init, and the stage-0 modules (uncompressed .ko as Debian ships them)."""
    if not os.path.exists(BUSYBOX):
        raise FileNotFoundError(f"{BUSYBOX} is missing: apt-get install busybox-static")
    buf = io.BytesIO()
    ino = 1
    for d in ("bin", "modules", "proc", "sys", "dev", "lower"):
        _cpio_entry(buf, d, stat.S_IFDIR | 0o755, ino=ino)
        ino += 1
    with open(BUSYBOX, "rb") as f:
        _cpio_entry(buf, "bin/busybox", stat.S_IFREG | 0o755, f.read(), ino)
    ino += 1
    _cpio_entry(buf, "init", stat.S_IFREG | 0o755, INIT.encode(), ino)
    ino += 1
    names = []
    for rel in _module_order(version, STAGE0_MODULES):
        name = os.path.basename(rel)
        with open(os.path.join(f"/lib/modules/{version}", rel), "rb") as f:
            _cpio_entry(buf, f"modules/{name}", stat.S_IFREG | 0o644, f.read(), ino)
        ino += 1
        names.append(name)
    _cpio_entry(buf, "modules/order", stat.S_IFREG | 0o644, ("\n".join(names) + "\n").encode(), ino)
    _cpio_entry(buf, "TRAILER!!!", 0, ino=0)
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def qemu_argv(shared: str, workdir: str, disks: Sequence[str], mem_mb: int, *, use_kvm: bool,
              extra: Sequence[str] = ()) -> tuple[list[str], str, str]:
    """(argv, label, description) for booting the guest under QEMU."""
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        raise FileNotFoundError("qemu-system-x86_64 is missing: apt-get install qemu-system-x86")
    version = kernel_version()
    kernel = vmlinux_for(version)
    initrd = os.path.join(workdir, "initramfs.cpio")
    build_initramfs(version, initrd)
    here = os.path.dirname(os.path.abspath(__file__))
    accel = "kvm" if use_kvm else "tcg,thread=multi"
    cmdline = ["console=ttyS0", "quiet", "panic=-1", "rootwait", f"TESSERA_INIT={here}/guest_init.sh",
               f"TESSERA_SHARED={shared}", "TESSERA_KIND=qemu", *extra]
    argv = [qemu, "-machine", "q35", "-accel", accel, "-cpu", "host" if use_kvm else "max",
            "-smp", str(min(2, os.cpu_count() or 1)), "-m", str(mem_mb),
            "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot", "-nodefaults",
            "-kernel", kernel, "-initrd", initrd, "-append", " ".join(cmdline),
            "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
            "-virtfs", f"local,path={shared},mount_tag=tessera-shared,security_model=none,multidevs=remap"]
    for d in disks:
        argv += ["-drive", f"file={d},format=raw,if=virtio,cache=unsafe"]
    label = "qemu-kvm" if use_kvm else "qemu-tcg"
    how = "KVM" if use_kvm else "TCG emulation (no usable kvm_intel/kvm_amd on this host)"
    return argv, label, f"QEMU {how}, kernel {version} ({os.path.basename(kernel)})"
