"""Suite-wide rules.

Skips: a test that cannot run because this machine lacks something must say so with a reason starting with
"MISSING:" — under `make test` (which installs everything first and sets TESSERA_REQUIRE_ALL=1) or CI=true such a
skip fails the run, because those machines are set up to run everything. A test
that does not apply to the plugin under test (a capability it does not advertise) skips with a reason starting with
"not applicable:"; those are reported but never counted as passes.
"""
from __future__ import annotations

import os
import sys
import time
from collections import Counter

import pytest

# The Ceph cluster fixtures (ceph_cluster, ceph_mgr, fresh_ceph_cluster) for every directory that needs them: the
# RBD backend tests and the `rbd` sanity profiles. A cluster starts only when a test asks for one.
pytest_plugins = ["tests.ceph.fixtures"]

_missing: list[str] = []
_seconds_by_file: Counter[str] = Counter()  # setup + call + teardown, per test file
_started = time.monotonic()


def strict() -> bool:
    """Missing prerequisites fail the run (not just skip) under `make test` and in CI."""
    return os.environ.get("TESSERA_REQUIRE_ALL") == "1" or os.environ.get("CI") == "true"


def _note_skip(report) -> None:
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2])
        if "MISSING:" in reason:
            _missing.append(f"{report.nodeid}: {reason}")


def pytest_runtest_logreport(report):
    _note_skip(report)
    _seconds_by_file[report.nodeid.split("::", 1)[0]] += report.duration


def pytest_collectreport(report):
    _note_skip(report)  # a module that skips itself at import (a missing package) counts too


def pytest_sessionfinish(session, exitstatus):
    if _missing and strict() and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter):
    if _missing:
        terminalreporter.section("TESTS SKIPPED FOR MISSING PREREQUISITES", sep="!", red=True, bold=True)
        for line in _missing:
            terminalreporter.write_line(line, red=True)
        if strict():
            terminalreporter.write_line("TESSERA_REQUIRE_ALL=1 / CI=true: missing prerequisites fail this run",
                                        red=True, bold=True)


def require(condition: bool, what: str) -> None:
    """Skip loudly (and fail under CI) when a prerequisite is missing."""
    if not condition:
        pytest.skip(f"MISSING: {what}")


def pytest_unconfigure(config):
    """Where the time went, as the very last lines of the run (after pytest's own summary), so that a CI log that
    keeps only its tail still says which stage made a run slow."""
    if not _seconds_by_file or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    by_area: Counter[str] = Counter()
    for path, secs in _seconds_by_file.items():
        parts = path.split("/")
        by_area["/".join(parts[:2]) if len(parts) > 2 else path] += secs
    areas = ", ".join(f"{a} {s / 60:.1f}m" for a, s in by_area.most_common(8))
    files = ", ".join(f"{f.rpartition('/')[2]} {s:.0f}s" for f, s in _seconds_by_file.most_common(6))
    out = sys.__stdout__
    print(f"time by area ({(time.monotonic() - _started) / 60:.1f} min in all): {areas}", file=out)
    print(f"slowest files: {files}", file=out, flush=True)
