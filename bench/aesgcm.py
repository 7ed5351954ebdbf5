"""Micro-benchmark of the compiled loop's AES-GCM: our VAES implementation vs OpenSSL's EVP.

    .venv/bin/python -m bench.aesgcm [--size 1400] [--iterations 200000]

Builds bench/csrc/aesgcm_micro.c against the extension's C sources (csrc/espfast_core.c,
csrc/espfast_aesgcm.c, -lcrypto, -O2 like the extension) and times ef_aead_seal (in place,
body + 2-byte trailer, as ef_esp_seal calls it) and ef_aead_open of one `--size`-byte message
with 8 bytes of AAD, AES-128 and AES-256, each implementation this CPU runs. CPU time per
call, best of 5 (the machine is shared). Prints one JSON record per line:
{"name", "value", "unit", "peer", "peer_value", "ratio"} with OpenSSL as the peer.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import tempfile
from pathlib import Path

from bench.records import Figure

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "services/dataplane/esplanade/dataplane/fastpath/csrc"
DRIVER = ROOT / "bench/csrc/aesgcm_micro.c"


def build(directory: Path) -> Path:
    binary = directory / "aesgcm_micro"
    compiler = shlex.split(os.environ.get("CC") or "cc")
    sources = [str(DRIVER), str(CSRC / "espfast_core.c"), str(CSRC / "espfast_aesgcm.c")]
    subprocess.run([*compiler, "-O2", f"-I{CSRC}", *sources, "-lcrypto", "-o", str(binary)], check=True, timeout=300)
    return binary


def run(size: int = 1400, iterations: int = 200000) -> list[Figure]:
    with tempfile.TemporaryDirectory() as tmp:
        binary = build(Path(tmp))
        done = subprocess.run(
            [str(binary), str(size), str(iterations)], check=True, capture_output=True, text=True, timeout=600
        )
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    evp = {
        (r["key_bits"], op): r[f"{op}_ns"] for r in rows if r["implementation"] == "openssl" for op in ("seal", "open")
    }
    figures = []
    for r in rows:
        for op in ("seal", "open"):
            own = r["implementation"] != "openssl"
            figures.append(
                Figure(
                    name=f"aesgcm{r['key_bits']}.{op}.{r['implementation']}",
                    value=r[f"{op}_ns"],
                    unit=f"ns per {r['size']}-byte message",
                    peer="openssl" if own else None,
                    peer_value=evp[(r["key_bits"], op)] if own else None,
                    higher_is_better=False,
                    group="aesgcm",
                )
            )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1400)
    parser.add_argument("--iterations", type=int, default=200000)
    args = parser.parse_args()
    for figure in run(args.size, args.iterations):
        print(json.dumps(figure.to_json()))


if __name__ == "__main__":
    main()
