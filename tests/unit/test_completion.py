"""The completion script, loaded into a real bash and asked what a user's <TAB> would get."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest


def _complete(words: list[str], shell: str = "bash") -> list[str]:
    script = subprocess.run([sys.executable, "-m", "csi.cli", "completion", shell], capture_output=True, text=True,
                            check=True).stdout
    line = " ".join(words)
    probe = (f"{script}\nCOMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _tessera_csi; "
             'printf "%s\\n" "${COMPREPLY[@]}"')
    if shell == "zsh":
        probe = probe.replace("autoload -U +X bashcompinit && bashcompinit\n", "")  # run its bash part in bash
    r = subprocess.run(["bash", "-c", probe], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return [w for w in r.stdout.splitlines() if w]


@pytest.mark.skipif(shutil.which("bash") is None, reason="MISSING: bash")
def test_subcommands_and_flags_complete():
    assert _complete(["tessera-csi", "vo"]) == ["volumes"]
    assert _complete(["tessera-csi", "volumes", "or"]) == ["orphans"]
    assert _complete(["tessera-csi", "serve", "--log-f"]) == ["--log-format"]
    assert set(_complete(["tessera-csi", ""])) >= {"serve", "config", "volumes", "version", "completion", "--version"}
    assert _complete(["tessera-csi", "volumes", "list", "--ba"]) == ["--backend"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="MISSING: bash")
def test_zsh_script_is_the_bash_function_behind_bashcompinit():
    out = subprocess.run([sys.executable, "-m", "csi.cli", "completion", "zsh"], capture_output=True, text=True,
                         check=True).stdout
    assert out.splitlines()[1] == "autoload -U +X bashcompinit && bashcompinit"
    assert _complete(["tessera-csi", "config", "v"], shell="zsh") == ["validate"]
