"""The registry of in-guest suites: what the e2e stage runs inside its one guest boot.

Adding a suite (other helpers: iSCSI, RBD, ...): append one `Suite(...)` to SUITES below. `args` are pytest
arguments relative to the repository root, run with the project's venv inside the guest; the runner adds
`--junitxml` and `-p no:cacheprovider`. Put the tests under tests/e2e/inguest/<topic>/ (never collected on the host)
or reuse any suite with a guest-only profile, as the sanity entries do. Fixtures that need services (a Ceph cluster,
an LIO target) start them inside the guest: its 127.0.0.1 is its own.

Run only some suites: TESSERA_E2E_SUITES=lvm-data,sanity-lvm (comma separated names).

Lanes: the stage boots one guest per lane, the lanes in parallel (UML is uniprocessor; a CI machine has 2 cores), and
each guest runs its lane's suites one after another. TESSERA_E2E_LANES sets the number (default: min(2, CPUs)).
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Suite:
    name: str                     # [a-z0-9-]+; names the junit file junit-<name>.xml
    args: tuple[str, ...]         # pytest arguments, paths relative to the repo root
    description: str = ""
    timeout: float = 600.0        # seconds for this suite inside the guest
    expected: float = 120.0       # seconds measured in a UML guest with two lanes on 2 cores: balances the lanes


SUITES: list[Suite] = [
    Suite("lvm-data", ("tests/e2e/inguest/lvm",),
          "LVM backend data path, thick and thin: restage, block, snapshot restore, clone, online grow, capacity, "
          "changed-block tracking on thin (thin_dump/thin_delta)",
          timeout=1500, expected=480),
    Suite("sanity-lvm", ("tests/sanity", "--sanity-profile", "lvm-thick", "--sanity-profile", "lvm-thin"),
          "the CSI conformance suite against the LVM backend (thick and thin) on a loop-backed VG",
          timeout=2400, expected=1000),
    Suite("flex-lvm", ("tests/e2e/inguest/flex",),
          "FlexVolume shim + provisioner PVC-to-mount walk on LVM (thick and thin), the shim called as kubelet calls it",
          timeout=600, expected=70),
    Suite("iscsi-data", ("tests/e2e/inguest/iscsi",),
          "iSCSI backend data path: LIO target + open-iscsi via os-brick, CHAP, restage, online grow, shared sessions",
          timeout=900, expected=135),
    Suite("sanity-iscsi", ("tests/sanity", "--sanity-profile", "iscsi-lio-thin", "--sanity-profile", "iscsi-lio-file"),
          "the CSI conformance suite against the iSCSI backend (LIO on thin LVs and on files, open-iscsi initiator)",
          timeout=2400, expected=780),
    # The SnapshotMetadata tests (controller only: librbd's diff_iterate, nothing of the kernel mounters) are left to
    # the host's rbd profile: under UML, the plugin's librbd aborted in about half of the runs right after a diff
    # ("The futex facility returned an unexpected error code", "std::system_error: Owner died"), never on the host's
    # real kernel (tests/sanity/test_sanity_snapshot_metadata.py --sanity-profile rbd, repeated clean).
    Suite("sanity-rbd-kernel", ("tests/sanity", "--sanity-profile", "rbd-krbd", "--sanity-profile", "rbd-nbd",
                                "--ignore=tests/sanity/test_sanity_snapshot_metadata.py"),
          "the CSI conformance suite against the RBD backend with the kernel mounters (krbd, rbd-nbd) on a Ceph "
          "cluster started inside the guest (SnapshotMetadata: on the host)", timeout=2400, expected=370),
    Suite("data-safety", ("tests/e2e/inguest/safety",),
          "two node plugins in one guest: reader-only RBD (krbd) and iSCSI volumes never written, a second RBD "
          "writer refused, a multi-writer block volume written by both, thick LVM blank after delete, and a simulated "
          "reboot (devices detached and renumbered behind the plugin's back) for krbd, thick LVM and iSCSI",
          timeout=1500, expected=150),
]


def lane_count() -> int:
    raw = os.environ.get("TESSERA_E2E_LANES", "")
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"TESSERA_E2E_LANES={raw!r}: expected a positive number")
        return int(raw)
    return max(1, min(2, os.cpu_count() or 1))


def plan_lanes(suites: list[Suite], lanes: int) -> list[list[Suite]]:
    """Split suites over at most `lanes` guests so the longest lane is short: longest expected suite first, each to
    the lane with the least work so far. Within a lane, suites keep their registry order."""
    buckets: list[list[Suite]] = [[] for _ in range(max(1, lanes))]
    load = [0.0] * len(buckets)
    for suite in sorted(suites, key=lambda s: -s.expected):
        i = load.index(min(load))
        buckets[i].append(suite)
        load[i] += suite.expected
    order = {s.name: n for n, s in enumerate(suites)}
    return [sorted(b, key=lambda s: order[s.name]) for b in buckets if b]


def selected() -> list[Suite]:
    """SUITES filtered by $TESSERA_E2E_SUITES (unknown names are an error, not a silent no-op)."""
    wanted = [n.strip() for n in os.environ.get("TESSERA_E2E_SUITES", "").split(",") if n.strip()]
    if not wanted:
        return list(SUITES)
    known = {s.name: s for s in SUITES}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(f"TESSERA_E2E_SUITES names unknown suites {unknown}; known: {sorted(known)}")
    return [known[n] for n in wanted]
