"""Rendezvous hashing and lease clocks: the pure parts of scale-out."""

from __future__ import annotations

from collections import Counter

from esplanade.cluster.lease_clock import LeaseClock
from esplanade.cluster.rendezvous import choose

KEYS = [f"198.18.{i // 250}.{i % 250}" for i in range(3000)]


def test_every_member_computes_the_same_owner_and_the_load_is_even() -> None:
    members = ["dp0", "dp1", "dp2"]
    owners = {key: choose(key, members) for key in KEYS}
    assert owners == {key: choose(key, list(reversed(members))) for key in KEYS}
    counts = Counter(owners.values())
    assert set(counts) == set(members)
    assert all(800 < n < 1200 for n in counts.values()), counts


def test_a_join_moves_only_keys_to_the_new_member_and_a_leave_only_its_own() -> None:
    before = {key: choose(key, ["dp0", "dp1", "dp2"]) for key in KEYS}
    after = {key: choose(key, ["dp0", "dp1", "dp2", "dp3"]) for key in KEYS}
    moved = [key for key in KEYS if before[key] != after[key]]
    assert all(after[key] == "dp3" for key in moved)
    assert 600 < len(moved) < 900  # about a quarter
    without = {key: choose(key, ["dp0", "dp2"]) for key in KEYS}
    assert all(without[key] == before[key] for key in KEYS if before[key] != "dp1")


def test_weights_follow_capacity_and_empty_sets_have_no_owner() -> None:
    counts = Counter(choose(key, {"big": 2.0, "small": 1.0}) for key in KEYS)
    assert 1.7 < counts["big"] / counts["small"] < 2.3, counts
    assert choose("x", []) is None
    assert choose("x", {"off": 0.0}) is None


def test_a_lease_counts_from_the_send_time_of_the_last_successful_keepalive() -> None:
    clock = LeaseClock(margin=0.5)
    assert not clock.valid(0.0)
    clock.granted(7, ttl=2, sent_at=10.0)
    assert clock.valid(11.4) and not clock.valid(11.5)  # 10 + 2 - 0.5
    clock.renewed(7, ttl=2, sent_at=11.0)  # answered late does not matter: sent at 11
    assert clock.valid(12.49) and not clock.valid(12.5)
    clock.renewed(7, ttl=2, sent_at=10.5)  # an older keepalive's late answer never shortens it
    assert clock.valid(12.49)
    clock.renewed(8, ttl=2, sent_at=12.0)  # another lease's answer changes nothing
    assert not clock.valid(12.6)
    assert clock.remaining(12.0) == 0.5
    clock.lost()
    assert not clock.valid(12.0) and clock.remaining(12.0) == 0.0
