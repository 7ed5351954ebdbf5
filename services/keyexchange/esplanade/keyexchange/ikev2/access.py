"""What the access policy grants an authenticated remote peer, as the IKE core consumes it.

The shell supplies `EngineHooks.access_for`: called once per IKE SA when the responder has
authenticated the initiator, it returns None (the peer is not governed by policy: its
negotiated selectors stand, as for a site-to-site peer) or an `AccessGrant`. A grant narrows
every Child SA the responder accepts on that IKE SA (IKE_AUTH and CREATE_CHILD_SA, RFC 7296
§2.9: the responder's selectors become the intersection with `selectors`, several per payload)
and replaces the pool's split-tunnel subnets in the configuration reply by `routes`
(INTERNAL_IP4_SUBNET / INTERNAL_IP6_SUBNET). A grant with no selectors refuses every Child SA
with TS_UNACCEPTABLE. The core reports each decision as an `AccessDecided` event.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from esplanade.ipsec.selectors import TrafficSelector
from esplanade.keyexchange.ikev2.events import Event

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class AccessGrant:
    identity: str  # the policy identity the peer's IKE identity binds to
    selectors: tuple[TrafficSelector, ...]  # what the peer may reach (the responder's TS side)
    routes: tuple[IPNetwork, ...]  # split-tunnel routes for the configuration reply
    rules: tuple[str, ...] = ()  # the rules that granted something (for the decision log)


@dataclass(frozen=True, slots=True)
class AccessDecided(Event):
    """The policy decision when a Child SA of a governed peer is set up (allowed or refused)."""

    ike_sa: str
    identity: str
    peer_id: str
    peer: tuple[str, int]
    allowed: bool
    child: str  # the Child SA id when allowed, the child config name otherwise
    selectors: tuple[str, ...]  # the narrowed selectors (allowed) or what the peer asked for (refused)
    rules: tuple[str, ...]
    reason: str
