"""Run every benchmark (or those named) and write bench/results/latest.{json,md}.

    python -m bench.run [name ...]

Each benchmark module has `run() -> list[Figure]`. A benchmark that fails is reported in the
results, and the others still run.
"""

from __future__ import annotations

import importlib
import sys
import time
import traceback

from bench.records import Figure
from bench.report import write_results

BENCHMARKS: list[str] = [
    "esp_fastpath",
    "aesgcm",
    "dataplane_throughput",
    "ike_setup_rate",
    "scaleout",
    "policy_propagation",
    "policy_eval",
    "store_ops",
    "api_requests",
]


def main(argv: list[str]) -> int:
    selected = [b for b in BENCHMARKS if not argv or b in argv]
    figures: list[Figure] = []
    errors: dict[str, str] = {}
    for name in selected:
        started = time.monotonic()
        print(f"== {name}", flush=True)
        try:
            module = importlib.import_module(f"bench.{name}")
            got = module.run()
        except Exception as exc:
            traceback.print_exc()
            errors[name] = f"{type(exc).__name__}: {exc}"
            continue
        for figure in got:
            print(
                f"   {figure.name}: {figure.value:.4g} {figure.unit}"
                + (f" (ratio {figure.ratio:.2f})" if figure.ratio else "")
            )
        figures.extend(got)
        print(f"   ({time.monotonic() - started:.0f}s)", flush=True)
    path = write_results(figures, errors)
    print(f"wrote {path}")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
