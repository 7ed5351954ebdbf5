"""No lost update: 1,000 concurrent CAS writers on one counter and on a few, both backends."""

from __future__ import annotations

from esplanade.store.base import Store
from tests.store.counter import run_increments


async def test_one_thousand_writers_on_one_counter(store: Store) -> None:
    attempts = await run_increments(store, ["/counter"], 1000)
    kv = await store.get("/counter")
    assert kv is not None
    assert int(kv.value) == 1000
    assert kv.version == 1000, "exactly one successful write per increment"
    assert sum(attempts) > 1000, "the writers did contend (else this test proves nothing)"


async def test_one_thousand_writers_on_a_few_counters(store: Store) -> None:
    keys = [f"/counters/{i}" for i in range(8)]
    await run_increments(store, keys, 1000)
    kvs, _ = await store.range("/counters/")
    assert {kv.key: int(kv.value) for kv in kvs} == {key: 125 for key in keys}
