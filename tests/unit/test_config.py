import subprocess
import sys
import textwrap

import pytest

from csi.config import ConfigError, load_config, parse_config


def test_no_file_gives_embedded_file_backend(tmp_path):
    cfg = parse_config({}, "x")
    assert list(cfg.backends) == ["local"] and cfg.backends["local"].type == "file"
    assert cfg.default_backend == "local"


def test_every_problem_listed_with_its_path():
    with pytest.raises(ConfigError) as e:
        parse_config({"driverName": "Bad_Name", "backends": {
            "fast": {"type": "file"},                       # missing directory
            "slow": {"type": "nope"},
            "odd": {"type": "file", "directory": "rel", "colour": "red"},
        }})
    problems = "\n".join(e.value.problems)
    assert "driverName:" in problems
    assert "backends.fast.directory: Field required" in problems
    assert "backends.slow.type: unknown backend type 'nope'" in problems
    assert "backends.odd.directory:" in problems and "backends.odd.colour:" in problems
    assert "defaultBackend: required when more than one backend is configured" in problems


def test_default_backend_must_exist():
    with pytest.raises(ConfigError) as e:
        parse_config({"defaultBackend": "x", "backends": {"a": {"type": "file", "directory": "/tmp/a"}}})
    assert any(p.startswith("defaultBackend: 'x' is not one of") for p in e.value.problems)


def test_cli_validate(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(textwrap.dedent("""
        backends:
          local: {type: file, directory: /tmp/x}
    """))
    bad = tmp_path / "bad.yaml"
    bad.write_text("backends:\n  fast: {type: file}\n")
    ok = subprocess.run([sys.executable, "-m", "csi.cli", "config", "validate", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout
    no = subprocess.run([sys.executable, "-m", "csi.cli", "config", "validate", str(bad)], capture_output=True, text=True)
    assert no.returncode == 1
    assert "backends.fast.directory: Field required" in no.stderr


def test_yaml_syntax_error_is_reported(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("backends: [unclosed\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(f))
    assert e.value.problems[0].startswith("(yaml):")
