"""The embedded store shared by several OS processes: CAS, watch, kill -9, lease sweeping."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from esplanade.store.base import EventType, LeaseNotFound
from esplanade.store.embedded import EmbeddedStore
from tests.conditions import async_wait_until, wait_until
from tests.store.watch_collector import WatchCollector

REPO = Path(__file__).resolve().parents[2]


class Worker:
    """A worker process whose stdout lines are collected by a thread."""

    def __init__(self, *args: str) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.store.embedded_worker", *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.strip())

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self._reader.join(timeout=10)

    def wait(self, timeout: float = 60) -> None:
        self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        stderr = self.process.stderr.read() if self.process.stderr else ""
        assert self.process.returncode == 0, stderr


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        if worker.process.poll() is None:
            worker.kill()


async def test_cas_increments_from_several_processes(tmp_path: Path, workers: list[Worker]) -> None:
    db = tmp_path / "shared.db"
    async with EmbeddedStore(db) as store:
        watch = WatchCollector(store.watch("/mp/", 1))
        try:
            for _ in range(4):
                workers.append(Worker("increment", str(db), "/mp/counter", "250", "25"))
            for worker in workers:
                worker.wait()
            kv = await store.get("/mp/counter")
            assert kv is not None and int(kv.value) == 1000 and kv.version == 1000
            attempts = sum(int(w.lines[-1].split()[1]) for w in workers)
            assert attempts > 1000, "the processes did contend"

            async def all_seen() -> bool:
                return len(watch.events) >= 1000

            # Writes of other processes reach this process's watch, in order, none missing.
            await async_wait_until(all_seen, what="1000 events from the other processes")
            assert [int(e.kv.value) for e in watch.events] == list(range(1, 1001))
        finally:
            await watch.stop()


async def test_kill_9_of_a_writer_loses_nothing_acknowledged(tmp_path: Path, workers: list[Worker]) -> None:
    db = tmp_path / "crash.db"
    writer = Worker("write", str(db), "/crash/", "8")
    workers.append(writer)
    wait_until(lambda: len(writer.lines) >= 300, timeout=30, what="300 acknowledged writes")
    writer.kill()
    acknowledged = [int(line.split()[1]) for line in writer.lines if line.startswith("committed")]
    assert len(acknowledged) >= 300

    with sqlite3.connect(db) as check:
        assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    async with EmbeddedStore(db) as store:
        kvs, revision = await store.range("/crash/")
        stored = {kv.key: kv.value for kv in kvs}
        for n in acknowledged:
            assert stored.get(f"/crash/{n:08d}") == str(n).encode()
        assert revision == 1 + len(stored), "one revision per stored write, no gap or duplicate"
        assert await store.put("/crash/after", b"ok") == revision + 1


async def test_any_process_sweeps_expired_leases(tmp_path: Path, workers: list[Worker]) -> None:
    db = tmp_path / "sweep.db"
    async with EmbeddedStore(db) as store:
        holder = Worker("lease", str(db), "/sweep/key", "1")
        workers.append(holder)
        wait_until(lambda: holder.lines, timeout=30, what="the lease holder to start")
        lease_id = int(holder.lines[0].split()[1])
        start = await store.ping()
        watch = WatchCollector(store.watch("/sweep/", start))
        try:
            holder.kill()  # it will never sweep or keep alive again

            async def gone() -> bool:
                return await store.get("/sweep/key") is None

            await async_wait_until(gone, timeout=10, what="this process to expire the dead holder's lease")
            await async_wait_until(
                lambda: _true(any(e.type == EventType.DELETE for e in watch.events)), what="the delete event"
            )
            with pytest.raises(LeaseNotFound):
                await store.keepalive(lease_id)
        finally:
            await watch.stop()


async def _true(value: bool) -> bool:
    return value


async def test_leases_get_their_full_ttl_again_when_the_store_restarts(tmp_path: Path) -> None:
    """Like etcd: nobody can keep a lease alive while the store is down, so it is re-granted."""
    db = tmp_path / "restart.db"
    async with EmbeddedStore(db) as store:
        lease = await store.grant_lease(1)
        await store.put("/restart/key", b"v", lease=lease.id)
        closed_at = time.monotonic()
    wait_until(lambda: time.monotonic() > closed_at + 1.5, what="the TTL to pass while the store is closed")
    async with EmbeddedStore(db) as store:
        assert await store.get("/restart/key") is not None, "the lease got a fresh TTL on restart"
        assert await store.keepalive(lease.id) == 1

        async def expired() -> bool:
            return await store.get("/restart/key") is None

        await async_wait_until(expired, timeout=5, what="the lease to expire without keepalives")


async def test_another_processs_write_rings_the_watch_without_waiting_for_a_poll(
    tmp_path: Path, workers: list[Worker]
) -> None:
    db = tmp_path / "bell.db"
    async with EmbeddedStore(db, poll_interval=3600) as store:  # a poll would come far too late
        watch = WatchCollector(store.watch("/bell/", 1))
        try:
            writer = Worker("write", str(db), "/bell/", "1")
            workers.append(writer)

            async def seen() -> bool:
                return len(watch.events) >= 5

            await async_wait_until(seen, timeout=30, what="the other process's writes, through the doorbell")
            assert all(e.kv.key.startswith("/bell/") for e in watch.events)
        finally:
            await watch.stop()
