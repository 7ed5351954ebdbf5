"""Rendezvous (highest-random-weight) hashing: which member carries a key.

Every member scores every key with a hash of (member, key); the highest score wins. All
members compute the same answer from the same member list, with no coordination, and when a
member joins or leaves only the keys it wins (or won) move: the minimal movement that
consistent hashing promises, without a ring or virtual nodes.

Weights (capacity) use the logarithmic method of weighted rendezvous hashing (Schindelhauer
and Schomaker, "Weighted distributed hash tables", 2005): score = -weight / ln(u) with u the
hash mapped into (0, 1), so a member of weight 2 wins twice as many keys as one of weight 1.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping

_SCALE = float(1 << 64)


def score(member: str, key: str, weight: float = 1.0) -> float:
    digest = hashlib.sha256(member.encode() + b"\x00" + key.encode()).digest()
    u = (int.from_bytes(digest[:8], "big") + 0.5) / _SCALE  # strictly inside (0, 1)
    return -weight / math.log(u)


def choose(key: str, members: Mapping[str, float] | Iterable[str]) -> str | None:
    """The member that carries `key` (None without members); ties broken by name."""
    weights = members if isinstance(members, Mapping) else dict.fromkeys(members, 1.0)
    best: tuple[float, str] | None = None
    for member, weight in weights.items():
        if weight <= 0:
            continue
        candidate = (score(member, key, weight), member)
        if best is None or candidate > best:
            best = candidate
    return best[1] if best else None
