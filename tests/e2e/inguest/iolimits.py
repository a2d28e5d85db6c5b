"""Shared by the in-guest I/O-limit tests (lvm, krbd): a pod cgroup laid out as kubelet's systemd driver makes it,
the kernel's io.max line for a device, and a measured O_DIRECT write rate from a process inside the pod's cgroup."""
from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from typing import Iterator

ROOT = "/sys/fs/cgroup"
POD_UID = "csi.storage.k8s.io/pod.uid"


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


@contextlib.contextmanager
def pod_cgroup() -> Iterator[tuple[str, str]]:
    """(pod UID, its cgroup directory) in the guest's cgroup v2 hierarchy, removed afterwards."""
    if not os.path.exists(os.path.join(ROOT, "cgroup.controllers")):
        subprocess.run(["mount", "-t", "cgroup2", "cgroup2", ROOT], check=True, timeout=30)
    uid = str(uuid.uuid4())
    levels = ["kubepods.slice", "kubepods-besteffort.slice", f"kubepods-besteffort-pod{uid.replace('-', '_')}.slice"]
    made, path = [], ROOT
    for name in levels:
        _write(os.path.join(path, "cgroup.subtree_control"), "+io")  # io.max appears in the children
        path = os.path.join(path, name)
        if not os.path.isdir(path):
            os.mkdir(path)
            made.append(path)
    try:
        yield uid, path
    finally:
        for d in reversed(made):
            for _ in range(50):
                try:
                    os.rmdir(d)
                    break
                except OSError:
                    time.sleep(0.1)  # the dd process leaving the cgroup


def device_line(cgroup: str, device: str) -> str:
    """The cgroup's io.max line for the device ("" when it has none: no limit)."""
    rdev = os.stat(device).st_rdev
    mm = f"{os.major(rdev)}:{os.minor(rdev)} "
    with open(os.path.join(cgroup, "io.max")) as f:
        return next((line.strip() for line in f if line.startswith(mm)), "")


def write_rate(cgroup: str, target: str, count: int) -> float:
    """4 KiB O_DIRECT writes per second, by a dd that joins the pod's cgroup first."""
    script = f'echo $$ > "{cgroup}/cgroup.procs" && exec dd if=/dev/zero of="{target}" bs=4k count={count} ' \
             'oflag=direct status=none'
    started = time.monotonic()
    subprocess.run(["sh", "-c", script], check=True, timeout=120)
    return count / (time.monotonic() - started)
