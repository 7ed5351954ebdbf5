"""EmbeddedStore: the store contract on one SQLite file, as k3s's kine is to etcd.

The single-node default. Several processes may share the file (the four services under
`esplanade up`): SQLite serializes their writes, every process watches and sweeps leases.

Tables (schema version 1):

    log      one row per change: revision, seq (order within the revision), key, deleted,
             create_revision, prev_revision (the key's previous live row), version, lease,
             value. Ordered by its AUTOINCREMENT id, which follows (revision, seq).
    current  key -> id of its newest live row in `log`, and its lease: the state.
    lease    id, ttl, deadline (CLOCK_MONOTONIC seconds).
    meta     revision (store-wide, starts at 1 like etcd), compact_revision, schema.

Writes. The writes one loop iteration asks for are applied together in one `BEGIN IMMEDIATE`
transaction (group commit), each request in its own SAVEPOINT so a failed CAS or a bug in one
leaves the others intact; callers hear back only after COMMIT. Each request that changes
something takes the next revision. At the end of the iteration the batch is committed on the
loop thread itself when this process's writer thread has nothing queued or in flight and the
cross-process writer turn (below) is free at once; otherwise it goes to the writer thread as
one list, which takes every list queued at that moment, waits its turn and answers each caller
loop with one callback. The inline commit blocks the loop for the transaction and its fsync
(a fraction of a millisecond here), never for a WAL checkpoint (its connection has
auto-checkpoint off and asks the writer thread for one every `INLINE_CHECKPOINT_EVERY` commits,
which runs it in the writer turn as SQLite would inside a COMMIT);
the thread hop it saves cost more: the writer thread's
wake-up and the GIL handed back and forth for every statement (py-spy: 16 % of the dataplane's
and 6 % of keyexchange's CPU in the IKE setup bench). Requests of one loop keep their order
either way (inline only with nothing queued before them).

Durability. WAL journal with `synchronous=FULL` by default: COMMIT returns after the WAL is
fsynced, so an acknowledged write survives kill -9 *and* power loss. NORMAL would survive
kill -9 but may lose the last commits on power loss, and this store holds things that must
never go back (outbound ESP sequence-number reservations: reuse means nonce reuse under
AES-GCM). Group commit pays for the fsync.

Writers of several processes take turns through an exclusive flock on `<path>.writer` held
around each transaction: the kernel hands the turn over the moment it is released, where
SQLite's busy handler would sleep 1, 2, 5, 10... ms between retries of a locked database.

Reads run on a small reader thread pool (WAL readers never wait for the writer), except the
small ones a watch or the poller makes on every commit (the revision, the new events of a
watch that keeps up, a single key, expired leases): those run on the event loop's own connection, which never waits
(busy timeout 0) and hands a read that finds the database busy to the pool. A thread hop costs
more than such a read (the future, the wake-up, the GIL handed back and forth), and the loop
waits for the answer anyway. Watches
wake at once on this process's writes; other processes' writes ring this one's doorbell
(`doorbell.py`, a Unix datagram socket per open store) with the revision they committed,
and `meta.revision` (one indexed row) is polled every `poll_interval` besides, should a ring
be lost. The writer tells which
keys each of its revisions wrote, so a watch skips the read when every new revision is one
of this process's and none touched its prefix (a service's own bookkeeping writes cost its
watches nothing).

Leases. Deadlines are CLOCK_MONOTONIC seconds, a clock every process on the machine
shares. Every process sweeps expired leases (`lease_sweep_interval`): in one write
transaction per lease, its keys are deleted at a new revision (delete events) and the lease
row goes. etcd gives every lease its full TTL again when it restarts; this store does the
same when it is opened while no process has it open (a lock file tells: each open store
holds a shared flock on `<path>.lock`; whoever gets it exclusively is the first), which also
covers a reboot, when old monotonic deadlines mean nothing.

Compaction deletes the rows that a newer row at or below the compact revision supersedes
(and tombstones below it) and records the compact revision. `auto_compact_retain` keeps the
log from growing forever (kine does the same): when more than twice that many revisions
are uncompacted, the sweeper compacts to `revision - auto_compact_retain`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from esplanade.store.base import (
    Compare,
    Delete,
    KeyValue,
    Lease,
    LeaseNotFound,
    Put,
    Resync,
    Store,
    StoreError,
    StoreUnavailable,
    TxnResult,
    WatchBatch,
    WatchItem,
)
from esplanade.store.doorbell import Doorbell
from esplanade.store.request_rules import encode_key
from esplanade.store.sqlite_log import (
    SCHEMA_SQL,
    SCHEMA_VERSION,
    LeaseGone,
    WriteOp,
    WriteState,
    database_error,
    expired_leases,
    fetch_events,
    get_current,
    op_commit,
    op_compact,
    op_delete,
    op_expire,
    op_grant,
    op_keepalive,
    op_put,
    op_renew_all,
    op_revoke,
    prefix_clause,
    read_revision,
    read_revisions,
    snapshot,
)

T = TypeVar("T")
log = logging.getLogger(__name__)

_GROUP_COMMIT_MAX = 256
# The inline connection never checkpoints the WAL itself (`wal_autocheckpoint = 0`): after this
# many of its commits it asks the writer thread for a PASSIVE checkpoint instead (SQLite's own
# auto-checkpoint is every 1000 pages; an IKE setup's commits write about ten each).
INLINE_CHECKPOINT_EVERY = 96


class _CheckpointRequest:
    """Queued to the writer thread: checkpoint the WAL (it holds no write, orders nothing)."""


_CHECKPOINT = _CheckpointRequest()
_WATCH_REVISIONS_PER_FETCH = 1000
_OWN_REVISIONS_KEPT = 4096  # keys of this process's latest revisions, for watches to skip reads
_OWN_SKIP_MAX = 256  # a watch further behind than this reads, whoever wrote
_SMALL_FETCH_REVISIONS = 64  # a watch fetch of at most this many revisions runs on the loop
_BUSY_CODES = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}) | {
    getattr(sqlite3, name) for name in ("SQLITE_BUSY_RECOVERY", "SQLITE_BUSY_SNAPSHOT") if hasattr(sqlite3, name)
}


@dataclass(slots=True)
class _WriteRequest:
    apply: WriteOp
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


Reply = tuple[asyncio.Future[Any], Any, BaseException | None]
Outcome = tuple["_WriteRequest", Any, BaseException | None]
Committed = tuple[int, int, list[tuple[int, bytes]]]  # start, revision, (revision, key) written


def _deliver(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _deliver_all(
    replies: list[Reply], after: Callable[[int, int, list[tuple[int, bytes]]], None] | None, committed: Committed | None
) -> None:
    """On the caller's loop: a whole group commit's outcomes in one callback, then (the store's
    loop) what the commit wrote."""
    for future, result, error in replies:
        _deliver(future, result, error)
    if after is not None and committed is not None:
        after(*committed)


def _connect(path: Path, busy_timeout: float, synchronous: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute(f"PRAGMA synchronous = {synchronous}")
    db.execute("PRAGMA foreign_keys = OFF")
    return db


def _apply_batch(
    db: sqlite3.Connection, path: Path, batch: list[_WriteRequest], *, busy_gives_up: bool = False
) -> tuple[list[Outcome], Committed | None] | None:
    """One group commit of `batch` on `db`: each request in a savepoint (a failed condition
    fails only its own request), one COMMIT. Returns the outcomes and what was written;
    None if `busy_gives_up` and another connection holds the write lock (nothing happened)."""
    try:
        db.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if busy_gives_up and exc.sqlite_errorcode in _BUSY_CODES:
            return None
        return [(request, None, database_error(path, exc)) for request in batch], None
    except sqlite3.Error as exc:
        return [(request, None, database_error(path, exc)) for request in batch], None
    outcomes: list[Outcome] = []
    try:
        start = db.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0]
        state = WriteState(revision=start)
        now = time.monotonic()
        for request in batch:
            before, written = state.revision, len(state.written)
            db.execute("SAVEPOINT op")
            try:
                result = request.apply(db, state, now)
            except sqlite3.Error:
                raise
            except Exception as exc:  # a failed condition, or a bug: only this request fails
                db.execute("ROLLBACK TO op")
                db.execute("RELEASE op")
                state.revision = before
                del state.written[written:]
                outcomes.append((request, None, exc))
                continue
            db.execute("RELEASE op")
            outcomes.append((request, result, None))
        if state.revision != start:
            db.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (state.revision,))
        db.execute("COMMIT")
    except sqlite3.Error as exc:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        return [(request, None, database_error(path, exc)) for request in batch], None
    return outcomes, ((start, state.revision, state.written) if state.revision != start else None)


class _Writer(threading.Thread):
    """The process's one writer: group commit of queued write requests.

    The hand-over is batched both ways: the store's loop queues the requests of one loop
    iteration as one list (one wake-up of this thread), and the outcomes of a group commit go
    back to each caller loop in one `call_soon_threadsafe` together with the commit's own
    notice (`on_committed`, on the home loop), instead of one wake-up per request."""

    def __init__(
        self,
        path: Path,
        busy_timeout: float,
        synchronous: str,
        home: asyncio.AbstractEventLoop,
        on_committed: Callable[[int, int, list[tuple[int, bytes]]], None],
        ring: Callable[[int], None],
    ) -> None:
        super().__init__(name=f"esplanade-store-writer:{path.name}", daemon=True)
        self.path = path
        self.requests: queue.SimpleQueue[list[_WriteRequest] | _CheckpointRequest | None] = queue.SimpleQueue()
        self.submitted = 0  # request lists queued (the home loop counts)
        self.completed = 0  # request lists committed or failed (this thread counts)
        self.checkpoints = 0  # WAL checkpoints run for the inline connection (this thread counts)
        self._busy_timeout = busy_timeout
        self._synchronous = synchronous
        self._home = home
        self._on_committed = on_committed  # runs on the home loop
        self._ring = ring  # runs here, after the commit: other processes' stores
        self._db: sqlite3.Connection | None = None
        self._turn: IO[bytes] | None = None  # flock: one writer at a time across processes
        self.ready = threading.Event()
        self.open_error: BaseException | None = None

    def run(self) -> None:
        try:
            self._db = _connect(self.path, self._busy_timeout, self._synchronous)
        except sqlite3.Error as exc:
            self.open_error = database_error(self.path, exc)
            self.ready.set()
            return
        try:
            self._turn = open(self.path.with_name(self.path.name + ".writer"), "ab")  # noqa: SIM115 - held while open
        except OSError:
            self._turn = None  # SQLite's own locking still serializes; only the hand-over is slower
        self.ready.set()
        try:
            stop = False
            while not stop:
                first = self.requests.get()
                if first is None:
                    break
                if isinstance(first, _CheckpointRequest):
                    self._checkpoint()
                    continue
                batch = list(first)
                taken = 1
                checkpoint = False
                while len(batch) < _GROUP_COMMIT_MAX:
                    try:
                        item = self.requests.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stop = True
                        break
                    if isinstance(item, _CheckpointRequest):
                        checkpoint = True
                        continue
                    batch += item
                    taken += 1
                self._run(batch)
                self.completed += taken
                if checkpoint:
                    self._checkpoint()
        finally:
            self._db.close()
            if self._turn is not None:
                self._turn.close()
            # Anything queued after the stop marker fails instead of hanging its caller.
            while True:
                try:
                    item = self.requests.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, list):
                    self._fail(item, StoreUnavailable("the embedded store was closed"))

    def _checkpoint(self) -> None:
        """A PASSIVE checkpoint of what the inline connection wrote, off the event loop, inside
        the writer turn as SQLite's auto-checkpoint runs inside the COMMIT that triggers it: no
        commit adds frames meanwhile, so it can finish and the next writer restarts the WAL
        from its start (a checkpoint racing commits never catches up, and the WAL would grow
        without end). The loop does not wait for it: an inline commit finds the turn taken and
        goes through this thread, after it."""
        assert self._db is not None
        turn = self._turn
        try:
            if turn is not None:
                fcntl.flock(turn.fileno(), fcntl.LOCK_EX)
        except OSError:
            turn = None
        try:
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            log.warning("embedded store %s: WAL checkpoint failed: %s", self.path, exc)
            return
        finally:
            if turn is not None:
                fcntl.flock(turn.fileno(), fcntl.LOCK_UN)
        self.checkpoints += 1

    @property
    def idle(self) -> bool:
        """Nothing queued or in flight: a write on another connection cannot overtake one."""
        return self.submitted == self.completed

    def _fail(self, batch: list[_WriteRequest], error: BaseException) -> None:
        self._reply([(request, None, error) for request in batch], None)

    def _reply(self, outcomes: list[Outcome], committed: Committed | None) -> None:
        """One callback per caller loop with all its outcomes (and, on the home loop, the
        commit's notice after them)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[Reply]] = {}
        for request, result, error in outcomes:
            by_loop.setdefault(request.loop, []).append((request.future, result, error))
        if committed is not None:
            by_loop.setdefault(self._home, [])
        for loop, replies in by_loop.items():
            after = self._on_committed if loop is self._home else None
            with contextlib.suppress(RuntimeError):  # the caller's loop is gone
                loop.call_soon_threadsafe(_deliver_all, replies, after, committed)

    def _run(self, batch: list[_WriteRequest]) -> None:
        turn = self._turn
        if turn is None:
            self._transaction(batch)
            return
        try:
            fcntl.flock(turn.fileno(), fcntl.LOCK_EX)
        except OSError:
            self._transaction(batch)
            return
        try:
            self._transaction(batch)
        finally:
            fcntl.flock(turn.fileno(), fcntl.LOCK_UN)

    def _transaction(self, batch: list[_WriteRequest]) -> None:
        assert self._db is not None
        applied = _apply_batch(self._db, self.path, batch)
        assert applied is not None
        outcomes, committed = applied
        if committed is not None:
            self._ring(committed[1])
        self._reply(outcomes, committed)


class EmbeddedStore(Store):
    backend_name = "embedded"

    def __init__(
        self,
        path: str | Path,
        *,
        poll_interval: float = 0.025,
        lease_sweep_interval: float = 0.1,
        synchronous: str = "FULL",
        busy_timeout: float = 30.0,
        auto_compact_retain: int = 10_000,
        reader_threads: int = 2,
    ) -> None:
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"synchronous must be FULL, NORMAL or EXTRA, not {synchronous!r}")
        if poll_interval <= 0 or lease_sweep_interval <= 0:
            raise ValueError("poll and sweep intervals must be positive")
        self.path = Path(path)
        self.poll_interval = poll_interval
        self.lease_sweep_interval = lease_sweep_interval
        self.auto_compact_retain = auto_compact_retain
        self._synchronous = synchronous.upper()
        self._busy_timeout = busy_timeout
        self._reader_threads = reader_threads
        self._writer: _Writer | None = None
        self._pending: list[_WriteRequest] = []  # this loop iteration's writes, not handed over yet
        self._inline_db: sqlite3.Connection | None = None  # group commits on the loop thread
        self._inline_turn: IO[bytes] | None = None  # its own handle on the writer turn lock
        self.inline_writes = 0  # group commits done on the loop thread
        self._inline_since_checkpoint = 0  # of them, since the last checkpoint request
        self._readers: ThreadPoolExecutor | None = None
        self._reader_local = threading.local()
        self._reader_dbs: list[sqlite3.Connection] = []
        self._reader_lock = threading.Lock()
        self._loop_db: sqlite3.Connection | None = None  # small reads on the event loop thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock_file: IO[bytes] | None = None
        self._poller: asyncio.Task[None] | None = None
        self._doorbell: Doorbell | None = None
        self._wake = asyncio.Event()  # a ring from another process, or close
        self._closed = asyncio.Event()
        self._known_revision = 0
        self._revision_changed = asyncio.Event()
        self._watchers = 0
        self._own: dict[int, tuple[bytes, ...]] = {}  # revision this process wrote -> its keys
        self.watch_reads = 0  # event reads the watches made (the skipped ones are not)

    def __repr__(self) -> str:
        return f"EmbeddedStore({str(self.path)!r})"

    # -- life cycle ---------------------------------------------------------------------
    async def connect(self) -> None:
        if self._writer is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._closed = asyncio.Event()
        self._wake = asyncio.Event()
        self._revision_changed = asyncio.Event()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            first_opener = await asyncio.to_thread(self._take_open_lock)
        except OSError as exc:
            raise StoreUnavailable(f"embedded store {self.path}: {exc.strerror or exc}") from None
        self._readers = ThreadPoolExecutor(self._reader_threads, thread_name_prefix="esplanade-store-reader")
        writer = _Writer(
            self.path, self._busy_timeout, self._synchronous, self._loop, self._committed, self._ring_others
        )
        writer.start()
        await asyncio.to_thread(writer.ready.wait)
        if writer.open_error is not None:
            await self._teardown()
            raise writer.open_error
        self._writer = writer
        try:
            self._inline_turn = await asyncio.to_thread(open, self.path.with_name(self.path.name + ".writer"), "ab")
        except OSError:
            self._inline_turn = None  # every write goes through the writer thread
        doorbell = Doorbell(self.path.with_name(self.path.name + ".bell"))
        if await asyncio.to_thread(doorbell.open):
            self._doorbell = doorbell
            self._loop.add_reader(doorbell.fileno(), self._rung)
        try:
            await self._read(self._create_schema)
            if first_opener:
                await self._write(op_renew_all())
            self._known_revision = await self._read(read_revision)
        except BaseException:
            await self.close()
            raise
        self._poller = asyncio.create_task(self._poll(), name=f"esplanade-store-poll:{self.path.name}")

    def _take_open_lock(self) -> bool:
        """Hold a shared flock while open; return True if no other store had the file open."""
        lock_file = open(self.path.with_name(self.path.name + ".lock"), "ab")  # noqa: SIM115 - held while open
        try:
            try:
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                first = True
            except BlockingIOError:
                first = False
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_SH)
        except OSError:
            lock_file.close()
            raise
        self._lock_file = lock_file
        return first

    def _create_schema(self, db: sqlite3.Connection) -> None:
        try:
            # executescript commits any open transaction first, so the script holds its own.
            db.executescript("BEGIN IMMEDIATE;" + SCHEMA_SQL + "COMMIT;")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        schema = db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()[0]
        if schema != SCHEMA_VERSION:
            raise StoreError(f"embedded store {self.path} has schema {schema}, this version reads {SCHEMA_VERSION}")

    def _rung(self) -> None:
        revision = self._doorbell.drain() if self._doorbell is not None else 0
        if revision:
            self._revision_seen(revision)  # committed: the watches read up to it at once
        else:
            self._wake.set()  # a ring without a revision: the poller reads it

    async def close(self) -> None:
        self._closed.set()
        self._wake.set()
        self._revision_changed.set()
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._poller
            self._poller = None
        await self._teardown()

    async def _teardown(self) -> None:
        doorbell, self._doorbell = self._doorbell, None
        if doorbell is not None:
            if self._loop is not None:
                with contextlib.suppress(RuntimeError, ValueError):
                    self._loop.remove_reader(doorbell.fileno())
            doorbell.close()
        writer, self._writer = self._writer, None
        if writer is not None:
            pending, self._pending = self._pending, []
            if pending:  # asked for before the close: the writer does them before it stops
                writer.submitted += 1
                writer.requests.put(pending)
            writer.requests.put(None)
            await asyncio.to_thread(writer.join)
        readers, self._readers = self._readers, None
        if readers is not None:
            await asyncio.to_thread(readers.shutdown, True)
        with self._reader_lock:
            dbs, self._reader_dbs = self._reader_dbs, []
        for db in dbs:
            with contextlib.suppress(sqlite3.Error):
                db.close()
        self._reader_local = threading.local()
        inline_db, self._inline_db = self._inline_db, None
        if inline_db is not None:
            with contextlib.suppress(sqlite3.Error):
                inline_db.close()
        inline_turn, self._inline_turn = self._inline_turn, None
        if inline_turn is not None:
            inline_turn.close()
        loop_db, self._loop_db = self._loop_db, None
        if loop_db is not None:
            with contextlib.suppress(sqlite3.Error):
                loop_db.close()
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None

    # -- plumbing -----------------------------------------------------------------------
    def _reader_db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._reader_local, "db", None)
        if db is None:
            db = _connect(self.path, self._busy_timeout, self._synchronous)
            self._reader_local.db = db
            with self._reader_lock:
                self._reader_dbs.append(db)
        return db

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        readers = self._readers
        if readers is None or self._closed.is_set():
            raise StoreUnavailable("the embedded store is not open")

        def run() -> T:
            try:
                return fn(self._reader_db())
            except sqlite3.Error as exc:
                raise database_error(self.path, exc) from None

        try:
            return await asyncio.get_running_loop().run_in_executor(readers, run)
        except RuntimeError as exc:  # executor shut down under us
            raise StoreUnavailable("the embedded store is closed") from exc

    async def _read_small(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A read that takes microseconds: on the event loop thread, or, should the database
        be busy (a WAL recovery by another process, rare), on the reader pool."""
        if self._readers is None or self._closed.is_set():
            raise StoreUnavailable("the embedded store is not open")
        try:
            db = self._loop_db
            if db is None:
                db = self._loop_db = _connect(self.path, 0.0, self._synchronous)
            return fn(db)
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode not in _BUSY_CODES:
                raise database_error(self.path, exc) from None
        except sqlite3.Error as exc:
            raise database_error(self.path, exc) from None
        return await self._read(fn)

    async def _write(self, apply: WriteOp) -> Any:
        writer = self._writer
        if writer is None or self._closed.is_set():
            raise StoreUnavailable("the embedded store is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        request = _WriteRequest(apply, future, loop)
        if loop is not self._loop:
            writer.requests.put([request])
        else:  # the writes of this loop iteration go to the writer together, at its end
            self._pending.append(request)
            if len(self._pending) == 1:
                loop.call_soon(self._hand_over, writer)
        return await future

    def _hand_over(self, writer: _Writer) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        if self._writer is writer:
            if writer.idle and self._write_inline(pending):
                return
            writer.submitted += 1
            writer.requests.put(pending)
        else:  # closed between the request and the end of the iteration
            for request in pending:
                _deliver(request.future, None, StoreUnavailable("the embedded store was closed"))

    def _write_inline(self, batch: list[_WriteRequest]) -> bool:
        """The group commit on the loop thread, when the cross-process writer turn is free at
        once: no wake-up of the writer thread and no GIL ping-pong between the two threads for
        every statement (which cost more than the transaction itself). False (nothing done):
        the writer thread does it."""
        turn = self._inline_turn
        if turn is None:
            return False
        db = self._inline_db
        if db is None:
            try:
                db = _connect(self.path, 0.0, self._synchronous)
                db.execute("PRAGMA wal_autocheckpoint = 0")  # the writer thread checkpoints
            except sqlite3.Error:
                return False
            self._inline_db = db
        try:
            fcntl.flock(turn.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # another process is writing: the writer thread waits its turn
        try:
            applied = _apply_batch(db, self.path, batch, busy_gives_up=True)
        finally:
            fcntl.flock(turn.fileno(), fcntl.LOCK_UN)
        if applied is None:
            return False
        outcomes, committed = applied
        self.inline_writes += 1
        if committed is not None:
            self._ring_others(committed[1])
            self._inline_since_checkpoint += 1
            writer = self._writer
            if self._inline_since_checkpoint >= INLINE_CHECKPOINT_EVERY and writer is not None:
                self._inline_since_checkpoint = 0
                writer.requests.put(_CHECKPOINT)
        replies = [(request.future, result, error) for request, result, error in outcomes]
        _deliver_all(replies, self._committed, committed)  # as the writer thread's callback does
        return True

    def _ring_others(self, revision: int) -> None:
        doorbell = self._doorbell
        if doorbell is not None:
            doorbell.ring_others(revision)

    def _committed(self, start: int, revision: int, written: list[tuple[int, bytes]]) -> None:
        """This process's writer committed revisions start+1..revision, writing `written`."""
        keys: dict[int, list[bytes]] = {r: [] for r in range(start + 1, revision + 1)}
        for at, key in written:
            keys[at].append(key)
        own = self._own
        for at, touched in keys.items():
            own[at] = tuple(touched)
        while len(own) > _OWN_REVISIONS_KEPT:
            del own[next(iter(own))]
        self._revision_seen(revision)

    def _nothing_for(self, start: bytes, after: int, upto: int) -> bool:
        """Were after+1..upto all written by this process, none under the prefix `start`?"""
        if not start or upto - after > _OWN_SKIP_MAX:
            return False
        own = self._own
        for revision in range(after + 1, upto + 1):
            keys = own.get(revision)
            if keys is None or any(key.startswith(start) for key in keys):
                return False
        return True

    def _revision_seen(self, revision: int) -> None:
        if revision > self._known_revision:
            self._known_revision = revision
            changed, self._revision_changed = self._revision_changed, asyncio.Event()
            changed.set()

    async def _poll(self) -> None:
        """Notice other processes' writes; sweep expired leases; compact automatically."""
        next_sweep = 0.0
        while not self._closed.is_set():
            try:
                if self._watchers:
                    self._revision_seen(await self._read_small(read_revision))
                now = time.monotonic()
                if now >= next_sweep:
                    next_sweep = now + self.lease_sweep_interval
                    expired = await self._read_small(lambda db: expired_leases(db, time.monotonic()))
                    if expired:
                        await self._write(op_expire(expired))
                    await self._auto_compact()
            except (StoreError, ValueError):
                pass  # the file may be briefly locked or gone; the next round retries
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)
            self._wake.clear()

    async def _auto_compact(self) -> None:
        if self.auto_compact_retain <= 0:
            return
        revision, compacted = await self._read_small(read_revisions)
        if revision - compacted > 2 * self.auto_compact_retain:
            await self._write(op_compact(revision - self.auto_compact_retain))

    # -- reads --------------------------------------------------------------------------
    async def ping(self) -> int:
        return await self._read_small(read_revision)

    async def get(self, key: str) -> KeyValue | None:
        raw = encode_key(key)
        return await self._read_small(lambda db: get_current(db, raw))

    async def range(self, prefix: str, *, limit: int = 0) -> tuple[list[KeyValue], int]:
        if limit < 0:
            raise ValueError("limit must be >= 0")
        return await self._read(lambda db: snapshot(db, prefix, limit))

    # -- writes -------------------------------------------------------------------------
    async def put(self, key: str, value: bytes, *, lease: int = 0, expect_mod_revision: int | None = None) -> int:
        result: int = await self._write(op_put(key, value, lease, expect_mod_revision))
        return result

    async def delete(self, key: str, *, expect_mod_revision: int | None = None) -> bool:
        result: bool = await self._write(op_delete(key, expect_mod_revision))
        return result

    async def commit(self, conditions: Sequence[Compare], ops: Sequence[Put | Delete]) -> TxnResult:
        result: TxnResult = await self._write(op_commit(conditions, ops))
        return result

    async def compact(self, revision: int) -> None:
        await self._write(op_compact(revision))

    # -- leases -------------------------------------------------------------------------
    async def grant_lease(self, ttl: int) -> Lease:
        lease: Lease = await self._write(op_grant(ttl))
        return lease

    async def keepalive(self, lease_id: int) -> int:
        result = await self._write(op_keepalive(lease_id))
        if isinstance(result, LeaseGone):
            raise LeaseNotFound(f"lease {lease_id:x} expired")
        return int(result)

    async def revoke_lease(self, lease_id: int) -> None:
        await self._write(op_revoke(lease_id))

    # -- watch --------------------------------------------------------------------------
    def watch(self, prefix: str, start_revision: int = 0) -> AsyncIterator[WatchItem]:
        if start_revision < 0:
            raise ValueError("start_revision must be >= 0")
        clause, params = prefix_clause(prefix)  # validates the prefix now, not at first next()
        return self._watch(prefix, clause, params, start_revision)

    async def _watch(
        self, prefix: str, clause: str, params: tuple[bytes, ...], start_revision: int
    ) -> AsyncIterator[WatchItem]:
        self._watchers += 1
        raw_prefix = encode_key(prefix) if prefix else b""
        try:
            last = start_revision - 1 if start_revision else await self._read_small(read_revision)
            while not self._closed.is_set():
                target = self._known_revision
                if target <= last:
                    changed = self._revision_changed
                    await changed.wait()
                    continue
                if self._nothing_for(raw_prefix, last, target):
                    last = target
                    continue
                upto = min(target, last + _WATCH_REVISIONS_PER_FETCH)
                self.watch_reads += 1
                try:
                    # a watch that keeps up reads a few revisions (on the loop); one catching up
                    # reads up to a thousand, which must not stall the loop (the pool)
                    read = self._read_small if upto - last <= _SMALL_FETCH_REVISIONS else self._read
                    fetched = await read(
                        functools.partial(fetch_events, clause=clause, params=params, after=last, upto=upto)
                    )
                except StoreUnavailable:
                    if self._closed.is_set():
                        return
                    await self._sleep(self.poll_interval)
                    continue
                if fetched is None:  # compacted past `last`: hand over the whole prefix
                    kvs, revision = await self._read(lambda db: snapshot(db, prefix, 0))
                    last = revision
                    yield Resync(revision=revision, kvs=tuple(kvs))
                    continue
                last = upto
                if fetched:
                    yield WatchBatch(revision=fetched[-1].kv.mod_revision, events=tuple(fetched))
        except StoreUnavailable:
            if not self._closed.is_set():
                raise
        finally:
            self._watchers -= 1

    async def _sleep(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closed.wait(), delay)


__all__ = ["EmbeddedStore"]
