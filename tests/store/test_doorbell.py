"""The embedded store's doorbell: rings reach the other open stores, dead ones are cleared."""

from __future__ import annotations

import socket
from pathlib import Path

from esplanade.store.doorbell import MAX_SOCKET_PATH, Doorbell
from esplanade.store.embedded import EmbeddedStore
from tests.conditions import async_wait_until
from tests.store.watch_collector import WatchCollector


def test_a_ring_reaches_the_others_and_not_the_ringer_with_the_revision(tmp_path: Path) -> None:
    a, b = Doorbell(tmp_path / "bell"), Doorbell(tmp_path / "bell")
    assert a.open() and b.open()
    try:
        a.ring_others(41)
        a.ring_others(42)
        assert a.rings_sent == 2
        assert b.drain() == 42  # the highest revision named
        assert b.drain() == 0  # nothing left: returns at once
        assert a.drain() == 0  # the ringer does not ring itself
        garbage = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            garbage.sendto(b"!", str(b.path))  # not a revision: a plain wake-up
        finally:
            garbage.close()
        assert b.drain() == 0
    finally:
        a.close()
        b.close()
    assert list((tmp_path / "bell").iterdir()) == []


def test_a_socket_nobody_is_bound_to_is_removed(tmp_path: Path) -> None:
    bell = tmp_path / "bell"
    dead = Doorbell(bell)
    assert dead.open()
    dead._receiver.close()  # type: ignore[union-attr]  # a process that died: the file stays
    assert dead.path.exists()
    live = Doorbell(bell)
    assert live.open()
    try:
        live.ring_others(1)
        assert not dead.path.exists()
    finally:
        live.close()


def test_a_path_too_long_for_a_socket_means_polling_only(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * (MAX_SOCKET_PATH - len(str(tmp_path))))
    bell = Doorbell(deep)
    assert not bell.open()
    bell.ring_others(1)  # harmless
    bell.close()


async def test_a_store_whose_doorbell_cannot_open_still_watches(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * (MAX_SOCKET_PATH - len(str(tmp_path))))
    deep.mkdir()
    async with EmbeddedStore(deep / "s.db", poll_interval=0.01) as store:
        watch = WatchCollector(store.watch("/x/", 1))
        try:
            await store.put("/x/a", b"1")

            async def seen() -> bool:
                return len(watch.events) == 1

            await async_wait_until(seen, what="the put")
        finally:
            await watch.stop()
