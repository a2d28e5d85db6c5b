#!/usr/bin/env python3
"""Writes deploy/helm/tessera-csi/README.md from values.yaml: every value with its default and the comment above it.

Why generated: the comments in values.yaml are where a value is explained next to its default; a README written by
hand beside them drifts. `--check` (run by tests/deploy) fails when the README is stale; `--write` rewrites it.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

CHART = Path(__file__).resolve().parent / "tessera-csi"
VALUES = CHART / "values.yaml"
README = CHART / "README.md"
_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z][A-Za-z0-9_-]*):(?P<value>.*)$")

HEADER = """# tessera-csi Helm chart

Installs the Tessera CSI driver: the CSIDriver object, the controller (a Deployment for shared storage — rbd,
iscsi — or a DaemonSet for node-local storage — file, lvm), the node plugin DaemonSet, RBAC, the config ConfigMap,
example StorageClasses and, optionally, Secrets, a VolumeSnapshotClass, metrics Services and a ServiceMonitor.

```sh
helm install tessera deploy/helm/tessera-csi -n tessera-csi --create-namespace -f deploy/helm/values-<backend>.yaml
```

`deploy/helm/values-{file,lvm,rbd,iscsi}.yaml` are complete examples, each with its install command. Values are
checked against `values.schema.json` before anything renders; its `config` part is generated from the plugin's own
config models, so a misspelled backend option fails `helm install` with the same path that
`tessera-csi config validate` prints. Read [CHANGELOG.md](CHANGELOG.md) before `helm upgrade`.

This file is generated from the comments in `values.yaml` by `deploy/helm/chart_readme.py --write`.

## Values

| value | default | what it does |
|---|---|---|
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").strip()


def rows(text: str) -> list[tuple[str, str, str]]:
    """(dotted path, default as written, comment) for every mapping key outside list items."""
    out: list[tuple[str, str, str]] = []
    stack: list[tuple[int, str]] = []
    comment: list[str] = []
    list_indent: int | None = None  # inside a list value: its items are examples, not individual values
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped:
            comment = []
            continue
        indent = len(raw) - len(raw.lstrip(" "))
        if list_indent is not None:
            if indent > list_indent or stripped.startswith("- ") and indent >= list_indent:
                continue
            list_indent = None
        if stripped.startswith("#"):
            comment.append(stripped.lstrip("#").strip())
            continue
        m = _KEY.match(raw)
        if not m:
            comment = []
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key, value = m["key"], m["value"].split(" #")[0].strip()
        inline = m["value"].split(" #", 1)[1].strip() if " #" in m["value"] else ""
        path = ".".join([k for _, k in stack] + [key])
        note = " ".join(comment + ([inline] if inline else []))
        is_list = not value and _next_is_list(text, raw)
        if value or is_list:
            out.append((path, value or "[...] (see values.yaml)", note))
        elif note:
            out.append((path, "", note))
        stack.append((indent, key))
        if is_list:
            list_indent = indent
        comment = []
    return out


def _next_is_list(text: str, line: str) -> bool:
    lines = text.splitlines()
    i = lines.index(line)
    for nxt in lines[i + 1:]:
        if nxt.strip() and not nxt.strip().startswith("#"):
            return nxt.strip().startswith("- ")
    return False


def render() -> str:
    body = "".join(f"| `{p}` | {f'`{_cell(v)}`' if v else ''} | {_cell(c)} |\n" for p, v, c in rows(VALUES.read_text()))
    return HEADER + body


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true")
    mode.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    want = render()
    if args.write:
        README.write_text(want)
        return 0
    if not README.exists() or README.read_text() != want:
        print(f"{README} is stale: run deploy/helm/chart_readme.py --write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
