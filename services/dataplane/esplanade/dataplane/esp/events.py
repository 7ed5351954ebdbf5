"""Events an SA hands to its shell (aioquic style: drained with `next_event()`).

Requests (`ReserveSequence`, `PersistReplayFloor`) ask the shell to persist a number in the
store and, for the sender, to confirm with `OutboundSa.grant_sequence(upto)` once it is durable.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from esplanade.ipsec.transforms import Direction


class ExpiryReason(StrEnum):
    BYTES = "bytes"
    PACKETS = "packets"
    SECONDS = "seconds"
    SEQUENCE = "sequence"  # the sequence counter passed its soft limit


@dataclass(frozen=True, slots=True)
class SoftExpire:
    """A soft lifetime ran out: time to rekey. The SA keeps working."""

    spi: int
    direction: Direction
    reason: ExpiryReason


@dataclass(frozen=True, slots=True)
class HardExpire:
    """A hard lifetime ran out: the SA refuses all further traffic."""

    spi: int
    direction: Direction
    reason: ExpiryReason


@dataclass(frozen=True, slots=True)
class SequenceExhausted:
    """The sender used its last sequence number (2^32-1, or 2^64-1 with ESN): rekey now."""

    spi: int


@dataclass(frozen=True, slots=True)
class ReserveSequence:
    """Persist `upto`, then call `grant_sequence(upto)`: the sender may use numbers up to it.

    After a restart or failover the sender starts at the persisted `upto + 1`, so no
    sequence number (and no AEAD nonce, which is derived from it) is ever used twice.
    """

    spi: int
    upto: int


@dataclass(frozen=True, slots=True)
class PersistReplayFloor:
    """Persist `upto` for this inbound SA; a successor created with it rejects every number <= `upto`.

    `upto` runs ahead of the highest accepted number by up to one block, so a failover
    never reopens a replay window; it may drop up to one block of fresh packets instead.
    """

    spi: int
    upto: int


EspEvent = SoftExpire | HardExpire | SequenceExhausted | ReserveSequence | PersistReplayFloor
