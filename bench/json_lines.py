"""Benchmarks that print one JSON record per line (`{"name", "value", "unit"}`) as figures.

policy_eval, api_requests and store_ops are standalone scripts with their own options; `make
bench` runs each with its defaults in a child process (so one's memory and threads do not
colour the next) and turns its records into figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.records import Figure

ROOT = Path(__file__).resolve().parent.parent
LOWER_IS_BETTER_UNITS = frozenset({"ns", "µs", "us", "ms", "s", "bytes", "KiB"})


def figures_from_script(module: str, group: str, *args: str, timeout: float = 1200.0) -> list[Figure]:
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"bench.{module} exited {done.returncode}: {done.stderr.strip()[-400:]}")
    figures = []
    for line in done.stdout.splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        unit = str(record["unit"])
        figures.append(
            Figure(
                name=str(record["name"]),
                value=float(record["value"]),
                unit=unit,
                higher_is_better=unit not in LOWER_IS_BETTER_UNITS,
                group=group,
            )
        )
    return figures
