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


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, every thread counted."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def context_switches(pid: int) -> int:
    """Voluntary context switches of every thread of a process so far: each is a thread that blocked (on I/O, a
    lock, or in a Python process the interpreter lock) and was woken again."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
        except OSError:  # the thread ended meanwhile
            continue
    return total


def load() -> str:
    return "load %.2f %.2f %.2f" % os.getloadavg()
