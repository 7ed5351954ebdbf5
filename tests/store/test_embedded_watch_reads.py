"""A watch on the embedded store reads the log only when a new revision may hold its events:
this process's own writes outside its prefix cost it nothing, everything else is read."""

from __future__ import annotations

from pathlib import Path

from esplanade.store.base import Delete, Put
from esplanade.store.embedded import EmbeddedStore
from tests.conditions import async_wait_until
from tests.store.watch_collector import WatchCollector


async def test_own_writes_elsewhere_are_skipped_and_every_event_still_arrives(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store, other = EmbeddedStore(path), EmbeddedStore(path, poll_interval=0.01)
    await store.connect()
    await other.connect()
    try:
        revision = await store.ping()
        watch = WatchCollector(store.watch("/w/", revision + 1))
        for i in range(40):  # this process, outside the prefix: no reads
            await store.put(f"/elsewhere/{i}", b"x")
        await store.commit([], [Put("/elsewhere/a", b"1"), Put("/elsewhere/b", b"2")])
        await store.delete("/elsewhere/a")
        reads = store.watch_reads
        assert reads <= 1  # at most the read for a revision the poller saw before the writer said whose it was
        await store.put("/w/mine", b"m")  # this process, inside: read
        await other.put("/elsewhere/theirs", b"t")  # another process: read (it cannot know)
        await other.put("/w/theirs", b"t")
        await store.commit([], [Put("/elsewhere/c", b"3"), Delete("/w/mine")])  # mixed: read
        await async_wait_until(lambda: _ready(watch, 3), what="three events")
        assert [(kind, key) for kind, key, _, _ in watch.summary()] == [
            ("put", "/w/mine"),
            ("put", "/w/theirs"),
            ("delete", "/w/mine"),
        ]
        assert store.watch_reads > reads
        await watch.stop()
    finally:
        await other.close()
        await store.close()


async def _ready(watch: WatchCollector, count: int) -> bool:
    return len(watch.events) >= count
