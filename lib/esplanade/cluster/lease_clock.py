"""How long a store lease is provably ours, counted from when the keepalive was *sent*.

etcd extends a lease by its TTL from the moment it *processes* a keepalive, which is after we
sent it. Counting from the send time therefore never overestimates: if a keepalive sent at
`t` succeeded, the lease lives at least until `t + ttl` on etcd's clock. Counting from the
answer would (a slow answer, a stalled process) let a node believe in a lease etcd already
expired, and act on SAs that a survivor has taken over. A margin absorbs clock-rate drift
and the time between checking the deadline and acting on it.

The clock is sans-IO: callers pass `now` (monotonic seconds).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LeaseClock:
    margin: float = 0.5
    lease_id: int = 0
    ttl: float = 0.0
    valid_until: float = 0.0

    def granted(self, lease_id: int, ttl: float, sent_at: float) -> None:
        """A lease grant sent at `sent_at` succeeded."""
        self.lease_id, self.ttl = lease_id, ttl
        self.valid_until = sent_at + ttl - self.margin

    def renewed(self, lease_id: int, ttl: float, sent_at: float) -> None:
        """A keepalive of `lease_id` sent at `sent_at` succeeded; `ttl` is what etcd answered."""
        if lease_id != self.lease_id:
            return  # the answer of a lease we no longer hold
        self.ttl = ttl
        self.valid_until = max(self.valid_until, sent_at + ttl - self.margin)

    def lost(self) -> None:
        """The lease is gone (expired, revoked, or we gave it up)."""
        self.lease_id, self.valid_until = 0, 0.0

    def valid(self, now: float) -> bool:
        return self.lease_id != 0 and now < self.valid_until

    def remaining(self, now: float) -> float:
        return max(0.0, self.valid_until - now) if self.lease_id else 0.0
