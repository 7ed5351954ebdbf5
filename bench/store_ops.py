"""Store operations per second and watch latency, on both backends.

    .venv/bin/python bench/store_ops.py [--seconds 2] [--backend embedded|etcd|both]

Starts its own etcd (tests/etcd_server.py: loopback, temp data dir) and an embedded store
in a temp dir (synchronous=FULL: every commit fsynced). Prints one JSON record per line:
{"name": ..., "value": ..., "unit": ...}.

- put/get sequential: one call at a time (latency-bound); concurrent: 64 in flight.
- cas: get + put(expect_mod_revision) on a key of one's own (no contention), per second.
- watch latency: put() issued -> event delivered to a watcher in the same process (and, for
  the embedded store, to a watcher of another store instance on the file: polled).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.records import Figure

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from esplanade.store.base import Store, WatchBatch
from esplanade.store.embedded import EmbeddedStore
from esplanade.store.etcd import EtcdStore
from tests.etcd_server import EtcdServer

CONCURRENCY = 64


def record(name: str, value: float, unit: str) -> None:
    sys.stdout.write(json.dumps({"name": name, "value": round(value, 3), "unit": unit}) + "\n")
    sys.stdout.flush()


async def rate(seconds: float, concurrency: int, op: Callable[[int], Awaitable[object]]) -> float:
    """Operations per second of `op(i)` run by `concurrency` tasks for `seconds`."""
    deadline = time.perf_counter() + seconds
    done = 0
    counter = iter(range(1 << 62))

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await op(next(counter))
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - started)


async def bench_store(name: str, store: Store, seconds: float) -> None:
    value = b"x" * 256
    prefix = f"/bench/{name}"
    record(
        f"store.{name}.put.sequential", await rate(seconds, 1, lambda i: store.put(f"{prefix}/p/{i}", value)), "ops/s"
    )
    record(
        f"store.{name}.put.concurrent{CONCURRENCY}",
        await rate(seconds, CONCURRENCY, lambda i: store.put(f"{prefix}/c/{i}", value)),
        "ops/s",
    )
    for i in range(1000):
        await store.put(f"{prefix}/g/{i}", value)
    record(
        f"store.{name}.get.sequential", await rate(seconds, 1, lambda i: store.get(f"{prefix}/g/{i % 1000}")), "ops/s"
    )
    record(
        f"store.{name}.get.concurrent{CONCURRENCY}",
        await rate(seconds, CONCURRENCY, lambda i: store.get(f"{prefix}/g/{i % 1000}")),
        "ops/s",
    )

    async def cas(i: int) -> None:
        key = f"{prefix}/cas/{i % 10_000}"
        kv = await store.get(key)
        await store.put(key, value, expect_mod_revision=kv.mod_revision if kv else 0)

    record(f"store.{name}.cas.sequential", await rate(seconds, 1, cas), "ops/s")
    record(f"store.{name}.cas.concurrent{CONCURRENCY}", await rate(seconds, CONCURRENCY, cas), "ops/s")

    await watch_latency(f"store.{name}.watch_latency", store, store, prefix, seconds)


async def watch_latency(name: str, writer: Store, watcher: Store, prefix: str, seconds: float) -> None:
    """put() issued on `writer` -> event delivered by a watch on `watcher`."""
    value = b"x" * 256
    latencies: list[float] = []
    start = await writer.ping() + 1
    watch = watcher.watch(f"{prefix}/w/", start)
    sent: dict[str, float] = {}
    seen = asyncio.Event()

    async def consume() -> None:
        async for item in watch:
            if isinstance(item, WatchBatch):
                now = time.perf_counter()
                for event in item.events:
                    latencies.append(now - sent[event.kv.key])
                seen.set()

    consumer = asyncio.create_task(consume())
    try:
        deadline = time.perf_counter() + seconds
        i = 0
        while time.perf_counter() < deadline or i < 20:
            key = f"{prefix}/w/{i}"
            seen.clear()
            sent[key] = time.perf_counter()
            await writer.put(key, value)
            await asyncio.wait_for(seen.wait(), 10)
            i += 1
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
    latencies.sort()
    record(f"{name}.p50", statistics.median(latencies) * 1e3, "ms")
    record(f"{name}.p99", latencies[int(len(latencies) * 0.99) - 1] * 1e3, "ms")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0, help="duration of each measurement")
    parser.add_argument("--backend", choices=("embedded", "etcd", "both"), default="both")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="esplanade-bench-") as tmp:
        if args.backend in ("embedded", "both"):
            async with EmbeddedStore(Path(tmp) / "state.db") as store:
                await bench_store("embedded", store, args.seconds)
                # Another store on the same file stands for another process: it learns of
                # writes by polling (every 25 ms), not by the in-process wake-up.
                async with EmbeddedStore(Path(tmp) / "state.db") as other:
                    await watch_latency(
                        "store.embedded.watch_latency_other_process", store, other, "/bench/xproc", args.seconds
                    )
        if args.backend in ("etcd", "both"):
            with EtcdServer(Path(tmp) / "etcd") as server:
                async with EtcdStore([server.endpoint]) as store:
                    await bench_store("etcd", store, args.seconds)


def run() -> list[Figure]:
    """For `make bench` (bench/run.py): this script with its defaults, as figures."""
    from bench.json_lines import figures_from_script  # here: the script also runs as a file

    return figures_from_script("store_ops", "store")


if __name__ == "__main__":
    asyncio.run(main())
