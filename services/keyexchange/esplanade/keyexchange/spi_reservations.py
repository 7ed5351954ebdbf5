"""Inbound SPIs unique platform-wide: each one is reserved in the store (`spi/<spi hex>`,
created with CAS) before the IKE core puts it on the wire.

The core allocates SPIs synchronously, in the middle of an exchange, so the reservations
are made ahead: a pool of `size` SPIs, refilled in batches of one transaction each
(`Compare(key, 0)` + `Put` per SPI; the ones that lost a race are redrawn). A reservation
is written under this instance's lease, so SPIs reserved by an instance that dies go away
by themselves. When a Child SA is written, its SPI is taken over in the same transaction
(`installed_ops`): rewritten without the lease, naming the Child SA, so an installed SA
keeps its SPI across a keyexchange restart. `release` deletes it when the SA is gone.

Should the pool ever run dry (a burst bigger than it), `take` draws an SPI without a
reservation and `installed_ops` then creates the key with `Compare(key, 0)`: a collision
fails that one install, never silently shares an SPI.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable

from esplanade.store import schema
from esplanade.store.base import Compare, Delete, Put, Store, StoreError

log = logging.getLogger(__name__)

MAX_BATCH = 64  # SPIs per reservation transaction (two ops each would break MAX_TXN_OPS beyond that)
UNUSED_TTL = 600.0  # a reservation handed out but never installed is released after this long


class SpiReservations:
    def __init__(
        self,
        store: Store,
        instance: str,
        *,
        size: int = 256,
        lease: Callable[[], int] = lambda: 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.instance = instance
        self.size = size
        self.lease = lease
        self.clock = clock
        self._ready: deque[tuple[int, int]] = deque()  # (spi, mod_revision)
        self._handed_out: dict[int, tuple[int, float]] = {}  # spi -> (mod_revision or 0, when)
        self._refilling: asyncio.Task[None] | None = None
        self.counters: dict[str, int] = {}

    def _count(self, what: str, n: int = 1) -> None:
        self.counters[what] = self.counters.get(what, 0) + n

    @property
    def available(self) -> int:
        return len(self._ready)

    def _draw(self) -> int:
        while True:
            spi = int.from_bytes(os.urandom(4), "big")
            if spi >= 0x100 and spi not in self._handed_out:
                return spi

    async def fill(self) -> None:
        """Reserve until the pool is full (one transaction per batch)."""
        while len(self._ready) < self.size:
            wanted = min(MAX_BATCH, self.size - len(self._ready))
            taken = {spi for spi, _ in self._ready}
            spis: list[int] = []
            while len(spis) < wanted:
                spi = self._draw()
                if spi not in taken and spi not in spis:
                    spis.append(spi)
            value = json.dumps({"instance": self.instance, "state": "reserved"}).encode()
            lease = self.lease()
            keys = [schema.spi_allocation(s) for s in spis]
            result = await self.store.commit([Compare(k, 0) for k in keys], [Put(k, value, lease=lease) for k in keys])
            if result.succeeded:
                self._ready.extend((s, result.revision) for s in spis)
                self._count("reserved", len(spis))
                continue
            # some SPI is taken elsewhere: reserve the rest, redraw the others next round
            lost = {c.key for c in result.failed}
            self._count("conflicts", len(lost))
            free = [k for k in keys if k not in lost]
            if free:
                retry = await self.store.commit(
                    [Compare(k, 0) for k in free], [Put(k, value, lease=lease) for k in free]
                )
                if retry.succeeded:
                    self._ready.extend((int(k.rsplit("/", 1)[1], 16), retry.revision) for k in free)
                    self._count("reserved", len(free))

    def forget_reserved(self) -> None:
        """The lease the reservations hung on is gone (and so are they): start the pool afresh."""
        self._ready.clear()

    def take(self) -> int:
        """An inbound SPI for the IKE core (synchronous)."""
        if self._ready:
            spi, revision = self._ready.popleft()
        else:
            spi, revision = self._draw(), 0
            self._count("unreserved_draws")
        self._handed_out[spi] = (revision, self.clock())
        if len(self._ready) < self.size // 2 and (self._refilling is None or self._refilling.done()):
            self._refilling = asyncio.get_running_loop().create_task(self._refill(), name="spi-refill")
        return spi

    async def _refill(self) -> None:
        try:
            await self.fill()
        except StoreError as exc:
            log.warning("cannot reserve SPIs: %s", exc)

    def installed_ops(self, spi: int, child_sa: str) -> tuple[list[Compare], list[Put]]:
        """Conditions and ops that make `spi` belong to `child_sa` (same transaction as its record)."""
        key = schema.spi_allocation(spi)
        revision, _ = self._handed_out.get(spi, (0, 0.0))
        value = json.dumps({"instance": self.instance, "child_sa": child_sa}).encode()
        return [Compare(key, revision)], [Put(key, value)]

    def installed(self, spi: int, revision: int) -> None:
        """The install transaction committed at `revision`: the key is the SA's now."""
        self._handed_out[spi] = (revision, self.clock())

    def release_op(self, spi: int) -> Delete:
        self._handed_out.pop(spi, None)
        return Delete(schema.spi_allocation(spi))

    def forget(self, spi: int) -> None:
        self._handed_out.pop(spi, None)

    async def release(self, spi: int) -> None:
        try:
            await self.store.commit([], [self.release_op(spi)])
        except StoreError as exc:
            log.warning("cannot release an SPI reservation: %s", exc)

    async def sweep(self, in_use: Callable[[int], bool]) -> int:
        """Release SPIs handed out long ago whose negotiation never produced an SA."""
        now = self.clock()
        stale = [s for s, (_, at) in self._handed_out.items() if now - at > UNUSED_TTL and not in_use(s)]
        for spi in stale:
            await self.release(spi)
        self._count("swept", len(stale))
        return len(stale)
