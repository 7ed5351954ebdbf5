"""Exponential backoff with full jitter, for reconnecting watches."""

from __future__ import annotations

import random


class Backoff:
    """Delays of uniform(0, min(cap, base * 2**n)): spread retries, never a thundering herd."""

    def __init__(self, base: float = 0.05, cap: float = 2.0) -> None:
        self.base = base
        self.cap = cap
        self.attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 32)
        # At least a tenth of the ceiling: a retry loop never spins.
        return float(ceiling * (0.1 + 0.9 * random.random()))  # noqa: S311 - jitter, not a secret

    def reset(self) -> None:
        self.attempt = 0
