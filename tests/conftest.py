"""Suite-wide rules.

Skips: a test that cannot run because this machine lacks something must say so with a reason starting with
"MISSING:" — under CI (CI=true) such a skip fails the run, because CI machines are set up to run everything. A test
that does not apply to the plugin under test (a capability it does not advertise) skips with a reason starting with
"not applicable:"; those are reported but never counted as passes.
"""
from __future__ import annotations

import os

import pytest

_missing: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2])
        if "MISSING:" in reason:
            _missing.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    if _missing and os.environ.get("CI") == "true" and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter):
    if _missing:
        terminalreporter.section("TESTS SKIPPED FOR MISSING PREREQUISITES", sep="!", red=True, bold=True)
        for line in _missing:
            terminalreporter.write_line(line, red=True)
        if os.environ.get("CI") == "true":
            terminalreporter.write_line("CI=true: missing prerequisites fail this run", red=True, bold=True)


def require(condition: bool, what: str) -> None:
    """Skip loudly (and fail under CI) when a prerequisite is missing."""
    if not condition:
        pytest.skip(f"MISSING: {what}")
