"""The embedded store commits on the event loop thread when the cross-process writer turn is
free, and through its writer thread when another writer holds it: both paths give the same
results, in the order asked, and one loop iteration's writes go as one group commit."""

from __future__ import annotations

import asyncio
import fcntl
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from esplanade.store.base import CasConflict, Put
from esplanade.store.embedded import _CHECKPOINT, INLINE_CHECKPOINT_EVERY, EmbeddedStore
from tests.conditions import async_wait_until


async def test_writes_go_inline_when_the_turn_is_free_and_through_the_writer_when_it_is_not(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = EmbeddedStore(path)
    await store.connect()
    try:
        before = store.inline_writes
        # one iteration's writes: one group commit, each with its own outcome, in order
        results = await asyncio.gather(
            store.put("/k/a", b"1"),
            store.put("/k/a", b"2"),
            store.put("/k/b", b"x", expect_mod_revision=12345),  # fails alone
            store.put("/k/c", b"3"),
            return_exceptions=True,
        )
        assert store.inline_writes == before + 1
        assert isinstance(results[2], CasConflict)
        assert isinstance(results[0], int) and results[1] == results[0] + 1 and results[3] == results[1] + 1
        kv = await store.get("/k/a")
        assert kv is not None and kv.value == b"2"
        # another writer holds the turn (as a second process would): the writer thread waits for it
        with open(path.with_name(path.name + ".writer"), "ab") as turn:
            fcntl.flock(turn.fileno(), fcntl.LOCK_EX)
            inline = store.inline_writes
            pending = asyncio.ensure_future(store.commit([], [Put("/k/d", b"4"), Put("/k/e", b"5")]))
            await asyncio.sleep(0.05)
            assert not pending.done() and store.inline_writes == inline
            following = asyncio.ensure_future(store.put("/k/d", b"6"))  # queued behind it, not inline
            await asyncio.sleep(0.01)
            assert not following.done()
            fcntl.flock(turn.fileno(), fcntl.LOCK_UN)
            await async_wait_until(lambda: _done(pending, following), what="the queued writes")
        assert store.inline_writes == inline  # they went through the thread, in order
        assert (await pending).succeeded and await following > (await pending).revision
        kv = await store.get("/k/d")
        assert kv is not None and kv.value == b"6"
        await store.put("/k/f", b"7")  # the turn is free again: inline
        assert store.inline_writes == inline + 1
    finally:
        await store.close()


async def _value_after_reopen(path: Path, key: str) -> bytes | None:
    """The value of `key` as a new store on the same database reads it (what survived)."""
    again = EmbeddedStore(path)
    await again.connect()
    try:
        kv = await again.get(key)
        return None if kv is None else kv.value
    finally:
        await again.close()


async def _done(*futures: asyncio.Future[Any]) -> bool:
    return all(f.done() for f in futures)


async def test_a_write_asked_for_just_before_close_is_still_committed(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = EmbeddedStore(path)
    await store.connect()
    write = asyncio.ensure_future(store.put("/k/last", b"1"))
    await asyncio.sleep(0)  # the request is made, its hand-over not yet run
    await store.close()
    assert await write > 0
    assert await _value_after_reopen(path, "/k/last") == b"1"
    with pytest.raises(Exception):  # noqa: B017 - closed: StoreUnavailable
        await store.put("/k/after", b"x")


async def test_the_inline_connection_leaves_wal_checkpoints_to_the_writer_thread(tmp_path: Path) -> None:
    """The loop thread never runs a checkpoint (auto-checkpoint off on its connection); every
    `INLINE_CHECKPOINT_EVERY` inline commits the writer thread checkpoints instead, and the
    data is the same through it and after a reopen."""
    path = tmp_path / "state.db"
    store = EmbeddedStore(path)
    await store.connect()
    try:
        writer = store._writer
        assert writer is not None
        inline, threaded = store.inline_writes, writer.completed
        # until two checkpoints are due: a write that found the writer turn held (a checkpoint
        # running, on a loaded machine) went through the thread and does not count toward them
        writes = 0
        while store.inline_writes - inline < 2 * INLINE_CHECKPOINT_EVERY and writes < 8 * INLINE_CHECKPOINT_EVERY:
            await store.put(f"/k/{writes % 7}", str(writes).encode())
            writes += 1
        # inline unless a checkpoint held the writer turn at that moment (then through the thread)
        assert (store.inline_writes - inline) + (writer.completed - threaded) == writes
        assert store.inline_writes - inline > writes // 2
        assert store._inline_db is not None
        assert store._inline_db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        await async_wait_until(lambda: _at_least(writer.checkpoints, 2), what="two checkpoints on the writer thread")
        kv = await store.get("/k/2")
        assert kv is not None and kv.value == str(max(i for i in range(writes) if i % 7 == 2)).encode()
        # a checkpoint queued behind writes that go through the thread: they still commit, in order
        with open(path.with_name(path.name + ".writer"), "ab") as turn:
            fcntl.flock(turn.fileno(), fcntl.LOCK_EX)
            pending = asyncio.ensure_future(store.put("/k/t", b"1"))
            await asyncio.sleep(0.01)
            writer.requests.put(_CHECKPOINT)
            following = asyncio.ensure_future(store.put("/k/t", b"2"))
            await asyncio.sleep(0.01)
            fcntl.flock(turn.fileno(), fcntl.LOCK_UN)
            await async_wait_until(lambda: _done(pending, following), what="the queued writes")
        assert await following > await pending
        await async_wait_until(lambda: _at_least(writer.checkpoints, 3), what="the queued checkpoint")
        # the checkpoints complete and the WAL restarts from its start: it does not grow with the
        # writes (each commit appends at least 3 frames: a log page, a current page, the meta page)
        writes = 8 * INLINE_CHECKPOINT_EVERY
        for i in range(writes):
            await store.put(f"/k/{i % 7}", bytes(1000))
        page_size = sqlite3.connect(path).execute("PRAGMA page_size").fetchone()[0]
        wal_frames = path.with_name(path.name + "-wal").stat().st_size // (page_size + 24)
        assert 0 < wal_frames < 3 * writes  # the most frames between two restarts, not all of them
    finally:
        await store.close()
    assert await _value_after_reopen(path, "/k/t") == b"2"


async def _at_least(value: int, floor: int) -> bool:
    return value >= floor
