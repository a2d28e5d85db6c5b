"""One schema for the configuration: the chart's values schema and deploy/config.schema.json are generated from the
pydantic models `config validate` uses, so Helm refuses at install time what the plugin would refuse at start."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import jsonschema
import pytest
import yaml

from csi.config import ConfigError, parse_config
from csi.config_schema import CHART_SCHEMA, CONFIG_SCHEMA, REPO

from .k8s import CHART_DIR, helm_python, values_files


def test_schema_files_match_the_config_models():
    r = subprocess.run([sys.executable, "-m", "csi.config_schema", "--check"], cwd=REPO, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr


def _helm_problem(values: dict) -> str:
    with helm_python.Chart.load(str(CHART_DIR)) as chart:
        try:
            chart.validate_schema(values)
        except Exception as e:  # noqa: BLE001 - the SDK raises its own error type with Helm's message
            return str(e)
    return ""


def _lvm_values(**backend) -> dict:
    values = yaml.safe_load(values_files()["lvm"].read_text())
    values = copy.deepcopy(values)
    name, body = next(iter(values["config"]["backends"].items()))
    values["config"]["backends"] = {name: {**body, **backend}}
    return values


def test_misspelled_backend_option_fails_helm_and_config_validate_alike():
    values = _lvm_values(thinpool="pool")
    name = next(iter(values["config"]["backends"]))
    helm = _helm_problem(values)
    assert helm, "Helm accepted a misspelled backend option"
    assert f"/config/backends/{name}" in helm and "'thinpool' not allowed" in helm, helm
    with pytest.raises(ConfigError) as e:
        parse_config(values["config"], "values")
    assert f"backends.{name}.thinpool: unknown key (did you mean 'thinPool'?)" in e.value.problems


def test_wrong_type_of_backend_option_fails_helm():
    helm = _helm_problem(_lvm_values(overcommitRatio="lots"))
    assert "overcommitRatio" in helm and "want number" in helm, helm


def test_unknown_backend_type_fails_helm():
    helm = _helm_problem(_lvm_values(type="zfs"))
    assert "/type" in helm and "must be one of" in helm, helm


@pytest.mark.parametrize("case", sorted(values_files()))
def test_shipped_values_pass_helm_schema(case):
    values = yaml.safe_load(values_files()[case].read_text())
    assert _helm_problem(values) == ""


def test_shipped_kustomize_configs_match_the_config_schema():
    schema = json.loads(CONFIG_SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    configs = sorted((REPO / "deploy" / "kubernetes").rglob("config*.yaml"))
    checked = 0
    for path in configs:
        for doc in yaml.safe_load_all(path.read_text()):
            text = (doc or {}).get("data", {}).get("config.yaml") if isinstance(doc, dict) else None
            if text is None:
                continue
            cfg = yaml.safe_load(text)
            problems = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(cfg)]
            assert not problems, f"{path}: {problems}"
            checked += 1
    assert checked >= 3, f"expected the shipped configs in deploy/kubernetes, found {checked}"


def test_chart_schema_keeps_its_own_parts():
    schema = json.loads(CHART_SCHEMA.read_text())
    assert {"image", "sidecars", "controller", "node"} <= set(schema["properties"])
    assert "driverName" not in schema["properties"]["config"]["properties"]
