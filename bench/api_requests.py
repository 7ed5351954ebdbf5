"""REST API requests per second, reads and writes, on the embedded store and on etcd.

    .venv/bin/python bench/api_requests.py [--seconds 3] [--backend embedded|etcd|both]

Runs the whole API stack of the tests (tests/api/stack.py: real FastAPI app on uvicorn over
loopback HTTP, real policy service, fake keyexchange) and drives it with 16 concurrent
httpx clients from another thread. Prints one JSON record per line: {"name", "value", "unit"}.

- read: GET /api/v1/groups/{id} (token check, policy gRPC, JSON).
- write: PUT /api/v1/pools/{name} (token check, store CAS write, audit record).
- policy write: PUT /api/v1/groups/{id} (policy service: validation + generation CAS).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.records import Figure

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from tests.api.stack import ApiStack
from tests.etcd_server import EtcdServer

CONCURRENCY = 16


async def rate(stack: ApiStack, seconds: float, method: str, path_of: object, body: object) -> float:
    headers = {"Authorization": f"Bearer {stack.tokens['admin']}"}
    done = 0
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=stack.url, headers=headers, timeout=30) as client:

        async def worker(n: int) -> None:
            nonlocal done
            i = 0
            while time.monotonic() < deadline:
                path = path_of(n, i)  # type: ignore[operator]
                response = await client.request(method, path, json=body(n, i) if callable(body) else body)
                if response.status_code >= 300:
                    raise RuntimeError(f"{method} {path}: {response.status_code} {response.text[:200]}")
                done += 1
                i += 1

        started = time.monotonic()
        await asyncio.gather(*(worker(n) for n in range(CONCURRENCY)))
        return done / (time.monotonic() - started)


def measure(backend: str, seconds: float, etcd_endpoint: str | None) -> list[dict[str, object]]:
    with tempfile.TemporaryDirectory() as tmp, ApiStack(Path(tmp), etcd_endpoint=etcd_endpoint) as stack:
        with stack.client() as client:
            for n in range(CONCURRENCY):
                client.put(f"/api/v1/groups/g{n}", json={"description": "bench"}).raise_for_status()
        reads = asyncio.run(rate(stack, seconds, "GET", lambda n, i: f"/api/v1/groups/g{n}", None))
        writes = asyncio.run(
            rate(
                stack,
                seconds,
                "PUT",
                lambda n, i: f"/api/v1/pools/p{n}",
                lambda n, i: {"addrs": f"10.{n}.{i % 250}.0/24"},
            )
        )
        policy_writes = asyncio.run(
            rate(stack, seconds, "PUT", lambda n, i: f"/api/v1/groups/g{n}", lambda n, i: {"description": f"v{i}"})
        )
    return [
        {"name": f"api.{backend}.read_requests_per_s", "value": round(reads, 1), "unit": "req/s"},
        {"name": f"api.{backend}.write_requests_per_s", "value": round(writes, 1), "unit": "req/s"},
        {"name": f"api.{backend}.policy_write_requests_per_s", "value": round(policy_writes, 1), "unit": "req/s"},
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--backend", choices=["embedded", "etcd", "both"], default="both")
    args = parser.parse_args()
    records: list[dict[str, object]] = []
    if args.backend in ("embedded", "both"):
        records += measure("embedded", args.seconds, None)
    if args.backend in ("etcd", "both"):
        with tempfile.TemporaryDirectory() as tmp:
            etcd = EtcdServer(Path(tmp) / "etcd")
            etcd.start()
            try:
                records += measure("etcd", args.seconds, etcd.endpoint)
            finally:
                etcd.stop()
    for record in records:
        print(json.dumps(record))


def run() -> list[Figure]:
    """For `make bench` (bench/run.py): this script with its defaults, as figures."""
    from bench.json_lines import figures_from_script  # here: the script also runs as a file

    return figures_from_script("api_requests", "api")


if __name__ == "__main__":
    main()
