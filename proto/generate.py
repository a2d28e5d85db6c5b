"""Regenerates csi/_pb from proto/csi.proto with grpcio-tools.

Run through `make proto`. `--check` regenerates into a temporary directory and fails if the checked-in modules
differ, so CI catches a proto edit that was not followed by a regeneration.
"""
from __future__ import annotations

import filecmp
import pathlib
import sys
import tempfile

from grpc_tools import protoc
import grpc_tools

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "csi" / "_pb"
GENERATED = ("csi_pb2.py", "csi_pb2.pyi", "csi_pb2_grpc.py")


def generate(out: pathlib.Path) -> None:
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main([
        "protoc", f"-I{ROOT / 'proto'}", f"-I{include}",
        f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}",
        str(ROOT / "proto" / "csi.proto"),
    ])
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    # protoc writes a top-level import; the modules live in a package.
    grpc_mod = out / "csi_pb2_grpc.py"
    grpc_mod.write_text(grpc_mod.read_text().replace("import csi_pb2 as csi__pb2", "from . import csi_pb2 as csi__pb2"))


def main(argv: list[str]) -> int:
    if "--check" in argv:
        with tempfile.TemporaryDirectory() as tmp:
            generate(pathlib.Path(tmp))
            stale = [n for n in GENERATED if not (OUT / n).exists() or not filecmp.cmp(OUT / n, pathlib.Path(tmp) / n, shallow=False)]
        if stale:
            print(f"generated modules are stale: {', '.join(stale)}; run `make proto`", file=sys.stderr)
            return 1
        print("generated modules are up to date")
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    generate(OUT)
    print(f"regenerated {', '.join(GENERATED)} in {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
