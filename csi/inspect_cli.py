"""`tessera-csi volumes list|show|orphans`: what each backend holds, read with the plugin's own config. Read-only.

Why: an operator who suspects a leaked image or LV should not have to run `rbd ls` or `lvs` and guess which objects
are Tessera's. These commands ask the backends through the same interface the CSI services use, so what they show
is what the driver itself sees: request names, sizes, sources and parameters from the objects' own metadata, and
this node's stage records. `orphans` lists backing objects that carry Tessera's marks but form no complete volume or
snapshot (what a crashed create or delete left); it never deletes anything — removing them is the operator's call.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Iterable, Optional

from backends.base import Backend, Snapshot, Volume
from backends.errors import TesseraError, Unsupported

from .config import Config
from .ids import make_id as format_id, parse_id
from .registry import Backends


def _volume_row(b: Backend, v: Volume) -> dict[str, Any]:
    return {"backend": b.name, "volume_id": format_id(b.name, v.local_id), "name": v.name,
            "capacity_bytes": v.capacity_bytes,
            "source": f"{v.source.kind}:{format_id(b.name, v.source.local_id)}" if v.source else "",
            "parameters": dict(v.parameters), "context": dict(v.context),
            "abnormal": v.abnormal, "condition": v.condition_message}


def _snapshot_row(b: Backend, s: Snapshot) -> dict[str, Any]:
    return {"backend": b.name, "snapshot_id": format_id(b.name, s.local_id), "name": s.name,
            "source_volume_id": format_id(b.name, s.source_volume_local_id), "size_bytes": s.size_bytes,
            "ready_to_use": s.ready_to_use, "creation_time": s.creation_time}


def stage_records(state_dir: str, volume_id: Optional[str] = None) -> list[dict[str, Any]]:
    """This node's stage records (all, or one volume's), as the node plugin wrote them."""
    where = os.path.join(state_dir, "node", "staged")
    out = []
    try:
        names = sorted(os.listdir(where))
    except FileNotFoundError:
        return out
    for n in names:
        if not n.endswith(".json"):
            continue
        try:
            with open(os.path.join(where, n)) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and (volume_id is None or rec.get("volume_id") == volume_id):
            out.append(rec)
    return out


def _backends(backends: Backends, only: Optional[str]) -> Iterable[Backend]:
    for b in backends:
        if only is None or b.name == only:
            yield b


def _print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


def cmd_list(config: Config, backends: Backends, args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    problems = 0
    for b in _backends(backends, args.backend):
        try:
            rows.extend(_volume_row(b, v) for v in b.list_volumes({}))
            if args.snapshots and b.features().snapshots:
                rows.extend(_snapshot_row(b, s) for s in b.list_snapshots({}))
        except (TesseraError, Unsupported) as e:
            print(f"tessera-csi: backend {b.name}: {e}", file=sys.stderr)
            problems += 1
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
    else:
        vols = [r for r in rows if "volume_id" in r]
        _print_table(vols, ["volume_id", "name", "capacity_bytes", "source"])
        snaps = [r for r in rows if "snapshot_id" in r]
        if snaps:
            print()
            _print_table(snaps, ["snapshot_id", "name", "source_volume_id", "size_bytes", "ready_to_use"])
    return 1 if problems else 0


def cmd_show(config: Config, backends: Backends, args: argparse.Namespace) -> int:
    try:
        oid = parse_id(args.id)
        b = backends.for_id(oid.backend, f"volume {args.id!r}")
        row: dict[str, Any]
        try:
            row = _volume_row(b, b.get_volume(oid.local, {}))
        except TesseraError:
            if not b.features().snapshots:
                raise
            row = _snapshot_row(b, b.get_snapshot(oid.local, {}))
    except TesseraError as e:
        print(f"tessera-csi: {e}", file=sys.stderr)
        return 1
    row["node_records"] = stage_records(config.state_dir, args.id)
    print(json.dumps(row, indent=2, sort_keys=True))
    return 0


def cmd_orphans(config: Config, backends: Backends, args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    problems = 0
    for b in _backends(backends, args.backend):
        try:
            rows.extend({"backend": b.name, "object": o.object, "reason": o.reason} for o in b.orphans())
        except (TesseraError, Unsupported) as e:
            print(f"tessera-csi: backend {b.name}: {e}", file=sys.stderr)
            problems += 1
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
    elif rows:
        _print_table(rows, ["backend", "object", "reason"])
    else:
        print("no orphans")
    return 1 if problems else 0


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    v = sub.add_parser("volumes", help="what the backends hold (read-only)")
    vsub = v.add_subparsers(dest="volumes_command", required=True)
    ls = vsub.add_parser("list", parents=[common], help="every volume (and snapshot) by request name")
    ls.add_argument("--backend", default=None, help="only this backend")
    ls.add_argument("--snapshots", action="store_true", help="list snapshots too")
    ls.add_argument("--json", action="store_true", help="JSON instead of a table")
    ls.set_defaults(inspect=cmd_list)
    sh = vsub.add_parser("show", parents=[common], help="one volume or snapshot by ID, with this node's records")
    sh.add_argument("id", help="a volume or snapshot ID (<backend>:<local id>)")
    sh.set_defaults(inspect=cmd_show)
    orp = vsub.add_parser("orphans", parents=[common],
                          help="backing objects with Tessera's marks but no complete volume; never deletes")
    orp.add_argument("--backend", default=None, help="only this backend")
    orp.add_argument("--json", action="store_true", help="JSON instead of a table")
    orp.set_defaults(inspect=cmd_orphans)
