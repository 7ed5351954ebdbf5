"""The access policy at IKE_AUTH: narrowing, split-tunnel routes and the connect decision log.

`RemoteAccessPolicy.grant_for` is the IKE core's `EngineHooks.access_for`: it looks the
authenticated peer up in the `AccessView` (store watch on ``policy/``) and, for a governed peer,
returns its compiled selectors (coarsened to what one TS payload holds; the dataplane filter is
exact) and routes, with the connection's facts (the peer's outer address; posture is not
reported yet, so posture-bound rules stay closed). `handle` turns the core's `AccessDecided`
events into CONNECT decision events (`DecisionEvents`: aggregated, rate-limited, never etcd).

The connection's `access_narrowing` says how coarse the narrowing is: ``exact`` (the default)
narrows to the grant's hosts, protocols and ports; ``networks`` to the site networks that hold
the granted addresses, address-only (and routes to match), so that a client which copes badly
with port-specific or many selectors still gets one selector per site network, and what it
sends outside its grant reaches the gateway and is dropped (and logged with its 5-tuple) by
the dataplane's exact per-identity filter.

A peer whose IKE identity binds to no policy identity is ungoverned (its negotiated selectors
stand) only on a connection with ``unbound_peers: negotiated`` (site-to-site, the default without
pools); on a remote-access connection (``deny``, the default with pools) it is granted nothing,
so a user missing from the policy, or authenticating with an identity type no policy identity
can name (a key id), reaches nothing.
"""

from __future__ import annotations

import ipaddress
import logging

from esplanade.keyexchange.ikev2.access import AccessDecided, AccessGrant
from esplanade.keyexchange.ikev2.events import Event
from esplanade.keyexchange.ikev2.ike_sa import IkeSa
from esplanade.policy.access_view import AccessView
from esplanade.policy.conditions import ConnectFacts
from esplanade.policy.decision_events import DecisionEvents
from esplanade.policy.decision_log import DecisionEvent, DecisionKind
from esplanade.policy.evaluator import DEFAULT_DENY, Action
from esplanade.policy.selector_sets import routes

log = logging.getLogger(__name__)

UNBOUND = ""  # the policy identity of a peer that binds to none (on a connection that denies them)


class RemoteAccessPolicy:
    def __init__(self, view: AccessView, decisions: DecisionEvents) -> None:
        self.view = view
        self.decisions = decisions

    def grant_for(self, ike: IkeSa) -> AccessGrant | None:
        access = self.view.lookup(ike.remote_identity_text())
        if access is None:
            if ike.config.unbound_peers == "deny":
                return AccessGrant(UNBOUND, (), (), ())  # deny by default: every Child SA refused
            return None
        try:
            source = ipaddress.ip_address(ike.remote[0])
        except ValueError:
            source = None
        facts = ConnectFacts(source)
        compiled = access.compiled
        rules = tuple(sorted({r for part in compiled.connect_parts(facts) for r in part.rules}))
        if ike.config.access_narrowing == "networks":
            coarse = compiled.network_selectors(facts, access.site_networks)
            return AccessGrant(access.identity, tuple(coarse), tuple(routes(coarse)), rules)
        return AccessGrant(access.identity, tuple(compiled.selectors(facts)), tuple(compiled.routes(facts)), rules)

    def handle(self, event: Event) -> None:
        if not isinstance(event, AccessDecided):
            return
        action = Action.ALLOW if event.allowed else Action.DENY
        rule = ",".join(event.rules) if event.allowed else DEFAULT_DENY
        reason = f"{event.reason}; peer {event.peer_id} at {event.peer[0]}; selectors {' '.join(event.selectors)}"
        self.decisions.record(
            DecisionEvent(DecisionKind.CONNECT, action, event.identity, None, rule, reason, event.ike_sa)
        )
