"""IKE_AUTH under the access policy (sans-IO, two in-memory peers): narrowing to the grant
(several selectors per payload), split-tunnel routes from the grant, the connect decision."""

from __future__ import annotations

import ipaddress
import json
import random

import pytest

from esplanade.ipsec.selectors import TrafficSelector
from esplanade.keyexchange.config import ConnectionConfig, PoolConfig
from esplanade.keyexchange.ikev2.access import AccessDecided, AccessGrant
from esplanade.keyexchange.ikev2.constants import NotifyType
from esplanade.keyexchange.ikev2.dispatcher import IkeDispatcher
from esplanade.keyexchange.ikev2.errors import ConfigError
from esplanade.keyexchange.ikev2.events import ChildSaEstablished, ChildSaRekeyed, IkeSaEstablished, NegotiationFailed
from esplanade.keyexchange.ikev2.ike_sa import IkeSa
from esplanade.keyexchange.remote_access_policy import RemoteAccessPolicy
from esplanade.policy.decision_events import DecisionEvents
from tests.keyexchange.peers import conn, pair

WALL = 1_700_000_000.0  # the wall clock of the state documents
POOL = PoolConfig(
    "rw",
    ipaddress.ip_network("10.99.0.0/24"),
    subnets=(ipaddress.ip_network("10.2.0.0/16"),),
)
GRANT = AccessGrant(
    "alice",
    (TrafficSelector.parse("10.2.1.5/32[tcp/443]"), TrafficSelector.parse("10.2.1.6/32[udp/53]")),
    (ipaddress.ip_network("10.2.1.5/32"), ipaddress.ip_network("10.2.1.6/32")),
    ("eng-web",),
)


def remote_access(grants: dict[str, AccessGrant | None]):  # type: ignore[no-untyped-def]
    _net, a, b, asked = remote_access_on(grants)
    return a, b, asked


def remote_access_on(grants: dict[str, AccessGrant | None]):  # type: ignore[no-untyped-def]
    asked: list[str] = []

    def access_for(ike: IkeSa) -> AccessGrant | None:
        asked.append(ike.remote_identity_text())
        return grants.get(ike.remote_identity_text())

    net, a, b = pair(
        a_over={"vips": ["0.0.0.0"], "child_local_ts": "0.0.0.0/0", "child_remote_ts": "0.0.0.0/0"},
        b_over={"pools": ["rw"], "child_local_ts": "0.0.0.0/0", "child_remote_ts": "10.99.0.0/24"},
        pools={"rw": POOL},
        access_for=access_for,
    )
    a.engine.initiate("ab", net.now)
    net.run()
    return net, a, b, asked


def test_governed_peer_is_narrowed_to_its_grant_and_gets_its_routes() -> None:
    a, b, asked = remote_access({"a.test": GRANT})
    assert asked == ["a.test"]  # the responder asks once, for the authenticated initiator
    est = a.of(IkeSaEstablished)[0]
    assert est.split_subnets == ("10.2.1.5/32", "10.2.1.6/32")  # not the pool's 10.2.0.0/16
    record = a.of(ChildSaEstablished)[0].record
    assert sorted(str(t) for t in record.outbound.remote_ts) == ["10.2.1.5/32[tcp/443]", "10.2.1.6/32[udp/53]"]
    decided = b.of(AccessDecided)
    assert len(decided) == 1 and decided[0].allowed and decided[0].identity == "alice"
    assert decided[0].rules == ("eng-web",)
    # the responder's record names the governing identity for the dataplane (restarts included)
    assert b.of(ChildSaEstablished)[0].record.governed_by == "alice"


def test_grant_of_nothing_refuses_the_child_sa_with_ts_unacceptable() -> None:
    a, b, _ = remote_access({"a.test": AccessGrant("bob", (), (), ())})
    assert a.of(IkeSaEstablished) and not a.of(ChildSaEstablished)
    assert a.of(NegotiationFailed)[0].notify == NotifyType.TS_UNACCEPTABLE
    decided = b.of(AccessDecided)
    assert len(decided) == 1 and not decided[0].allowed and "grants identity 'bob' nothing" in decided[0].reason


def test_peer_not_bound_to_a_policy_identity_keeps_the_connection_selectors() -> None:
    a, b, _ = remote_access({})
    est = a.of(IkeSaEstablished)[0]
    assert est.split_subnets == ("10.2.0.0/16",)
    record = a.of(ChildSaEstablished)[0].record
    assert [str(t) for t in record.outbound.remote_ts] == ["0.0.0.0/0"]
    assert not b.of(AccessDecided)
    assert b.of(ChildSaEstablished)[0].record.governed_by == ""


def test_a_peer_whose_identity_stops_binding_gets_nothing_more_on_its_ike_sa() -> None:
    """Governed at IKE_AUTH, governed for good: once the peer's identity no longer binds (the
    policy identity deleted, its IKE id removed), a new Child SA or a rekey on that IKE SA is
    granted nothing, not the connection's 0.0.0.0/0 (which it would be as an ungoverned peer)."""
    grants: dict[str, AccessGrant | None] = {"a.test": GRANT}
    net, a, b, _ = remote_access_on(grants)
    ike = next(iter(a.engine.sas))
    assert len(a.of(ChildSaEstablished)) == 1
    grants.clear()  # alice's identity is deleted

    a.engine.create_child(ike, "net", net.now)
    net.run()
    assert len(a.of(ChildSaEstablished)) == 1
    assert a.of(NegotiationFailed)[-1].notify == NotifyType.TS_UNACCEPTABLE
    refused = b.of(AccessDecided)[-1]
    assert not refused.allowed and refused.identity == "alice"

    a.engine.rekey_child(ike, next(iter(a.engine.sas[ike].children)), net.now)
    net.run()
    assert not a.of(ChildSaRekeyed)
    assert all(
        str(t) in ("10.2.1.5/32[tcp/443]", "10.2.1.6/32[udp/53]")
        for event in a.of(ChildSaEstablished)
        for t in event.record.outbound.remote_ts
    )


def test_a_successor_keeps_a_governed_ike_sa_governed() -> None:
    """After a takeover (the responder's IKE SA moved to another keyexchange through its state
    document), a peer governed at IKE_AUTH whose identity then stops binding still gets nothing
    more, even on a connection that lets unbound peers negotiate: the successor knows the IKE SA
    was governed (`governed_by`), not only the IKE SA that ran IKE_AUTH."""
    grants: dict[str, AccessGrant | None] = {"a.test": GRANT}

    def access_for(ike: IkeSa) -> AccessGrant | None:
        return grants.get(ike.remote_identity_text())

    over = {"pools": ["rw"], "child_local_ts": "0.0.0.0/0", "child_remote_ts": "10.99.0.0/24"}
    net, a, b = pair(
        a_over={"vips": ["0.0.0.0"], "child_local_ts": "0.0.0.0/0", "child_remote_ts": "0.0.0.0/0"},
        b_over={**over, "unbound_peers": "negotiated"},
        pools={"rw": POOL},
        access_for=access_for,
    )
    a.engine.initiate("ab", net.now)
    net.run()
    assert len(a.of(ChildSaEstablished)) == 1

    sa = next(iter(b.engine.sas.values()))
    document = json.loads(json.dumps(sa.to_state(net.now, WALL, lambda f, v: v.hex())))
    assert document["governed_by"] == "alice"
    b.engine.release(sa.id)
    config = ConnectionConfig.from_dict("ab", conn("b", **over, unbound_peers="negotiated"), pools={"rw": POOL})
    successor = IkeDispatcher([config], rng=random.Random(9), now=net.now, id_prefix="next-", access_for=access_for)
    restored = IkeSa.from_state(document, config, successor.hooks, net.now, WALL, lambda f, v: bytes.fromhex(v))
    successor.adopt(restored, net.now)
    b.engine = successor
    assert restored.access is not None and restored.access.identity == "alice"

    grants.clear()  # alice's identity is deleted
    a.engine.create_child(next(iter(a.engine.sas)), "net", net.now)
    net.run()
    assert len(a.of(ChildSaEstablished)) == 1  # without `governed_by`: a second one, 0.0.0.0/0
    assert a.of(NegotiationFailed)[-1].notify == NotifyType.TS_UNACCEPTABLE


class EmptyView:
    """A policy view in which no IKE identity binds to a policy identity."""

    def lookup(self, peer_identity: str) -> None:
        return None


def unbound_peer_on(unbound_peers: str | None):  # type: ignore[no-untyped-def]
    over = {} if unbound_peers is None else {"unbound_peers": unbound_peers}
    policy = RemoteAccessPolicy(EmptyView(), DecisionEvents("test"))  # type: ignore[arg-type]
    net, a, b = pair(
        a_over={"vips": ["0.0.0.0"], "child_local_ts": "0.0.0.0/0", "child_remote_ts": "0.0.0.0/0"},
        b_over={"pools": ["rw"], "child_local_ts": "0.0.0.0/0", "child_remote_ts": "10.99.0.0/24", **over},
        pools={"rw": POOL},
        access_for=policy.grant_for,
    )
    a.engine.initiate("ab", net.now)
    net.run()
    return a, b


def test_a_remote_access_connection_grants_nothing_to_a_peer_bound_to_no_identity() -> None:
    """Deny by default: on a connection with pools (remote access) a user missing from the policy,
    or one with an identity no policy identity can name, reaches nothing. Before, it got the
    connection's selectors (here 0.0.0.0/0) and the pool's routes, with no filter."""
    a, b = unbound_peer_on(None)
    assert a.of(IkeSaEstablished) and not a.of(ChildSaEstablished)
    assert a.of(IkeSaEstablished)[0].split_subnets == ()
    assert a.of(NegotiationFailed)[0].notify == NotifyType.TS_UNACCEPTABLE
    decided = b.of(AccessDecided)
    assert len(decided) == 1 and not decided[0].allowed and "a peer bound to no identity" in decided[0].reason


def test_unbound_peers_negotiated_keeps_the_connection_selectors() -> None:
    a, b = unbound_peer_on("negotiated")
    record = a.of(ChildSaEstablished)[0].record
    assert [str(t) for t in record.outbound.remote_ts] == ["0.0.0.0/0"]
    assert not b.of(AccessDecided)


def test_unbound_peers_defaults_by_connection_kind_and_is_validated() -> None:
    pools = {"rw": POOL}
    assert ConnectionConfig.from_dict("rw", conn("b", pools=["rw"]), pools=pools).unbound_peers == "deny"
    assert ConnectionConfig.from_dict("s2s", conn("b")).unbound_peers == "negotiated"
    assert ConnectionConfig.from_dict("s2s", conn("b", unbound_peers="deny")).unbound_peers == "deny"
    with pytest.raises(ConfigError) as err:
        ConnectionConfig.from_dict("rw", conn("b", unbound_peers="allow"))
    assert err.value.field == "connections.rw.unbound_peers"
