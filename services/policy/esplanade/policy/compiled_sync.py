"""Keep a `PolicyCompiler` in step with the store and write the compiled documents it changes.

One watch on ``policy/`` (from the revision of a full read) feeds object puts and deletes to
the compiler and writes ``policy/compiled/<identity>`` for exactly the identities whose
document changed. While a chunked apply holds the lock (`apply.py`) changes are held back
and compiled together when it is released; a full read that finds the lock held (a start, a
reload after a store error, a `Resync`) is not compiled either: its objects are half of the
plan, so they are kept, followed by the watch, and compiled once the lock is released. A
`Resync` (the watch fell behind a compaction) reloads the whole model. At start, compiled
documents in the store that differ from the compiler's (stale, or of identities that no
longer exist) are rewritten or deleted.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from esplanade.policy.compiler import Change, PolicyCompiler, Removal
from esplanade.policy.decode import encode_document
from esplanade.policy.store_state import POLICY_PREFIX, Generation, decode_kv, model_from_kvs, object_key_parts
from esplanade.store import schema
from esplanade.store.base import MAX_TXN_OPS, Delete, KeyValue, Put, Resync, Store, StoreError, WatchBatch

log = logging.getLogger(__name__)

COMPILED_PREFIX = schema.prefix("policy", "compiled")
DNS_REFRESH_SECONDS = 60.0
FIRST_RETRY_SECONDS = 0.1
LONGEST_RETRY_SECONDS = 2.0


class DnsCache:
    """The compiler's resolver: answers from a cache and resolves unknown names in the background."""

    def __init__(self) -> None:
        self.addresses: dict[str, list[str]] = {}
        self.pending: asyncio.Queue[str] = asyncio.Queue()

    def __call__(self, name: str) -> Sequence[str]:
        if name not in self.addresses:
            self.addresses[name] = []
            self.pending.put_nowait(name)
        return self.addresses[name]

    @staticmethod
    async def resolve(name: str) -> list[str]:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            return []
        return sorted({str(info[4][0]) for info in infos})


class CompiledSync:
    def __init__(
        self,
        store: Store,
        compiler: PolicyCompiler | None = None,
        dns: DnsCache | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.store = store
        self._sleep = sleep
        self.dns = dns or DnsCache()
        self.compiler = compiler or PolicyCompiler(self.dns)
        self.ready = asyncio.Event()
        self.revision = 0  # newest store revision the compiler reflects
        self._held: list[Change] = []
        self._applying = False
        # A full read taken while a chunked apply held the lock (key -> key-value), kept up to
        # date by the watch until the lock is released; None when the compiler is current.
        self._deferred_load: dict[str, KeyValue] | None = None
        self._lock = asyncio.Lock()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._follow_for_good())
            tasks.create_task(self._resolve_names())

    async def _follow_for_good(self) -> None:
        """A store error (connection lost, a write refused) reloads everything: the compiled
        documents are rewritten from the whole model, so no change made meanwhile is lost
        (a revocation above all). Not ready while the store is unreachable. Retries back off
        while the store stays away; an attempt that stayed up longer than the longest delay
        ends a new outage, which starts over at the first delay (else one long outage would
        slow every later recovery for good)."""
        loop = asyncio.get_running_loop()
        delay = FIRST_RETRY_SECONDS
        while True:
            started = loop.time()
            try:
                await self._follow()
            except StoreError as exc:
                if loop.time() - started >= LONGEST_RETRY_SECONDS:
                    delay = FIRST_RETRY_SECONDS
                self.ready.clear()
                log.warning("compiled policy sync interrupted (%s); reloading in %.1f s", exc, delay)
                await self._sleep(delay)
                delay = min(delay * 2, LONGEST_RETRY_SECONDS)

    async def _load(self, kvs: Sequence[KeyValue], revision: int) -> None:
        generation = next((Generation.from_kv(kv) for kv in kvs if kv.key == schema.POLICY_GENERATION), Generation())
        self._applying = bool(generation.applying)
        self._held.clear()
        if self._applying:
            # Half-applied: compiling it could grant what neither the old nor the new policy
            # grants (an identity already in its new group, the group's rule not yet narrowed).
            self._deferred_load = {kv.key: kv for kv in kvs}
            self.revision = revision
            return
        self._deferred_load = None
        async with self._lock:
            self.compiler.load(model_from_kvs(kvs))
            documents = self.compiler.documents()
            stored = {kv.key: kv.value for kv in kvs if kv.key.startswith(COMPILED_PREFIX)}
            writes: list[tuple[str, dict[str, Any] | None]] = []
            for identity, doc in documents.items():
                key = schema.compiled_policy(identity)
                if stored.pop(key, None) != encode_document(doc):
                    writes.append((key, doc))
            writes += [(key, None) for key in stored]
            await self._write(writes)
        self.revision = revision

    async def _follow(self) -> None:
        kvs, revision = await self.store.range(POLICY_PREFIX)
        await self._load(kvs, revision)
        self.ready.set()
        async for item in self.store.watch(POLICY_PREFIX, revision + 1):
            if isinstance(item, Resync):
                await self._load(item.kvs, item.revision)
                continue
            await self._batch(item)

    async def _batch(self, batch: WatchBatch) -> None:
        deferred = self._deferred_load
        for event in batch.events:
            key = event.kv.key
            if deferred is not None:
                if event.type.value == "put":
                    deferred[key] = event.kv
                else:
                    deferred.pop(key, None)
            if key == schema.POLICY_GENERATION:
                applying = event.type.value == "put" and bool(Generation.from_kv(event.kv).applying)
                if self._applying and not applying:
                    self._applying = False
                elif applying:
                    self._applying = True
                continue
            parts = object_key_parts(key)
            if parts is None:
                continue
            if event.type.value == "delete":
                self._held.append(Removal(*parts))
            else:
                obj = decode_kv(parts[0], event.kv)
                self._held.append(obj if obj is not None else Removal(*parts))
        if deferred is not None:
            if not self._applying:
                await self._load(list(deferred.values()), batch.revision)
            else:
                self._held.clear()  # in the deferred full read already
                self.revision = batch.revision
            return
        if not self._applying and self._held:
            changes, self._held = self._held, []
            async with self._lock:  # compile and write in one turn: documents land in compile order
                result = self.compiler.apply(changes)
                await self._write(result.writes())
        self.revision = batch.revision

    async def _resolve_names(self) -> None:
        loop = asyncio.get_running_loop()
        # Due by the clock, not by a quiet queue: new names arriving more often than the
        # refresh period would otherwise keep every known name at its first answer for good.
        refresh_at = loop.time() + DNS_REFRESH_SECONDS
        while True:
            try:
                name = await asyncio.wait_for(self.dns.pending.get(), timeout=max(refresh_at - loop.time(), 0))
                names = [name]
            except TimeoutError:
                names = sorted(self.compiler.dns_names())
                refresh_at = loop.time() + DNS_REFRESH_SECONDS
            for name in names:
                addresses = await self.dns.resolve(name)
                self.dns.addresses[name] = addresses
                async with self._lock:
                    result = self.compiler.set_resolution(name, addresses)
                    await self._write_retrying(result.writes())

    async def _write_retrying(self, writes: Sequence[tuple[str, dict[str, Any] | None]]) -> None:
        """`_write` until it succeeds. Under the lock nothing newer is compiled meanwhile, so the
        same writes stay right; given up on them, the store would keep stale documents."""
        delay = FIRST_RETRY_SECONDS
        while True:
            try:
                await self._write(writes)
                return
            except StoreError as exc:
                log.warning("compiled policy documents not written (%s); retrying", exc)
                await self._sleep(delay)
                delay = min(delay * 2, LONGEST_RETRY_SECONDS)

    async def _write(self, writes: Sequence[tuple[str, dict[str, Any] | None]]) -> None:
        for start in range(0, len(writes), MAX_TXN_OPS):
            ops: list[Put | Delete] = [
                Put(key, encode_document(doc)) if doc is not None else Delete(key)
                for key, doc in writes[start : start + MAX_TXN_OPS]
            ]
            await self.store.commit([], ops)
        if writes:
            log.debug("wrote %d compiled policy documents", len(writes))
