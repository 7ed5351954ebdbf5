"""Interop with strongSwan 5.9.8 (kernel-libipsec, NAT-T forced) in netns ikec-a/ikec-b."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from esplanade.keyexchange.config import ConnectionConfig
from esplanade.keyexchange.ikev2.events import ChildSaEstablished, IkeSaEstablished
from tests.conditions import wait_until
from tests.keyexchange import interop as ix

pytestmark = [pytest.mark.netns, pytest.mark.strongswan]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ix.Charon, ix.EsplanadePeer]]:
    ix.make_netns()
    charon = ix.Charon(tmp_path_factory.mktemp("charon"))
    charon.start()
    peer = ix.EsplanadePeer()
    ix.nsx(ix.NS_ES, "ip", "link", "set", "esp0", "up")
    ix.nsx(ix.NS_ES, "ip", "route", "add", ix.SS_NET, "dev", "esp0", "src", ix.ES_INNER)
    try:
        yield charon, peer
    finally:
        peer.close()
        charon.stop()
        ix.teardown_netns()


def ping(ns: str, src: str, dst: str, count: int = 3) -> bool:
    r = ix.nsx(ns, "ping", "-c", str(count), "-i", "0.2", "-W", "2", "-I", src, dst, check=False, timeout=20)
    return r.returncode == 0


def test_psk_esplanade_initiator(env: tuple[ix.Charon, ix.EsplanadePeer]) -> None:
    charon, peer = env
    charon.load(ix.ss_conn(), ix.PSK_SECRETS)
    peer.configure([ConnectionConfig.from_dict("pair", ix.es_conn())])
    peer.call("initiate", "pair")
    wait_until(lambda: peer.of(ChildSaEstablished), timeout=15, what="child SA up")
    assert peer.of(IkeSaEstablished)[0].nat_remote
    assert ping(ix.NS_ES, ix.ES_INNER, ix.SS_INNER)
    assert ping(ix.NS_SS, ix.SS_INNER, ix.ES_INNER)
    out = charon.swanctl("--list-sas")
    assert "ESTABLISHED" in out and "INSTALLED" in out, out
