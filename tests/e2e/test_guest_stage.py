"""The e2e stage on the host: boot one real-kernel guest per lane (two lanes in parallel on a 2-core machine), run
the registered in-guest suites in them (tests/e2e/suites.py), and turn what happened inside into host test results —
one host test per suite, failing with the inner counts and failure messages, plus one for the guests themselves
(boot, timeouts, death).

    .venv/bin/python -m pytest -m e2e tests/e2e              # the whole stage (UML)
    TESSERA_GUEST=qemu .venv/bin/python -m pytest -m e2e tests/e2e
    TESSERA_E2E_SUITES=lvm-data .venv/bin/python -m pytest -m e2e tests/e2e
    TESSERA_E2E_LANES=1 ...                                   # everything in one guest
    TESSERA_E2E_RESULTS=/some/dir ...                         # keep lane-N/console.log and junit-*.xml there

The guest's console is streamed to the terminal while it runs (pytest capture is suspended for it).
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import sys
import threading
import warnings
from dataclasses import dataclass, field
from typing import Optional

import pytest

from tests.conftest import require, strict
from tests.e2e.junitsum import read_junit
from tests.e2e.suites import Suite, lane_count, plan_lanes, selected

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
LANES = plan_lanes(SUITES, lane_count())
def _lane_timeout(suites: list) -> float:
    return sum(s.timeout for s in suites) + 120


_LANE_TIMEOUTS = [_lane_timeout(lane) for lane in LANES]
# one boot per lane runs every suite inside the first test's fixture: the per-test timeout must cover the longest lane
# (and a rerun after a stall: SILENCE_LIMIT of silence, then at most the whole lane again)
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2 * max(_LANE_TIMEOUTS) + 600)]


class _Prefixed(io.TextIOBase):
    """A console stream that prefixes each line with its lane, so parallel guests stay readable."""

    def __init__(self, prefix: str, out, ready: Optional[threading.Event] = None) -> None:
        self.prefix, self.out, self.lock = prefix, out, _PRINT_LOCK
        self.partial = ""
        self.ready = ready  # set when the guest says it is ready (the next lane then boots)

    def write(self, text: str) -> int:
        self.partial += text
        *lines, self.partial = self.partial.split("\n")
        if self.ready is not None and any("tessera-guest: ready after" in ln for ln in lines):
            self.ready.set()
        if lines:
            with self.lock:
                self.out.write("".join(f"{self.prefix}{line}\n" for line in lines))
        return len(text)

    def flush(self) -> None:
        with self.lock:
            self.out.flush()


_PRINT_LOCK = threading.Lock()
BOOT_STAGGER_LIMIT = 300.0  # seconds a lane waits at most for the previous lane's guest to be ready
# A healthy guest's console speaks at least once per test (pytest's progress dot), and the slowest test takes a few
# minutes. A UML guest was once seen stalled for good (its clock stopped: no timer ever fired again, so not even the
# in-guest suite timeout came) at 100 % host CPU: after this much silence the guest is killed and the lane's suites
# that had not finished run once more in a fresh guest, said loudly (a pytest warning and the lane's line).
SILENCE_LIMIT = 900.0


@dataclass
class Stage:
    results: list  # guest.GuestResult per lane (the rerun's, after a stall)
    lanes: list    # the suites of each lane
    suites: dict   # suite name -> entry of its lane's suites.json (+ "lane": index)
    stalls: dict = field(default_factory=dict)  # lane -> what the watchdog killed and what ran again


def _finished(lane_dir: str) -> dict:
    """The suites.json entries a lane's guest wrote (one per suite that ran to its end), {} when there is none."""
    try:
        with open(os.path.join(lane_dir, "suites.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


@pytest.fixture(scope="module")
def stage(request, tmp_path_factory) -> Stage:
    kind = guest.choose_kind()
    if kind == "uml":
        require(os.access(guest.UML_BINARY, os.X_OK), f"{guest.UML_BINARY} (apt-get install user-mode-linux)")
    else:
        require(shutil.which("qemu-system-x86_64") is not None, "qemu-system-x86_64 (apt-get install qemu-system-x86)")
    results = os.environ.get("TESSERA_E2E_RESULTS") or str(tmp_path_factory.mktemp("e2e-results"))
    env = {k: os.environ[k] for k in ("CI", "TESSERA_REQUIRE_ALL") if k in os.environ}
    capman = request.config.pluginmanager.getplugin("capturemanager")
    ctx = capman.global_and_fixture_disabled() if capman else contextlib.nullcontext()
    out: list = [None] * len(LANES)

    # Lanes boot one after another: each starts once the previous guest is ready (or its boot gave up), because two
    # UML guests booting at the same moment were seen to stall formatting their scratch disk (2 boots in ~50).
    ready = [threading.Event() for _ in LANES]

    stalls: dict = {}

    def boot(i: int, lane_dir: str, suites: list, ready_event: Optional[threading.Event]):
        os.makedirs(lane_dir, exist_ok=True)
        argv = [sys.executable, os.path.join(_HERE, "inguest_run.py"), lane_dir, *[s.name for s in suites]]
        try:
            return guest.run_in_guest(argv, shared_dir=lane_dir, cwd=_REPO, env=env, scratch_mib=8192,
                                      timeout=_lane_timeout(suites), silence_limit=SILENCE_LIMIT,
                                      stream=_Prefixed(f"[lane {i}] ", sys.stdout, ready_event))
        except Exception as e:  # noqa: BLE001 - a guest that cannot start is this lane's failure, not a hang
            return guest.GuestResult(kind=kind, rc=-1, ok=False, error=f"could not start the guest: {e!r}")

    def run_lane(i: int) -> None:
        if i:
            ready[i - 1].wait(timeout=BOOT_STAGGER_LIMIT)
        lane_dir = os.path.join(results, f"lane-{i}")
        try:
            out[i] = boot(i, lane_dir, LANES[i], ready[i])
        finally:
            ready[i].set()  # never keep the next lane waiting for a guest that is gone
        if out[i].stalled:
            rest = [s for s in LANES[i] if s.name not in _finished(lane_dir)]
            stalls[i] = (f"lane {i}: {out[i].error}; console kept in {out[i].log_path}; suites run again in a fresh "
                         f"guest: {', '.join(s.name for s in rest)}")
            print(f"\n[e2e] WARNING {stalls[i]}", flush=True)
            out[i] = boot(i, lane_dir + "-rerun", rest, None)

    with ctx:
        for i, lane in enumerate(LANES):
            print(f"\n[e2e] lane {i}: one {kind} guest for suites: {', '.join(s.name for s in lane)}", flush=True)
        threads = [threading.Thread(target=run_lane, args=(i,), name=f"e2e-lane-{i}") for i in range(len(LANES))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    suites: dict = {}
    for i in range(len(LANES)):
        for lane_dir in (f"lane-{i}", f"lane-{i}-rerun"):  # a suite the rerun ran again: its second run counts
            for name, entry in _finished(os.path.join(results, lane_dir)).items():
                suites[name] = {**entry, "lane": i}
    return Stage(out, LANES, suites, stalls)


def test_guest_ran_to_completion(stage: Stage) -> None:
    problems = []
    for i, note in stage.stalls.items():
        print(f"WARNING {note}")
        warnings.warn(f"e2e guest stalled and its lane ran again: {note}", stacklevel=1)
    for i, r in enumerate(stage.results):
        print(f"lane {i}: guest kind={r.kind} ready after {r.boot_seconds}s, whole lane {r.total_seconds}s, "
              f"modules missing: {r.status.get('modules_missing')}" + (" (rerun after a stall)" if i in stage.stalls
                                                                      else ""))
        if r.error:
            problems.append(f"lane {i} {r.kind} guest: {r.error}\nlast console lines:\n" + "\n".join(r.tail[-30:]) +
                            f"\nfull console log: {r.log_path}")
    assert not problems, "\n\n".join(problems)


@pytest.mark.parametrize("suite", SUITES, ids=[s.name for s in SUITES])
def test_in_guest_suite(stage: Stage, suite: Suite) -> None:
    entry = stage.suites.get(suite.name)
    lane = entry["lane"] if entry else next(i for i, ln in enumerate(stage.lanes) if suite in ln)
    r = stage.results[lane]
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
    if summary.detail:
        msg.append("  first problem in full: " + summary.detail.replace("\n", "\n    "))
    print(msg[0])
    assert summary.tests > 0, "\n".join(msg + ["  no tests ran"])
    assert entry["rc"] == 0 and not problems, "\n".join(msg + [f"  {where}"])
    assert not (missing and strict()), "\n".join(msg + ["  TESSERA_REQUIRE_ALL=1 / CI=true: missing prerequisites fail"])
