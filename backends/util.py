"""Helpers shared by backends: running commands without a shell, atomic JSON files."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from typing import IO, Any, Mapping, Optional, Sequence

from .errors import BackendUnavailable, DeadlineExceeded, Internal

log = logging.getLogger(__name__)


class CommandError(Internal):
    def __init__(self, argv: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        detail = (stderr or stdout).strip().splitlines()
        super().__init__(f"{os.path.basename(argv[0])} failed (exit {returncode}): {detail[-1] if detail else 'no output'}")


def run(argv: Sequence[str], *, timeout: float = 120.0, check: bool = True, input: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        stdout: Optional[IO[bytes]] = None) -> subprocess.CompletedProcess[str]:
    """Run a command from an argument list (never a shell string). Raises CommandError on a non-zero exit when
    `check`, DeadlineExceeded on timeout, BackendUnavailable when the program is not installed. `stdout`: an open
    file the command writes its output to instead of memory (a tool whose output grows with the volume); the
    result's stdout is then empty."""
    full_env = None
    if env:
        full_env = dict(os.environ)
        full_env.update(env)
    try:
        proc = subprocess.run(list(argv), stdout=subprocess.PIPE if stdout is None else stdout,
                              stderr=subprocess.PIPE, text=True, timeout=timeout, input=input, env=full_env,
                              stdin=None if input is not None else subprocess.DEVNULL)
    except FileNotFoundError:
        raise BackendUnavailable(f"{argv[0]} is not installed on this host") from None
    except subprocess.TimeoutExpired:
        raise DeadlineExceeded(f"{os.path.basename(argv[0])} did not finish within {timeout:.0f}s") from None
    if proc.stdout is None:
        proc.stdout = ""
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stdout, proc.stderr)
    return proc


def write_json_atomic(path: str, data: Any, mode: int = 0o600) -> None:
    """Write JSON so that a reader (or a crash) sees either the old file or the whole new one."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), mode)
            json.dump(data, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)
