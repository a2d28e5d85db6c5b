"""Summaries of junit XML reports written inside the guest, for the host's assertion messages."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field


@dataclass
class JunitSummary:
    tests: int = 0
    failures: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    # The whole text of one problem, so a failure inside the guest explains itself in the host's output: the one
    # that says the plugin process died (it carries the plugin's last log lines), else the first.
    detail: str = ""

    @property
    def passed(self) -> int:
        return self.tests - len(self.failures) - len(self.errors) - len(self.skipped)

    def line(self) -> str:
        return (f"{self.tests} tests: {self.passed} passed, {len(self.failures)} failed, {len(self.errors)} errors, "
                f"{len(self.skipped)} skipped")


def read_junit(path: str) -> JunitSummary:
    out = JunitSummary()
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        out.tests += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        for tag, bucket in (("failure", out.failures), ("error", out.errors), ("skipped", out.skipped)):
            el = case.find(tag)
            if el is not None:
                msg = (el.get("message") or el.text or "").strip().splitlines()
                bucket.append(f"{name}: {msg[0][:300] if msg else tag}")
                if tag != "skipped":
                    full = "\n".join(x for x in (el.get("message"), el.text) if x).strip()
                    if not out.detail or ("process died" in full and "process died" not in out.detail):
                        out.detail = f"{name}:\n{full[-6000:]}"
    return out
