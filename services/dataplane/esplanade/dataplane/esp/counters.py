"""Traffic and drop counters of one SA (or of the SPI demultiplexer)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class DropReason(StrEnum):
    """Why a packet was not sent or not delivered. Every drop in the engine has one."""

    REPLAY = "replay"  # duplicate or left of the anti-replay window (RFC 4303 §3.4.3)
    ICV_FAILURE = "icv_failure"  # integrity check failed (RFC 4303 §3.4.4)
    UNKNOWN_SPI = "unknown_spi"  # no inbound SA for this SPI (RFC 4303 §3.4.2)
    POLICY_MISMATCH = "policy_mismatch"  # decapsulated packet outside the SA's selectors (RFC 4301 §5.2)
    MALFORMED = "malformed"  # truncated, oversized, bad padding, bad next header, bad lengths
    LIFETIME = "lifetime"  # the SA passed a hard lifetime
    DUMMY = "dummy"  # a TFC dummy packet (next header 59), dropped on purpose (RFC 4303 §2.6)
    SEQUENCE_EXHAUSTED = "sequence_exhausted"  # the sender used its last sequence number
    SEQUENCE_UNRESERVED = "sequence_unreserved"  # no persisted sequence block covers the next number


def _zero_drops() -> dict[DropReason, int]:
    return dict.fromkeys(DropReason, 0)


@dataclass(slots=True)
class TrafficCounters:
    """Packets and bytes that passed (inner packet sizes), and drops by reason."""

    packets: int = 0
    bytes: int = 0
    drops: dict[DropReason, int] = field(default_factory=_zero_drops)

    def drop(self, reason: DropReason) -> None:
        self.drops[reason] += 1

    @property
    def dropped(self) -> int:
        return sum(self.drops.values())

    def nonzero_drops(self) -> dict[str, int]:
        return {str(r): n for r, n in self.drops.items() if n}
