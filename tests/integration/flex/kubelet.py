"""Calls the FlexVolume shim exactly as kubelet does: the executable with argv [command, args...], JSON options as one
argument, and stdout+stderr read together and parsed as one JSON object (kubelet uses CombinedOutput)."""
from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from typing import Any, Mapping, Optional

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
SHIM = os.path.join(REPO, "flex", "block")


@dataclass
class Answer:
    rc: int
    stdout: str
    stderr: str
    reply: dict

    @property
    def ok(self) -> bool:
        return self.rc == 0 and self.reply.get("status") == "Success"


class Kubelet:
    def __init__(self, config: str, log: str, node: str = "flex-node", exe: str = SHIM) -> None:
        self.exe = exe
        self.env = dict(os.environ, TESSERA_CONFIG=config, TESSERA_FLEX_LOG=log, TESSERA_NODE_NAME=node)
        self.node = node

    def call(self, command: str, *args: str, timeout: float = 300) -> Answer:
        p = subprocess.run([self.exe, command, *args], capture_output=True, text=True, env=self.env, timeout=timeout)
        combined = p.stdout + p.stderr
        try:
            reply = json.loads(combined)
        except ValueError:
            raise AssertionError(f"{command}: kubelet could not parse the combined output {combined!r}") from None
        assert isinstance(reply, dict) and "status" in reply, reply
        assert (p.returncode == 0) == (reply["status"] == "Success"), \
            f"{command}: exit code {p.returncode} disagrees with status {reply['status']!r}"
        return Answer(p.returncode, p.stdout, p.stderr, reply)

    def ok(self, command: str, *args: str) -> dict:
        a = self.call(command, *args)
        assert a.ok, f"{command} failed: {a.reply}"
        return a.reply


def options(volume_id: str, pv_name: str, fs_type: str = "ext4", readonly: bool = False,
            extra: Optional[Mapping[str, str]] = None, **pod: Any) -> str:
    """The JSON kubelet builds: fsType, readwrite, pvOrVolumeName, then the PV's flexVolume.options."""
    opts = {"kubernetes.io/fsType": fs_type, "kubernetes.io/readwrite": "ro" if readonly else "rw",
            "kubernetes.io/pvOrVolumeName": pv_name, "volumeID": volume_id}
    opts.update(extra or {})
    opts.update({f"kubernetes.io/{k.replace('_', '.')}": v for k, v in pod.items()})
    return json.dumps(opts)
