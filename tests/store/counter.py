"""Read-modify-write increments with CAS and retry: the pattern every service uses."""

from __future__ import annotations

import asyncio
import random

from esplanade.store.base import CasConflict, Store


async def increment(store: Store, key: str, *, max_attempts: int = 10_000) -> int:
    """Add one to the decimal counter at `key` (created at 1); return the attempts it took."""
    delay = 0.005
    for attempt in range(1, max_attempts + 1):
        kv = await store.get(key)
        value, revision = (int(kv.value), kv.mod_revision) if kv else (0, 0)
        try:
            await store.put(key, str(value + 1).encode(), expect_mod_revision=revision)
            return attempt
        except CasConflict:
            pass
        # Exponential backoff with full jitter: contenders spread out instead of colliding
        # again in lockstep. After sleeping, read again: the conflict's view is stale by then.
        await asyncio.sleep(random.uniform(0, delay))
        delay = min(delay * 2, 2.0)
    raise AssertionError(f"no increment of {key} after {max_attempts} attempts")


async def run_increments(store: Store, keys: list[str], writers: int) -> list[int]:
    """`writers` concurrent tasks, one increment each, spread round-robin over `keys`."""
    return list(await asyncio.gather(*(increment(store, keys[i % len(keys)]) for i in range(writers))))
