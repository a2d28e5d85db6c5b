"""The registry of in-guest suites: what the e2e stage runs inside its one guest boot.

Adding a suite (other helpers: iSCSI, RBD, ...): append one `Suite(...)` to SUITES below. `args` are pytest
arguments relative to the repository root, run with the project's venv inside the guest; the runner adds
`--junitxml` and `-p no:cacheprovider`. Put the tests under tests/e2e/inguest/<topic>/ (never collected on the host)
or reuse any suite with a guest-only profile, as the sanity entries do. Fixtures that need services (a Ceph cluster,
an LIO target) start them inside the guest: its 127.0.0.1 is its own.

Run only some suites: TESSERA_E2E_SUITES=lvm-data,sanity-lvm (comma separated names).
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


SUITES: list[Suite] = [
    Suite("lvm-data", ("tests/e2e/inguest/lvm",),
          "LVM backend data path, thick and thin: restage, block, snapshot restore, clone, online grow, capacity"),
    Suite("sanity-lvm", ("tests/sanity", "--sanity-profile", "lvm-thick", "--sanity-profile", "lvm-thin"),
          "the CSI conformance suite against the LVM backend (thick and thin) on a loop-backed VG"),
    Suite("flex-lvm", ("tests/e2e/inguest/flex",),
          "FlexVolume shim + provisioner PVC-to-mount walk on LVM (thick and thin), the shim called as kubelet calls it"),
]


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
