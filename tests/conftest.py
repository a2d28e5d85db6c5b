"""Suite-wide rules.

Skips: a test that cannot run because this machine lacks something must say so with a reason starting with
"MISSING:" — under `make test` (which installs everything first and sets TESSERA_REQUIRE_ALL=1) or CI=true such a
skip fails the run, because those machines are set up to run everything. A test
that does not apply to the plugin under test (a capability it does not advertise) skips with a reason starting with
"not applicable:"; those are reported but never counted as passes.
"""
from __future__ import annotations

import os

import pytest

# The Ceph cluster fixtures (ceph_cluster, ceph_mgr, fresh_ceph_cluster) for every directory that needs them: the
# RBD backend tests and the `rbd` sanity profiles. A cluster starts only when a test asks for one.
pytest_plugins = ["tests.ceph.fixtures"]

_missing: list[str] = []


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
