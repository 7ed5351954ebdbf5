"""A separate OS process on a shared embedded store file, driven by the multi-process tests.

python -m tests.store.embedded_worker increment DB KEY COUNT CONCURRENCY
    COUNT CAS increments of KEY by CONCURRENCY tasks; prints "done <attempts>".
python -m tests.store.embedded_worker write DB PREFIX CONCURRENCY
    writes PREFIX<n> = n forever; prints "committed <n>" after each put returns
    (so every printed key is acknowledged), until killed.
python -m tests.store.embedded_worker lease DB KEY TTL
    grants a lease, writes KEY under it, prints "leased <id>", then waits to be killed.
"""

from __future__ import annotations

import asyncio
import itertools
import sys

from esplanade.store.embedded import EmbeddedStore
from tests.store.counter import increment


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def _increment(db: str, key: str, count: int, concurrency: int) -> None:
    async with EmbeddedStore(db) as store:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(count):
            queue.put_nowait(i)
        attempts = 0

        async def worker() -> None:
            nonlocal attempts
            while not queue.empty():
                queue.get_nowait()
                took = await increment(store, key)
                attempts += took

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        _say(f"done {attempts}")


async def _write(db: str, prefix: str, concurrency: int) -> None:
    async with EmbeddedStore(db) as store:
        numbers = itertools.count()

        async def writer() -> None:
            while True:
                n = next(numbers)
                await store.put(f"{prefix}{n:08d}", str(n).encode())
                _say(f"committed {n}")

        await asyncio.gather(*(writer() for _ in range(concurrency)))


async def _lease(db: str, key: str, ttl: int) -> None:
    async with EmbeddedStore(db) as store:
        lease = await store.grant_lease(ttl)
        await store.put(key, b"leased", lease=lease.id)
        _say(f"leased {lease.id}")
        await asyncio.Event().wait()


def main(argv: list[str]) -> None:
    command, db, *rest = argv
    if command == "increment":
        asyncio.run(_increment(db, rest[0], int(rest[1]), int(rest[2])))
    elif command == "write":
        asyncio.run(_write(db, rest[0], int(rest[1])))
    elif command == "lease":
        asyncio.run(_lease(db, rest[0], int(rest[1])))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
