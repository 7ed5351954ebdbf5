"""Generate the Python gRPC stubs of proto/esplanade/v1 into lib/esplanade/v1 (or another root).

    python proto/generate.py [OUTPUT_ROOT]

tests/test_proto_stubs.py regenerates into a temporary directory and fails if the committed
stubs differ, so a .proto change without `make proto` cannot land.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILES = sorted(p.relative_to(PROTO_ROOT).as_posix() for p in (PROTO_ROOT / "esplanade" / "v1").glob("*.proto"))
PACKAGE_INIT = '"""Generated gRPC stubs of the esplanade.v1 contracts (proto/esplanade/v1). Do not edit."""\n'


def generate(output_root: Path) -> list[Path]:
    out = output_root / "esplanade" / "v1"
    out.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={output_root}",
        f"--grpc_python_out={output_root}",
        f"--mypy_out={output_root}",
        f"--mypy_grpc_out={output_root}",
        *PROTO_FILES,
    ]
    # protoc finds the mypy-protobuf plugins (protoc-gen-mypy*) next to this interpreter.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    (out / "__init__.py").write_text(PACKAGE_INIT)
    return sorted(p for p in out.iterdir() if p.is_file())


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT.parent / "lib"
    for path in generate(root):
        print(path)
