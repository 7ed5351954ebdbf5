"""Evaluating a rule's conditions against connect-time facts and the clock.

Source network and posture are facts of the connection: they are known when the IKE SA is
authenticated and do not change during it. The time window depends only on the clock. The
compiled output keeps these apart (`compiled`): IKE evaluates the connect-time part once,
the dataplane re-evaluates time windows as its wall clock crosses minute boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass

from esplanade.policy.model import Conditions, IPAddress


@dataclass(frozen=True, slots=True)
class ConnectFacts:
    """What is known about a client when it connects: its outer address and posture tags."""

    source: IPAddress | None = None
    posture: frozenset[str] = frozenset()


def connect_failure(conditions: Conditions, facts: ConnectFacts) -> str | None:
    """Why the connect-time conditions fail (source network, posture), or None if they hold."""
    if conditions.source_networks:
        source = facts.source
        if source is None:
            return "the client's source address is unknown"
        if source.version == 6 and source.ipv4_mapped is not None:
            source = source.ipv4_mapped  # an IPv4 client as a dual-stack ("::") socket reports it
        if not any(source in net for net in conditions.source_networks):
            return f"source address {source} is outside its source networks"
    for tag in conditions.posture:
        if tag not in facts.posture:
            return f"posture tag '{tag}' is missing"
    return None


def condition_failure(conditions: Conditions, facts: ConnectFacts, now: float) -> str | None:
    """Why the conditions fail at wall-clock time `now`, or None if all of them hold."""
    if conditions.time_window is not None and not conditions.time_window.contains(now):
        return "outside its time window"
    return connect_failure(conditions, facts)
