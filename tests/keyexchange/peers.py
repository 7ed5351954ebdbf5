"""Connection configs for two in-memory Esplanade peers."""

from __future__ import annotations

import random
from typing import Any

from esplanade.keyexchange.config import ConnectionConfig, PoolConfig
from esplanade.keyexchange.ikev2.dispatcher import IkeDispatcher
from esplanade.keyexchange.ikev2.events import ChildSaEstablished
from tests.keyexchange.memnet import MemNet, Node

A_IP, B_IP = "192.0.2.1", "192.0.2.2"
PSK = "in-memory-test-psk-0123456789"


def conn(side: str, **over: Any) -> dict[str, Any]:
    a = side == "a"
    d: dict[str, Any] = {
        "local_addrs": [A_IP if a else B_IP],
        "remote_addrs": [B_IP if a else A_IP],
        "local": {"auth": "psk", "id": "a.test" if a else "b.test"},
        "remote": {"auth": "psk", "id": "b.test" if a else "a.test"},
        "psk": PSK,
        "proposals": ["aes256gcm16-prfsha256-ecp256"],
        "children": {
            "net": {
                "local_ts": "10.1.0.0/16" if a else "10.2.0.0/16",
                "remote_ts": "10.2.0.0/16" if a else "10.1.0.0/16",
                "esp_proposals": ["aes256gcm16"],
            }
        },
    }
    for k, v in over.items():
        target, key = (d["children"]["net"], k[6:]) if k.startswith("child_") else (d, k)
        if v is None:  # None removes a default
            target.pop(key, None)
        else:
            target[key] = v
    return d


def pair(
    a_over: dict[str, Any] | None = None,
    b_over: dict[str, Any] | None = None,
    pools: dict[str, PoolConfig] | None = None,
    **kw: Any,
) -> tuple[MemNet, Node, Node]:
    net = MemNet()
    ca = ConnectionConfig.from_dict("ab", conn("a", **(a_over or {})), pools=pools)
    cb = ConnectionConfig.from_dict("ab", conn("b", **(b_over or {})), pools=pools)
    a = net.add("a", A_IP, IkeDispatcher([ca], rng=random.Random(1), now=net.now, **kw))
    b = net.add("b", B_IP, IkeDispatcher([cb], rng=random.Random(2), now=net.now, **kw))
    return net, a, b


def established(**kw: Any) -> tuple[MemNet, Node, Node, str, str]:
    """`pair(**kw)` with the IKE SA and its first Child SA up: (net, a, b, IKE SA id at a, Child SA id)."""
    net, a, b = pair(**kw)
    ike = a.engine.initiate("ab", net.now)
    net.run()
    assert a.of(ChildSaEstablished) and b.of(ChildSaEstablished), (a.events, b.events)
    return net, a, b, ike, a.of(ChildSaEstablished)[0].child_id


def live_children(n: Node) -> list[Any]:
    return [c for sa in n.engine.sas.values() for c in sa.children.values()]


def assert_children_paired(a: Node, b: Node, count: int = 1) -> None:
    """Each side holds `count` Child SAs, each paired with the other side's by SPIs and keys."""
    ca, cb = live_children(a), live_children(b)
    assert len(ca) == count and len(cb) == count, (ca, cb)
    assert {(c.spi_in, c.spi_out) for c in ca} == {(c.spi_out, c.spi_in) for c in cb}
    for c in ca:
        peer = next(x for x in cb if x.spi_in == c.spi_out)
        assert c.keys.encr_i == peer.keys.encr_i and c.keys.encr_r == peer.keys.encr_r
