"""The watch contract: ordered events, history, resume, Resync after compaction; both backends."""

from __future__ import annotations

from esplanade.store.base import Compare, Delete, EventType, Put, Resync, Store, WatchBatch
from tests.conditions import async_wait_until
from tests.store.conftest import Backend
from tests.store.watch_collector import WatchCollector


async def _until(predicate: object, what: str, timeout: float = 10.0) -> None:
    async def check() -> bool:
        return bool(predicate())  # type: ignore[operator]

    await async_wait_until(check, timeout=timeout, what=what)


async def test_events_arrive_in_revision_order(store: Store) -> None:
    start = await store.ping() + 1
    watch = WatchCollector(store.watch("/w/", start))
    try:
        await store.put("/w/a", b"1")
        await store.put("/other", b"not watched")
        await store.put("/w/b", b"2")
        await store.put("/w/a", b"3")
        await store.delete("/w/b")
        await store.commit([Compare("/w/a", 0 + 5)], [Put("/w/c", b"4"), Delete("/w/a")])
        await _until(lambda: len(watch.events) >= 6, "six events")
        assert watch.summary() == [
            ("put", "/w/a", b"1", 2),
            ("put", "/w/b", b"2", 4),
            ("put", "/w/a", b"3", 5),
            ("delete", "/w/b", b"", 6),
            ("put", "/w/c", b"4", 7),
            ("delete", "/w/a", b"", 7),
        ]
        revisions = [e.kv.mod_revision for e in watch.events]
        assert revisions == sorted(revisions)
        for item in watch.items:
            assert isinstance(item, WatchBatch)
            assert item.revision == item.events[-1].kv.mod_revision
        put_a = watch.events[2]
        assert (put_a.kv.create_revision, put_a.kv.version, put_a.prev_value) == (2, 2, b"1")
        delete_b = watch.events[3]
        assert delete_b.type == EventType.DELETE and delete_b.prev_value == b"2"
        assert watch.error is None
    finally:
        await watch.stop()


async def test_watch_from_a_past_revision_replays_history(store: Store) -> None:
    first = await store.put("/h/x", b"1")
    await store.put("/h/x", b"2")
    await store.delete("/h/x")
    await store.put("/h/y", b"3")
    watch = WatchCollector(store.watch("/h/", first + 1))
    try:
        await _until(lambda: len(watch.events) >= 3, "history")
        assert watch.summary() == [
            ("put", "/h/x", b"2", first + 1),
            ("delete", "/h/x", b"", first + 2),
            ("put", "/h/y", b"3", first + 3),
        ]
        await store.put("/h/z", b"live")
        await _until(lambda: len(watch.events) >= 4, "a live event after history")
        assert watch.summary()[-1] == ("put", "/h/z", b"live", first + 4)
    finally:
        await watch.stop()


async def test_watch_from_now_sees_only_later_writes(store: Store) -> None:
    await store.put("/n/old", b"old")
    watch = WatchCollector(store.watch("/n/"))
    try:
        # The watch is established once a write made after it shows up; then check order.
        async def established() -> bool:
            await store.put("/n/probe", b"p")
            return any(e.kv.key == "/n/probe" for e in watch.events)

        await async_wait_until(established, what="the watch to be established")
        assert all(e.kv.key != "/n/old" for e in watch.events)
    finally:
        await watch.stop()


async def test_resume_on_a_new_connection_from_the_last_revision(backend: Backend) -> None:
    """A consumer that reconnects (new store instance) misses nothing and sees nothing twice."""
    first = backend.open()
    await first.connect()
    start = await first.ping() + 1
    watch = WatchCollector(first.watch("/r/", start))
    await first.put("/r/1", b"1")
    await first.put("/r/2", b"2")
    await _until(lambda: len(watch.events) >= 2, "first two events")
    last = watch.items[-1]
    assert isinstance(last, WatchBatch)
    await watch.stop()
    await first.close()

    writer = backend.open()
    await writer.connect()
    await writer.put("/r/3", b"3")  # written while nobody watches
    await writer.delete("/r/1")

    second = backend.open()
    await second.connect()
    resumed = WatchCollector(second.watch("/r/", last.revision + 1))
    try:
        await writer.put("/r/4", b"4")
        await _until(lambda: len(resumed.events) >= 3, "missed and new events")
        assert [(kind, key) for kind, key, _, _ in resumed.summary()] == [
            ("put", "/r/3"),
            ("delete", "/r/1"),
            ("put", "/r/4"),
        ]
    finally:
        await resumed.stop()
        await second.close()
        await writer.close()


async def test_watch_below_compaction_gets_a_consistent_resync(store: Store) -> None:
    base = await store.ping()
    for i in range(10):
        await store.put(f"/s/{i % 3}", str(i).encode())
    await store.put("/s/deleted", b"x")
    await store.delete("/s/deleted")
    await store.put("/elsewhere", b"not in prefix")
    compacted_at = await store.ping()
    await store.compact(compacted_at)

    watch = WatchCollector(store.watch("/s/", base + 1))
    try:
        await _until(lambda: watch.resyncs, "a Resync")
        resync = watch.items[0]
        assert isinstance(resync, Resync)
        assert resync.revision >= compacted_at
        expected, at = await store.range("/s/")
        assert at == resync.revision
        assert list(resync.kvs) == expected
        assert {kv.key: kv.value for kv in resync.kvs} == {"/s/0": b"9", "/s/1": b"7", "/s/2": b"8"}

        await store.put("/s/after", b"a")
        await _until(lambda: watch.events, "an event after the Resync")
        assert watch.summary() == [("put", "/s/after", b"a", resync.revision + 1)]
        assert watch.error is None
    finally:
        await watch.stop()


async def test_watch_at_the_compact_revision_still_replays(store: Store) -> None:
    await store.put("/e/a", b"1")
    at = await store.put("/e/a", b"2")
    await store.put("/e/a", b"3")
    await store.compact(at)
    watch = WatchCollector(store.watch("/e/", at))
    try:
        await _until(lambda: len(watch.events) >= 2, "events from the compact revision on")
        assert watch.resyncs == []
        assert [v for _, _, v, _ in watch.summary()] == [b"2", b"3"]
    finally:
        await watch.stop()


async def test_closing_the_store_ends_its_watches(backend: Backend) -> None:
    opened = backend.open()
    await opened.connect()
    watch = WatchCollector(opened.watch("/c/", 1))
    await opened.put("/c/x", b"1")
    await _until(lambda: watch.events, "an event")
    await opened.close()
    await _until(lambda: watch.done, "the watch to end")
    assert watch.error is None
