"""Runs the registered suites one after another inside the guest (the command guest.py is given by the e2e stage).

Each suite is a separate pytest process (a crash or hang in one is contained, its fixtures do not leak into the next)
writing `<results>/junit-<name>.xml`; `<results>/suites.json` records each exit status and duration, so the host can
tell "tests failed" from "suite did not run". Exit status: 0 only when every suite exited 0.

    python tests/e2e/inguest_run.py RESULTS_DIR [suite-name ...]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from tests.e2e.suites import SUITES, selected  # noqa: E402


def main(argv: list[str]) -> int:
    results = os.path.abspath(argv[0])
    names = argv[1:]
    suites = [s for s in SUITES if s.name in names] if names else selected()
    report: dict[str, dict] = {}
    worst = 0
    for suite in suites:
        junit = os.path.join(results, f"junit-{suite.name}.xml")
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "console_output_style=classic",
               f"--junitxml={junit}", "-o", f"junit_suite_name={suite.name}", *suite.args]
        print(f"\n===== in-guest suite {suite.name}: {' '.join(suite.args)}", flush=True)
        t0 = time.monotonic()
        try:
            rc = subprocess.run(cmd, cwd=REPO, timeout=suite.timeout).returncode
            error = ""
        except subprocess.TimeoutExpired:
            rc, error = 124, f"suite {suite.name} did not finish within {suite.timeout:.0f}s"
            print(f"===== {error}", flush=True)
        took = round(time.monotonic() - t0, 2)
        report[suite.name] = {"rc": rc, "seconds": took, "junit": junit, "error": error, "args": list(suite.args)}
        print(f"===== in-guest suite {suite.name}: exit {rc} after {took}s", flush=True)
        worst = worst or rc
        with open(os.path.join(results, "suites.json"), "w") as f:
            json.dump(report, f, indent=1)
    return 1 if worst else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
