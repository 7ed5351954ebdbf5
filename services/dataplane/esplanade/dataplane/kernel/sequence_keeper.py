"""The kernel's sequence counters and the sequence ledger (`SaPersistence`, `dataplane/seq/`).

The userspace engine sends only numbers inside a block made durable beforehand. The kernel
cannot be held to a block: it owns an SA's counters, increments them per packet and keeps
them while the SA lives, whatever happens to this process. So the ledger plays a different
part here:

* **while the SA lives, the kernel's counter is the truth.** A restart of the dataplane
  process (kill -9, upgrade) changes nothing: the successor adopts the SA as it is
  (`state_journal`), its counter carries on, and the successor makes `last_sent + block`
  durable (`adopt_outbound`, taking the ledger entry over from its predecessor);
* **only a reinstall needs the ledger** (the kernel lost the SA: reboot, a flush, a record
  changed in a way XFRM cannot update in place). The new kernel SA starts after everything
  ever reserved under the SPI: `start_outbound` claims the next block and the NEWSA request
  itself carries `oseq` = its first number - 1 (`XfrmSa.initial_replay`), so not one packet
  leaves with a lower number;
* **the ledger follows the counter:** every SA is installed with XFRMA_REPLAY_THRESH =
  block / 4, so the kernel sends XFRM_MSG_NEWAE on the AEVENTS group each time the counter
  moved on by a quarter block (no timer events: XFRMA_ETIMER_THRESH = 0). When the last sent
  number comes within block / 2 of the durable bound, the bound becomes `last_sent + block`
  (one CAS write). A dump every few seconds (and every GetCounters) catches up on
  notifications lost to a socket overrun.

The exact guarantee: a reinstalled outbound SA never repeats a number that was sent while
this process (or a predecessor) was following the SA, as long as the store write for a
bound finished before the counter reached it (a quarter block of slack: 262144 packets with
the default block of 2^20, about 0.26 s at 1 Mpps, for a write of a few ms). What it cannot
cover: packets sent while no dataplane process ran at all, past the last durable bound,
followed by the loss of the kernel SA before a process came back (e.g. the process stays
down and the node reboots) — nothing observed those numbers. A reinstalled Child SA
therefore also raises SOFT_EXPIRE ("rekey recommended"): a rekey puts fresh keys under the
counter and ends any doubt. Two dataplanes sending under one SPI are refused as in
userspace: the ledger entry names its holder, and a holder that lost it gets no more writes
(SEQUENCE_EXHAUSTED, keyexchange rekeys).

Inbound SAs keep replay floors the same way with `replay_block`: the floor is raised to
`highest_received + replay_block` whenever the window top comes within half a block of it;
a reinstalled inbound SA starts with every number up to the floor marked as received, so
nothing it accepted before can be replayed to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from esplanade.dataplane.sa_persistence import SaPersistence

log = logging.getLogger(__name__)

PERSIST_RETRY_MAX = 2.0
RefusedCallback = Callable[[str, int], None]  # (child SA, SPI): another instance holds the numbers


@dataclass(slots=True)
class _Mark:
    child_sa: str
    durable: int  # the bound known to be in the store (0: unknown)
    held: bool  # this instance holds the ledger entry (outbound only)
    wanted: int = 0  # the bound a pending write is making durable
    writing: bool = False


class KernelSequenceKeeper:
    """Keeps the ledger ahead of the kernel's counters (see the module docstring)."""

    def __init__(
        self,
        persistence: SaPersistence,
        *,
        sequence_block: int,
        replay_block: int,
        on_refused: RefusedCallback = lambda child, spi: None,
    ) -> None:
        if sequence_block < 4 or replay_block < 4:
            raise ValueError("sequence and replay blocks need at least 4 numbers")
        self.persistence = persistence
        self.sequence_block = sequence_block
        self.replay_block = replay_block
        self.on_refused = on_refused
        self._outbound: dict[int, _Mark] = {}
        self._inbound: dict[int, _Mark] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.writes = 0
        self.failures = 0
        self.refused = 0

    @property
    def outbound_threshold(self) -> int:
        """Packets between two NEWAE notifications of an outbound SA."""
        return self.sequence_block // 4

    @property
    def inbound_threshold(self) -> int:
        return self.replay_block // 4

    # -- installing ---------------------------------------------------------------------
    async def start_outbound(self, child_sa: str, spi: int) -> int:
        """The last number a new kernel SA must count as sent: it starts after every number
        ever reserved under `spi` (0 for an SPI the ledger has never seen)."""
        next_seq, upto = await self.persistence.start_outbound(child_sa, spi, self.sequence_block)
        self._outbound[spi] = _Mark(child_sa, upto, held=True)
        self.writes += 1
        return next_seq - 1

    async def inbound_floor(self, child_sa: str, spi: int) -> int:
        """The replay floor a new kernel SA starts with (0: none stored)."""
        floor = await self.persistence.replay_floor(child_sa, spi)
        self._inbound[spi] = _Mark(child_sa, floor, held=True)
        return floor

    def forget(self, *spis: int) -> None:
        for spi in spis:
            self._outbound.pop(spi, None)
            self._inbound.pop(spi, None)

    # -- following the kernel -----------------------------------------------------------
    def observe_outbound(self, child_sa: str, spi: int, last_sent: int) -> None:
        """The kernel reports (or a dump shows) `last_sent` for an outbound SA."""
        mark = self._outbound.get(spi)
        if mark is None:  # adopted from a predecessor: the first write takes the entry over
            mark = self._outbound[spi] = _Mark(child_sa, 0, held=False)
        if last_sent + self.sequence_block // 2 > max(mark.durable, mark.wanted):
            self._queue(mark, spi, last_sent + self.sequence_block, outbound=True)

    def observe_inbound(self, child_sa: str, spi: int, highest: int) -> None:
        mark = self._inbound.get(spi)
        if mark is None:
            mark = self._inbound[spi] = _Mark(child_sa, 0, held=True)
        if highest + self.replay_block // 2 > max(mark.durable, mark.wanted):
            self._queue(mark, spi, highest + self.replay_block, outbound=False)

    def durable_outbound(self, spi: int) -> int:
        mark = self._outbound.get(spi)
        return mark.durable if mark is not None else 0

    def durable_inbound(self, spi: int) -> int:
        mark = self._inbound.get(spi)
        return mark.durable if mark is not None else 0

    def _queue(self, mark: _Mark, spi: int, upto: int, *, outbound: bool) -> None:
        mark.wanted = max(mark.wanted, upto)
        if mark.writing:
            return
        mark.writing = True
        task = asyncio.get_running_loop().create_task(self._write(mark, spi, outbound))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, mark: _Mark, spi: int, outbound: bool) -> None:
        delay = 0.05
        table = self._outbound if outbound else self._inbound
        try:
            while table.get(spi) is mark and mark.wanted > mark.durable:
                upto = mark.wanted
                try:
                    if not outbound:
                        await self.persistence.persist_replay_floor(mark.child_sa, spi, upto)
                        durable: int | None = upto
                    elif mark.held:
                        durable = await self.persistence.reserve(mark.child_sa, spi, upto)
                    else:
                        durable = await self.persistence.adopt_outbound(
                            mark.child_sa, spi, upto - self.sequence_block, self.sequence_block
                        )
                        mark.held = True
                except Exception as exc:
                    self.failures += 1
                    log.warning("sequence mark of SPI %#010x not persisted yet: %s", spi, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, PERSIST_RETRY_MAX)
                    continue
                self.writes += 1
                if durable is None:
                    self.refused += 1
                    table.pop(spi, None)
                    log.error("SPI %#010x: sequence numbers are held by another dataplane instance", spi)
                    self.on_refused(mark.child_sa, spi)
                    return
                mark.durable = max(mark.durable, durable)
        finally:
            mark.writing = False

    async def drain(self) -> None:
        """Wait for the writes in flight (tests, a graceful stop)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
