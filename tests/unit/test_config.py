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


def test_duplicate_keys_named_with_both_lines(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(textwrap.dedent("""\
        backends:
          fast:
            type: file
            directory: /tmp/a
          fast:
            type: file
            directory: /tmp/b
            directory: /tmp/c
    """))
    with pytest.raises(ConfigError) as e:
        load_config(str(f))
    problems = e.value.problems
    assert any(p.startswith("backends.fast: defined twice (lines 2 and 5)") for p in problems), problems
    assert any(p.startswith("backends.fast.directory: defined twice (lines 7 and 8)") for p in problems), problems


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n# and another\n"])
def test_empty_file_is_an_error_not_the_default(tmp_path, text):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(str(f))
    assert e.value.problems[0].startswith("(file): is empty")


def test_unknown_keys_get_a_suggestion():
    with pytest.raises(ConfigError) as e:
        parse_config({"stateDri": "/var/lib/t", "node": {"allowedPathPrefix": ["/var/lib/kubelet"]},
                      "backends": {"local": {"type": "file", "directory": "/tmp/x", "directio": True}}})
    problems = e.value.problems
    assert "stateDri: unknown key (did you mean 'stateDir'?)" in problems, problems
    assert "node.allowedPathPrefix: unknown key (did you mean 'allowedPathPrefixes'?)" in problems, problems
    assert "backends.local.directio: unknown key (did you mean 'directIO'?)" in problems, problems


def test_unknown_key_far_from_any_lists_the_known_ones():
    with pytest.raises(ConfigError) as e:
        parse_config({"backends": {"local": {"type": "file", "directory": "/tmp/x", "colour": "red"}}})
    assert "backends.local.colour: unknown key (known keys: directIO, directory)" in e.value.problems


def test_non_utf8_file_is_reported(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_bytes(b"backends:\n  local: {type: file, directory: /tmp/\xff}\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(f))
    assert e.value.problems == ["(file): is not UTF-8 text"]


def test_version_flag_and_command_agree():
    flag = subprocess.run([sys.executable, "-m", "csi.cli", "--version"], capture_output=True, text=True)
    cmd = subprocess.run([sys.executable, "-m", "csi.cli", "version"], capture_output=True, text=True)
    assert flag.returncode == 0 and cmd.returncode == 0
    assert flag.stdout.startswith("tessera-csi ") and flag.stdout == cmd.stdout
