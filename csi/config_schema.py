"""JSON schemas of the config file, generated from the pydantic models that `config validate` uses.

Why generated: the Helm chart checks its values with `values.schema.json` before it renders, and a schema written by
hand drifts from the models (a misspelled `thinpool` rendered fine and the pod crash-looped later). Here the config
models are the single source: `python -m csi.config_schema --write` rewrites `deploy/config.schema.json` and the
`config` part of the chart's `values.schema.json`; `--check` (run by the unit tests) fails when either has drifted.

The schemas use draft-07 (what Helm's validator reads): a backend's options are chosen by its `type` with if/then.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

from backends import backend_class, backend_types

from .config import NodeSettings, _TopLevel
from .ids import BACKEND_NAME_RE

REPO = Path(__file__).resolve().parent.parent
CONFIG_SCHEMA = REPO / "deploy" / "config.schema.json"
CHART_SCHEMA = REPO / "deploy" / "helm" / "tessera-csi" / "values.schema.json"
_REF = "#/definitions/{model}"


def _model_schema(model: Any, definitions: dict[str, Any]) -> dict[str, Any]:
    """The model's schema with its nested models moved into the shared `definitions` (draft-07 has no `$defs`)."""
    schema = model.model_json_schema(ref_template=_REF)
    for name, sub in schema.pop("$defs", {}).items():
        if definitions.get(name, sub) != sub:
            raise ValueError(f"two config models are both named {name!r}; rename one")
        definitions[name] = sub
    return schema


def backends_schema(definitions: dict[str, Any]) -> dict[str, Any]:
    """`backends`: a map of names to one backend each, whose keys are exactly its type's options plus `type`."""
    types = sorted(backend_types())
    rules = []
    for type_name in types:
        options = _model_schema(backend_class(type_name).options_model, definitions)
        options["properties"] = {"type": {"const": type_name}, **options["properties"]}
        options["required"] = ["type", *options.get("required", [])]
        definitions[f"backend-{type_name}"] = options
        rules.append({"if": {"properties": {"type": {"const": type_name}}, "required": ["type"]},
                      "then": {"$ref": _REF.format(model=f"backend-{type_name}")}})
    return {
        "type": "object",
        "description": "Named backends; none: one file backend `local` (the embedded default).",
        "propertyNames": {"pattern": BACKEND_NAME_RE.pattern},
        "additionalProperties": {
            "type": "object", "required": ["type"],
            "properties": {"type": {"enum": types}},
            "allOf": rules,
        },
    }


def config_schema() -> dict[str, Any]:
    """The whole config file (what `tessera-csi config validate` accepts, apart from cross-field rules such as
    defaultBackend naming a configured backend)."""
    definitions: dict[str, Any] = {}
    top = _TopLevel.model_fields
    schema: dict[str, Any] = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "Tessera configuration file",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "driverName": {"type": "string", "maxLength": 63, "pattern": "^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$",
                           "default": top["driverName"].default},
            "defaultBackend": {"type": "string"},
            "stateDir": {"type": "string", "default": top["stateDir"].default},
            "node": _model_schema(NodeSettings, definitions),
            "backends": backends_schema(definitions),
        },
    }
    schema["definitions"] = dict(sorted(definitions.items()))
    return schema


def chart_schema(current: dict[str, Any]) -> dict[str, Any]:
    """The chart's values schema with its `config` part (stateDir, defaultBackend, node, backends) generated; the
    chart sets driverName itself, so `config` has no driverName."""
    out = copy.deepcopy(current)
    generated = config_schema()
    cfg = out["properties"]["config"]
    props = cfg["properties"]
    for key in ("defaultBackend", "node", "backends"):
        props[key] = generated["properties"][key]
    defs = out.setdefault("definitions", {})
    for name in [n for n in defs if n.startswith("config-")]:
        del defs[name]
    # the config's own definitions live under a prefix, apart from the chart's
    text = json.dumps(props)
    for name in generated["definitions"]:
        text = text.replace(f'"#/definitions/{name}"', f'"#/definitions/config-{name}"')
    cfg["properties"] = json.loads(text)
    for name, sub in generated["definitions"].items():
        defs[f"config-{name}"] = json.loads(json.dumps(sub).replace('"#/definitions/', '"#/definitions/config-'))
    return out


def _render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m csi.config_schema", description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite the schema files")
    mode.add_argument("--check", action="store_true", help="exit 1 when a schema file differs from the models")
    args = ap.parse_args(argv)
    wanted = {CONFIG_SCHEMA: _render(config_schema()),
              CHART_SCHEMA: _render(chart_schema(json.loads(CHART_SCHEMA.read_text())))}
    stale = [p for p, text in wanted.items() if not p.exists() or p.read_text() != text]
    if args.write:
        for p in stale:
            p.write_text(wanted[p])
            print(f"wrote {p.relative_to(REPO)}")
        return 0
    for p in stale:
        print(f"{p.relative_to(REPO)} differs from the config models: run `python -m csi.config_schema --write`",
              file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
