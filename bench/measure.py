"""What every benchmark prints beside its figures: the process's resident memory and the machine's load (a figure
taken on a busy machine says so)."""
from __future__ import annotations

import os


def rss_mib(pid: int) -> float:
    """Resident memory of a process (VmRSS), in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def load() -> str:
    return "load %.2f %.2f %.2f" % os.getloadavg()
