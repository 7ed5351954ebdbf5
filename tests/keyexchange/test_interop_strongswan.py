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
    charon.clear_sas()
    charon.load(ix.ss_conn(), ix.PSK_SECRETS)
    peer.configure([ConnectionConfig.from_dict("pair", ix.es_conn())])
    peer.call("initiate", "pair")
    wait_until(lambda: peer.of(ChildSaEstablished), timeout=15, what="child SA up")
    assert peer.of(IkeSaEstablished)[0].nat_remote
    assert ping(ix.NS_ES, ix.ES_INNER, ix.SS_INNER)
    assert ping(ix.NS_SS, ix.SS_INNER, ix.ES_INNER)
    out = charon.swanctl("--list-sas")
    assert "ESTABLISHED" in out and "INSTALLED" in out, out


def _establish(charon: ix.Charon, peer: ix.EsplanadePeer, ss: str, es: dict, *, esplanade_initiates: bool = True) -> str:
    charon.clear_sas()
    charon.load(ss, ix.PSK_SECRETS)
    peer.configure([ConnectionConfig.from_dict("pair", es)])
    charon.log.write_text("")
    if esplanade_initiates:
        peer.call("initiate", "pair")
    else:
        charon.swanctl("--initiate", "--ike", "pair", "--child", "net", "--timeout", "15")
    ev = wait_until(lambda: peer.of(ChildSaEstablished), timeout=15, what="child SA up")[0]
    return str(ev.ike_sa)


@pytest.mark.parametrize(
    ("ss_prop", "es_prop", "esp"),
    [
        ("aes256gcm16-prfsha256-ecp256", "aes256gcm16-prfsha256-ecp256", "aes256gcm16"),
        ("aes256-sha256-modp2048", "aes256-sha256-modp2048", "aes256-sha256"),
        ("chacha20poly1305-prfsha256-curve25519", "chacha20poly1305-prfsha256-x25519", "chacha20poly1305"),
    ],
)
@pytest.mark.parametrize("esplanade_initiates", [True, False])
def test_proposals_and_keys_match_strongswan(
    env: tuple[ix.Charon, ix.EsplanadePeer], ss_prop: str, es_prop: str, esp: str, esplanade_initiates: bool
) -> None:
    charon, peer = env
    ike_id = _establish(
        charon,
        peer,
        ix.ss_conn(proposals=ss_prop, esp=esp),
        ix.es_conn(proposals=[es_prop], child_esp_proposals=[esp]),
        esplanade_initiates=esplanade_initiates,
    )
    assert ping(ix.NS_ES, ix.ES_INNER, ix.SS_INNER)
    assert ping(ix.NS_SS, ix.SS_INNER, ix.ES_INNER)
    # byte-for-byte: charon's `ike 4`/`chd 4` dumps against our derived keys
    sa = peer.run(lambda: peer.engine.sas[ike_id])  # type: ignore[union-attr]
    dumps = dict(ix.parse_key_dumps(charon.log_text()))
    k = sa.keys
    assert dumps["shared Diffie Hellman secret"] == sa.shared_secrets[0]
    assert dumps["SKEYSEED"] == sa.skeyseed
    assert dumps["Sk_d secret"] == k.sk_d
    assert dumps["Sk_ei secret"] == k.sk_ei and dumps["Sk_er secret"] == k.sk_er
    assert dumps["Sk_pi secret"] == k.sk_pi and dumps["Sk_pr secret"] == k.sk_pr
    if "Sk_ai secret" in dumps or k.sk_ai:
        assert dumps["Sk_ai secret"] == k.sk_ai and dumps["Sk_ar secret"] == k.sk_ar
    rec = peer.of(ChildSaEstablished)[0].record
    i2r = rec.outbound if esplanade_initiates else rec.inbound
    r2i = rec.inbound if esplanade_initiates else rec.outbound
    assert dumps["encryption initiator key"] == i2r.encr_key
    assert dumps["encryption responder key"] == r2i.encr_key
    if i2r.integ_key:
        assert dumps["integrity initiator key"] == i2r.integ_key
        assert dumps["integrity responder key"] == r2i.integ_key
    peer.call("delete_ike", ike_id)
    wait_until(lambda: charon.sa_count() == 0, timeout=10, what="strongSwan SA gone")
