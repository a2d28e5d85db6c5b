"""Throw-away LVM volume groups on loop devices, for tests that run inside the e2e guest.

Why loop devices over sparse files: that is how a test gets a real PV without a spare disk. The files live in
$TESSERA_SCRATCH (an ext4 on the guest's extra disk, set up by guest_inner.py) so volume data does not fill guest RAM;
outside the guest, /var/tmp.
"""
from __future__ import annotations

import os
import subprocess
import uuid
from dataclasses import dataclass, field
from typing import Optional

LVM_ENV = dict(os.environ, LVM_SUPPRESS_FD_WARNINGS="1")


def _run(argv: list[str], timeout: float = 120) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=LVM_ENV)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def device_mapper_available() -> bool:
    """True when this kernel can run LVM (device-mapper loaded, /dev/mapper/control present)."""
    return os.path.exists("/dev/mapper/control") and os.path.isdir("/sys/module/dm_mod")


@dataclass
class LoopVg:
    name: str
    image: str
    loop: str
    thin_pool: Optional[str] = None
    size: int = 0
    extras: list[str] = field(default_factory=list)

    def destroy(self) -> None:
        """Remove every LV, the VG, the PV, the loop device and the file; tolerant of half-made states."""
        for argv in (["vgremove", "--yes", "--force", self.name], ["pvremove", "--yes", "--force", self.loop],
                     ["losetup", "--detach", self.loop]):
            subprocess.run(argv, capture_output=True, env=LVM_ENV, timeout=120)
        try:
            os.unlink(self.image)
        except FileNotFoundError:
            pass


def make_loop_vg(size: int = 4 << 30, thin_pool_size: Optional[int] = None, prefix: str = "tesseravg",
                 directory: Optional[str] = None) -> LoopVg:
    """A VG on a loop device over a sparse file of `size` bytes; with `thin_pool_size`, a thin pool `pool` in it."""
    directory = directory or os.environ.get("TESSERA_SCRATCH") or "/var/tmp"
    name = f"{prefix}{uuid.uuid4().hex[:8]}"
    image = os.path.join(directory, name + ".img")
    with open(image, "wb") as f:
        f.truncate(size)
    loop = _run(["losetup", "--find", "--show", "--direct-io=on", image]).strip()
    vg = LoopVg(name=name, image=image, loop=loop, size=size)
    try:
        _run(["pvcreate", "--yes", "-q", loop])
        _run(["vgcreate", "--yes", "-q", name, loop])
        if thin_pool_size:
            _run(["lvcreate", "--yes", "-q", "--type", "thin-pool", "--size", f"{thin_pool_size}b", "--name", "pool",
                  name])
            vg.thin_pool = "pool"
    except BaseException:
        vg.destroy()
        raise
    return vg
