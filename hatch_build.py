"""Hatch build hook: compile the ESP hot loop (`esplanade.dataplane.fastpath._espfast`).

The extension is plain C against the CPython API and OpenSSL's libcrypto, compiled with the
system compiler (`$CC`, default `cc`) in one command (one line), no setuptools:

    cc -O2 -fPIC -shared -I<python include> csrc/espfast_core.c csrc/espfast_aesgcm.c
        csrc/espfast_module.c csrc/espfast_pump.c -lcrypto

Editable installs (`pip install -e .`) get the module next to its wrapper in
services/dataplane/esplanade/dataplane/fastpath/; wheels get it force-included (and a
platform tag). Without a compiler, Python headers or libssl-dev the build does NOT fail: it
prints a note and the package runs the pure-Python hot path
(`esplanade.dataplane.fastpath.hot_path_status` says why). `ESPLANADE_BUILD_ESPFAST=0`
skips the compile on purpose.

`python hatch_build.py` rebuilds the module in place (development).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

try:
    from hatchling.builders.hooks.plugin.interface import BuildHookInterface
except ImportError:  # imported outside a build: tests and `python hatch_build.py`
    BuildHookInterface = object  # type: ignore[assignment,misc]

PACKAGE_DIR = Path("services/dataplane/esplanade/dataplane/fastpath")
SOURCES = (
    "csrc/espfast_core.c",
    "csrc/espfast_aesgcm.c",
    "csrc/espfast_module.c",
    "csrc/espfast_pump.c",
)
WHEEL_DIR = "esplanade/dataplane/fastpath"
CFLAGS = ("-O2", "-fPIC", "-shared", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers")


def extension_name() -> str:
    return "_espfast" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")


def compile_espfast(root: Path, out_dir: Path, cc: str | None = None) -> tuple[Path | None, str]:
    """Compile the extension into `out_dir`; (path, "") or (None, why not). Never raises on a missing toolchain."""
    if os.environ.get("ESPLANADE_BUILD_ESPFAST", "1") == "0":
        return None, "ESPLANADE_BUILD_ESPFAST=0"
    compiler = shlex.split(cc or os.environ.get("CC") or "cc")
    if not compiler or shutil.which(compiler[0]) is None:
        return None, f"no C compiler ({' '.join(compiler) or 'cc'} not found)"
    include = sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").exists():
        return None, f"no Python headers in {include} (Debian: python3-dev)"
    src = root / PACKAGE_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / extension_name()
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        scratch = Path(tmp) / target.name
        command = [
            *compiler,
            *CFLAGS,
            f"-I{include}",
            *(str(src / s) for s in SOURCES),
            "-lcrypto",
            "-o",
            str(scratch),
        ]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"the compiler did not run: {exc}"
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            hint = " (Debian: libssl-dev)" if "openssl/" in done.stderr else ""
            return None, "the compile failed" + hint + ": " + " | ".join(tail)
        # Rename over the old module: a process that has it mapped keeps the old inode.
        os.replace(scratch, target)
    return target, ""


class EspFastBuildHook(BuildHookInterface):  # type: ignore[misc,valid-type]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        root = Path(self.root)
        editable = version == "editable"
        out_dir = root / PACKAGE_DIR if editable else root / "build" / "espfast"
        path, why = compile_espfast(root, out_dir)
        if path is None:
            print(
                f"esplanade: NOTE: the compiled ESP hot loop was not built: {why}.\n"
                "esplanade: the dataplane runs the pure-Python hot path (dataplane.hot_path: auto).",
                file=sys.stderr,
            )
            return
        print(f"esplanade: built {path.name} (compiled ESP hot loop)", file=sys.stderr)
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        if not editable:
            build_data["force_include"][str(path)] = f"{WHEEL_DIR}/{path.name}"


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    built, reason = compile_espfast(here, here / PACKAGE_DIR)
    print(built if built else f"not built: {reason}")
    sys.exit(0 if built else 1)
