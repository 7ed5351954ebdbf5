"""Connection configs for two in-memory Esplanade peers."""

from __future__ import annotations

import random
from typing import Any

from esplanade.keyexchange.config import ConnectionConfig, PoolConfig
from esplanade.keyexchange.ikev2.dispatcher import IkeDispatcher
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
