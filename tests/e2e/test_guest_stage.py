"""The e2e stage on the host: boot ONE real-kernel guest, run every registered in-guest suite in it
(tests/e2e/suites.py), and turn what happened inside into host test results — one host test per suite, failing with
the inner counts and failure messages, plus one for the guest itself (boot, timeouts, death).

    .venv/bin/python -m pytest -m e2e tests/e2e              # the whole stage (UML)
    TESSERA_GUEST=qemu .venv/bin/python -m pytest -m e2e tests/e2e
    TESSERA_E2E_SUITES=lvm-data .venv/bin/python -m pytest -m e2e tests/e2e
    TESSERA_E2E_RESULTS=/some/dir ...                         # keep console.log and junit-*.xml there

The guest's console is streamed to the terminal while it runs (pytest capture is suspended for it).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass

import pytest

from tests.conftest import require, strict
from tests.e2e.junitsum import read_junit
from tests.e2e.suites import Suite, selected

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(os.path.dirname(_HERE))


def _guest_module():
    spec = importlib.util.spec_from_file_location("tessera_e2e_guest", os.path.join(_HERE, "guest.py"))
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("tessera_e2e_guest", mod)
    if _HERE not in sys.path:
        sys.path.insert(0, _HERE)  # guest.py imports qemu_boot from its own directory
    spec.loader.exec_module(mod)
    return mod


guest = _guest_module()
SUITES = selected()
# one boot runs every suite inside the first test's fixture: the per-test timeout must cover the whole stage
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(sum(s.timeout for s in SUITES) + 600)]


@dataclass
class Stage:
    result: object  # guest.GuestResult
    results_dir: str
    suites: dict


@pytest.fixture(scope="module")
def stage(request, tmp_path_factory) -> Stage:
    kind = guest.choose_kind()
    if kind == "uml":
        require(os.access(guest.UML_BINARY, os.X_OK), f"{guest.UML_BINARY} (apt-get install user-mode-linux)")
    else:
        require(shutil.which("qemu-system-x86_64") is not None, "qemu-system-x86_64 (apt-get install qemu-system-x86)")
    results = os.environ.get("TESSERA_E2E_RESULTS") or str(tmp_path_factory.mktemp("e2e-results"))
    os.makedirs(results, exist_ok=True)
    argv = [sys.executable, os.path.join(_HERE, "inguest_run.py"), results, *[s.name for s in SUITES]]
    env = {k: os.environ[k] for k in ("CI", "TESSERA_REQUIRE_ALL") if k in os.environ}
    capman = request.config.pluginmanager.getplugin("capturemanager")
    ctx = capman.global_and_fixture_disabled() if capman else contextlib.nullcontext()
    with ctx:
        print(f"\n[e2e] booting one {kind} guest for suites: {', '.join(s.name for s in SUITES)}", flush=True)
        res = guest.run_in_guest(argv, shared_dir=results, cwd=_REPO, env=env, scratch_mib=8192,
                                 timeout=sum(s.timeout for s in SUITES) + 120)
    suites: dict = {}
    try:
        with open(os.path.join(results, "suites.json")) as f:
            suites = json.load(f)
    except (OSError, ValueError):
        pass
    return Stage(res, results, suites)


def test_guest_ran_to_completion(stage: Stage) -> None:
    r = stage.result
    print(f"guest kind={r.kind} ready after {r.boot_seconds}s, whole stage {r.total_seconds}s, "
          f"modules missing: {r.status.get('modules_missing')}")
    assert not r.error, (f"{r.kind} guest: {r.error}\nlast console lines:\n" + "\n".join(r.tail[-30:]) +
                         f"\nfull console log: {r.log_path}")


@pytest.mark.parametrize("suite", SUITES, ids=[s.name for s in SUITES])
def test_in_guest_suite(stage: Stage, suite: Suite) -> None:
    r = stage.result
    entry = stage.suites.get(suite.name)
    where = f"[{r.kind} guest; console log {r.log_path}]"
    assert entry is not None, f"suite {suite.name} did not run inside the guest ({r.error or 'guest stopped early'}) {where}"
    junit = entry["junit"]
    summary = read_junit(junit) if os.path.exists(junit) else None
    if summary is None:
        pytest.fail(f"suite {suite.name} exited {entry['rc']} without a junit report {entry.get('error', '')} {where}")
    problems = summary.failures + summary.errors
    missing = [s for s in summary.skipped if "MISSING:" in s]
    msg = [f"suite {suite.name} in the {r.kind} guest: {summary.line()} (exit {entry['rc']}, {entry['seconds']}s)"]
    msg += [f"  FAILED {p}" for p in problems[:40]]
    msg += [f"  MISSING {m}" for m in missing[:20]]
    if entry.get("error"):
        msg.append(f"  {entry['error']}")
    print(msg[0])
    assert summary.tests > 0, "\n".join(msg + ["  no tests ran"])
    assert entry["rc"] == 0 and not problems, "\n".join(msg + [f"  {where}"])
    assert not (missing and strict()), "\n".join(msg + ["  TESSERA_REQUIRE_ALL=1 / CI=true: missing prerequisites fail"])
