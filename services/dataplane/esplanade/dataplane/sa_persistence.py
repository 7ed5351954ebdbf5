"""Where a dataplane backend keeps what must survive a crash: outbound sequence numbers and
inbound replay floors (store keys `dataplane/seq/<spi>` and `dataplane/replay/<spi>`).

The rule that keeps AEAD nonces unique (the explicit IV is the sequence number): a sender
only uses numbers inside a block that is durable *before* the first of them leaves, and a
successor starts after everything ever reserved. A crash therefore burns at most the rest
of one block and never reuses a number. The service implements this on the store
(`esplanade.dataplane.sequence_ledger`); `MemorySaPersistence` is the in-process stand-in
for tests and for a dataplane run without a store.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

from esplanade.store.base import Compare, Delete


class ChildClaim(NamedTuple):
    """What a new Child SA claims at install: the outbound SPI's sequence block, the inbound
    SPI's replay floor, and `first_floor`, the floor its inbound SA asks to persist as soon as
    it starts from 0 (0: none), which may be persisted with the claim."""

    child_sa: str
    outbound_spi: int
    inbound_spi: int
    first_floor: int = 0


class SaPersistence(Protocol):
    async def start_outbound(self, child_sa: str, spi: int, block: int) -> tuple[int, int]:
        """(next_seq, reserved_upto) for a new outbound SA: it starts after every number ever
        reserved under `spi`, and one block is already durable when this returns."""
        ...

    async def start_child(
        self, child_sa: str, outbound_spi: int, inbound_spi: int, block: int, first_floor: int = 0
    ) -> tuple[int, int, int]:
        """`start_outbound` of the outbound SA and `replay_floor` of the inbound one, in as few
        store round trips as the implementation can: (next_seq, reserved_upto, replay_floor)."""
        ...

    async def start_children(self, claims: Sequence[ChildClaim], block: int) -> list[tuple[int, int, int]]:
        """`start_child` of several Child SAs, in order; all or nothing is not promised (an
        exception may leave some claimed)."""
        ...

    async def reserve(self, child_sa: str, spi: int, upto: int) -> int | None:
        """Make `upto` durable; return the bound the sender may use (>= upto), or None when the
        numbers belong to someone else (another instance sends under this SA: refuse)."""
        ...

    async def replay_floor(self, child_sa: str, spi: int) -> int:
        """The persisted floor of an inbound SA (0: none): a successor rejects every number at or below it."""
        ...

    async def persist_replay_floor(self, child_sa: str, spi: int, upto: int) -> None:
        """Raise the persisted floor to `upto` (never lowers it)."""
        ...

    async def forget(self, child_sa: str, inbound_spi: int, outbound_spi: int) -> None:
        """The Child SA is gone for good: drop its records."""
        ...

    def forget_ops(
        self, child_sa: str, inbound_spi: int, outbound_spi: int
    ) -> tuple[list[Compare], list[Delete]] | None:
        """`forget` as part of the caller's store transaction: (conditions, deletes) to commit
        with the caller's own ops, or None when only `forget` can do it. Should that transaction
        fail, the caller calls `forget`."""
        ...


class MemorySaPersistence:
    """`SaPersistence` in memory: correct within one process, forgets everything on exit."""

    def __init__(self) -> None:
        self.sequence: dict[int, int] = {}
        self.replay: dict[int, int] = {}
        self.writes = 0

    async def start_outbound(self, child_sa: str, spi: int, block: int) -> tuple[int, int]:
        start = self.sequence.get(spi, 0)
        self.sequence[spi] = start + block
        self.writes += 1
        return start + 1, start + block

    async def start_child(
        self, child_sa: str, outbound_spi: int, inbound_spi: int, block: int, first_floor: int = 0
    ) -> tuple[int, int, int]:
        next_seq, reserved = await self.start_outbound(child_sa, outbound_spi, block)
        floor = await self.replay_floor(child_sa, inbound_spi)
        if first_floor and not floor:
            await self.persist_replay_floor(child_sa, inbound_spi, first_floor)
        return next_seq, reserved, floor

    async def start_children(self, claims: Sequence[ChildClaim], block: int) -> list[tuple[int, int, int]]:
        return [await self.start_child(c.child_sa, c.outbound_spi, c.inbound_spi, block, c.first_floor) for c in claims]

    async def reserve(self, child_sa: str, spi: int, upto: int) -> int | None:
        current = self.sequence.get(spi, 0)
        if upto > current:
            self.sequence[spi] = upto
            self.writes += 1
        return max(upto, current)

    async def replay_floor(self, child_sa: str, spi: int) -> int:
        return self.replay.get(spi, 0)

    async def persist_replay_floor(self, child_sa: str, spi: int, upto: int) -> None:
        if upto > self.replay.get(spi, 0):
            self.replay[spi] = upto
            self.writes += 1

    async def forget(self, child_sa: str, inbound_spi: int, outbound_spi: int) -> None:
        self.sequence.pop(outbound_spi, None)
        self.replay.pop(inbound_spi, None)

    def forget_ops(
        self, child_sa: str, inbound_spi: int, outbound_spi: int
    ) -> tuple[list[Compare], list[Delete]] | None:
        self.sequence.pop(outbound_spi, None)
        self.replay.pop(inbound_spi, None)
        return [], []  # nothing of it is in a store
