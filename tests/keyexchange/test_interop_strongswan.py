"""Interop with strongSwan 5.9.8 (kernel-libipsec, NAT-T forced) in netns ikec-a/ikec-b."""

from __future__ import annotations

from collections.abc import Iterator

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


def _establish(
    charon: ix.Charon, peer: ix.EsplanadePeer, ss: str, es: dict, *, esplanade_initiates: bool = True
) -> str:
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


def _wait_for_esp(peer: ix.EsplanadePeer, packets: int) -> None:
    def received() -> int:
        assert peer.tunnel is not None
        return sum(st.packets for st in list(peer.tunnel.inbound.values()))

    start = received()
    wait_until(lambda: received() >= start + packets, timeout=10, what="ESP flowing")


class Pinger:
    """A continuous ping from one namespace; `loss()` after it ends."""

    def __init__(self, ns: str, src: str, dst: str, count: int = 60, interval: float = 0.05) -> None:
        import subprocess

        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, "ping", "-c", str(count), "-i", str(interval), "-W", "1", "-I", src, dst],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def result(self) -> str:
        out, _ = self.proc.communicate(timeout=30)
        return out

    def lost(self) -> int:
        import re

        out = self.result()
        m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        assert m, out
        return int(m.group(1)) - int(m.group(2))


@pytest.mark.parametrize("esp", ["aes256gcm16", "aes256gcm16-ecp256"])
@pytest.mark.parametrize("who", ["esplanade", "strongswan"])
def test_child_rekey_under_traffic(env: tuple[ix.Charon, ix.EsplanadePeer], who: str, esp: str) -> None:
    """Make-before-break Child rekey, without and with PFS (a KE in CREATE_CHILD_SA)."""
    from esplanade.keyexchange.ikev2.events import ChildSaDeleted, ChildSaRekeyed

    charon, peer = env
    ike_id = _establish(charon, peer, ix.ss_conn(esp=esp), ix.es_conn(child_esp_proposals=[esp]))
    child_id = peer.of(ChildSaEstablished)[0].child_id
    assert ping(ix.NS_SS, ix.SS_INNER, ix.ES_INNER, 1)
    pinger = Pinger(ix.NS_SS, ix.SS_INNER, ix.ES_INNER)
    _wait_for_esp(peer, 5)  # the rekey happens while pings are in flight, not before they start
    if who == "esplanade":
        peer.call("rekey_child", ike_id, child_id)
    else:
        charon.swanctl("--rekey", "--child", "net")
    rekeyed = wait_until(lambda: peer.of(ChildSaRekeyed), timeout=10, what="child rekeyed")[0]
    wait_until(
        lambda: any(e.child_id == child_id for e in peer.of(ChildSaDeleted)), timeout=10, what="old child deleted"
    )
    assert pinger.lost() == 0
    assert rekeyed.old_child_id == child_id
    out = charon.swanctl("--list-sas")
    assert out.count("INSTALLED") == 1, out
    assert f"{rekeyed.record.inbound.spi:08x}" in out and f"{rekeyed.record.outbound.spi:08x}" in out


@pytest.mark.parametrize("who", ["esplanade", "strongswan"])
def test_ike_rekey_under_traffic(env: tuple[ix.Charon, ix.EsplanadePeer], who: str) -> None:
    from esplanade.keyexchange.ikev2.events import IkeSaDeleted, IkeSaRekeyed

    charon, peer = env
    ike_id = _establish(charon, peer, ix.ss_conn(), ix.es_conn())
    pinger = Pinger(ix.NS_ES, ix.ES_INNER, ix.SS_INNER, count=40)
    _wait_for_esp(peer, 5)
    if who == "esplanade":
        peer.call("rekey_ike", ike_id)
    else:
        charon.swanctl("--rekey", "--ike", "pair")
    ev = wait_until(lambda: peer.of(IkeSaRekeyed), timeout=10, what="IKE rekeyed")[0]
    wait_until(lambda: any(e.ike_sa == ike_id for e in peer.of(IkeSaDeleted)), timeout=10, what="old IKE SA deleted")
    assert pinger.lost() == 0
    assert charon.sa_count() == 1
    # the new IKE SA works: a DPD round trip and a child rekey over it
    new_id = ev.new_ike_sa
    peer.call("dpd", new_id)
    wait_until(lambda: peer.run(lambda: peer.engine.sas[new_id].outstanding is None), timeout=5, what="DPD answered")
    child_id = peer.run(lambda: next(iter(peer.engine.sas[new_id].children)))
    peer.call("rekey_child", new_id, child_id)
    from esplanade.keyexchange.ikev2.events import ChildSaRekeyed

    wait_until(lambda: peer.of(ChildSaRekeyed), timeout=10, what="child rekey over the new IKE SA")
    assert ping(ix.NS_SS, ix.SS_INNER, ix.ES_INNER, 2)


@pytest.mark.parametrize("who", ["esplanade", "strongswan"])
def test_delete_from_either_side(env: tuple[ix.Charon, ix.EsplanadePeer], who: str) -> None:
    from esplanade.keyexchange.ikev2.events import ChildSaDeleted, IkeSaDeleted

    charon, peer = env
    ike_id = _establish(charon, peer, ix.ss_conn(), ix.es_conn(), esplanade_initiates=who == "strongswan")
    if who == "esplanade":
        peer.call("delete_ike", ike_id)
    else:
        charon.swanctl("--terminate", "--ike", "pair")
    wait_until(lambda: peer.of(IkeSaDeleted), timeout=10, what="IKE SA deleted on Esplanade")
    assert peer.of(ChildSaDeleted)
    wait_until(lambda: charon.sa_count() == 0, timeout=10, what="IKE SA deleted on strongSwan")
    assert not peer.run(lambda: peer.engine.sas)
    assert not ping(ix.NS_SS, ix.SS_INNER, ix.ES_INNER, 1)


def test_child_delete_from_strongswan(env: tuple[ix.Charon, ix.EsplanadePeer]) -> None:
    from esplanade.keyexchange.ikev2.events import ChildSaDeleted

    charon, peer = env
    _establish(charon, peer, ix.ss_conn(), ix.es_conn())
    charon.swanctl("--terminate", "--child", "net")
    wait_until(lambda: peer.of(ChildSaDeleted), timeout=10, what="child deleted")
    assert charon.sa_count() == 1  # the IKE SA stays


def test_proposal_mismatch(env: tuple[ix.Charon, ix.EsplanadePeer]) -> None:
    from esplanade.keyexchange.ikev2.constants import NotifyType
    from esplanade.keyexchange.ikev2.events import NegotiationFailed

    charon, peer = env
    charon.clear_sas()
    charon.load(ix.ss_conn(), ix.PSK_SECRETS)
    peer.configure([ConnectionConfig.from_dict("pair", ix.es_conn(proposals=["aes128-sha256-modp3072"]))])
    peer.call("initiate", "pair")
    ev = wait_until(lambda: peer.of(NegotiationFailed), timeout=10, what="negotiation failure")[0]
    assert ev.notify == NotifyType.NO_PROPOSAL_CHOSEN and "NO_PROPOSAL_CHOSEN" in ev.reason
    # and as responder: strongSwan's proposal is refused with the configured ones named
    peer.events.clear()
    r = charon.swanctl("--initiate", "--ike", "pair", "--child", "net", "--timeout", "10", check=False)
    assert "NO_PROPOSAL_CHOSEN" in r or "failed" in r
    ev = wait_until(lambda: peer.of(NegotiationFailed), timeout=10, what="responder failure event")[0]
    assert ev.notify == NotifyType.NO_PROPOSAL_CHOSEN and "aes128" in ev.reason
    assert charon.sa_count() == 0


@pytest.mark.parametrize("esplanade_initiates", [True, False])
def test_bad_psk(env: tuple[ix.Charon, ix.EsplanadePeer], esplanade_initiates: bool) -> None:
    from esplanade.keyexchange.ikev2.constants import NotifyType
    from esplanade.keyexchange.ikev2.events import NegotiationFailed

    charon, peer = env
    charon.clear_sas()
    charon.load(ix.ss_conn(), ix.PSK_SECRETS)
    peer.configure([ConnectionConfig.from_dict("pair", ix.es_conn(psk="not-the-right-secret-at-all"))])
    if esplanade_initiates:
        peer.call("initiate", "pair")
    else:
        charon.swanctl("--initiate", "--ike", "pair", "--child", "net", "--timeout", "10", check=False)
    ev = wait_until(lambda: peer.of(NegotiationFailed), timeout=10, what="auth failure")[0]
    assert ev.notify == NotifyType.AUTHENTICATION_FAILED
    assert not peer.of(ChildSaEstablished)
    assert not peer.run(lambda: peer.engine.sas)
    wait_until(lambda: charon.sa_count() == 0, timeout=10, what="no SA on strongSwan")


def test_dpd_detects_dead_peer(env: tuple[ix.Charon, ix.EsplanadePeer]) -> None:
    from esplanade.keyexchange.ikev2.events import IkeSaDeleted

    charon, peer = env
    _establish(
        charon, peer, ix.ss_conn(), ix.es_conn(dpd_delay="1s", retransmit={"timeout": 0.3, "base": 1.5, "tries": 2})
    )
    ix.nsx(ix.NS_SS, "ip", "link", "set", "ikeca0", "down")  # the peer goes silent
    try:
        ev = wait_until(lambda: peer.of(IkeSaDeleted), timeout=15, what="dead peer detected")[0]
        assert "dead peer" in ev.reason
    finally:
        ix.nsx(ix.NS_SS, "ip", "link", "set", "ikeca0", "up")


@pytest.mark.parametrize("kind", ["ecdsa", "rsa"])
@pytest.mark.parametrize("esplanade_initiates", [True, False])
def test_certificate_auth(env: tuple[ix.Charon, ix.EsplanadePeer], kind: str, esplanade_initiates: bool) -> None:
    from tests.keyexchange import pki

    charon, peer = env
    ca = pki.make_ca(kind)
    ss = pki.issue(ca, ix.SS_ID, kind)
    es = pki.issue(ca, ix.ES_ID, kind)
    for d in ("x509", "x509ca", "private"):
        for f in (charon.base / d).iterdir():
            f.unlink()
    (charon.base / "x509ca" / "ca.crt").write_bytes(ca.cert_pem())
    (charon.base / "x509" / "a.crt").write_bytes(ss.cert_pem())
    (charon.base / "private" / "a.key").write_bytes(ss.key_pem())
    charon.clear_sas()
    charon.load(ix.ss_conn(auth="pubkey", cert="a.crt"))
    cfg = ix.es_conn(
        local={"auth": "pubkey", "certs": [es.cert], "private_key": es.key},
        remote={"auth": "pubkey"},
        cacerts=[ca.cert],
    )
    peer.configure([ConnectionConfig.from_dict("pair", cfg)])
    charon.log.write_text("")
    if esplanade_initiates:
        peer.call("initiate", "pair")
    else:
        charon.swanctl("--initiate", "--ike", "pair", "--child", "net", "--timeout", "15")
    wait_until(lambda: peer.of(ChildSaEstablished), timeout=15, what="child SA up")
    assert ping(ix.NS_ES, ix.ES_INNER, ix.SS_INNER, 2)
    log = charon.log_text()
    import re

    scheme = "ECDSA_WITH_SHA256_DER" if kind == "ecdsa" else "RSA_EMSA_PKCS1_SHA2_256"
    assert re.search(rf"authentication of 'b.ipsec.test' with {scheme} successful", log), log[-3000:]
    est = peer.of(IkeSaEstablished)[0]
    assert est.remote_id == ix.SS_ID


def test_strongswan_cookie_challenge_honoured(env: tuple[ix.Charon, ix.EsplanadePeer]) -> None:
    """charon demands COOKIEs above 3 half-open IKE SAs per IP (its default): we answer them."""
    import random
    import socket

    from esplanade.keyexchange.ikev2.dispatcher import IkeDispatcher

    charon, peer = env
    charon.clear_sas()
    charon.load(ix.ss_conn(), ix.PSK_SECRETS)
    cfg = ConnectionConfig.from_dict("pair", ix.es_conn())
    peer.configure([cfg])
    # three half-open IKE SAs from our address (never completed)
    fake = IkeDispatcher([cfg], rng=random.Random(3))
    for port in (5001, 5002, 5003):
        fake.initiate("pair", 0.0, local=(ix.ES_IP, port))
    datagrams = fake.datagrams_to_send()

    def send_half_open() -> None:
        for d in datagrams:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(d.local)
            s.sendto(d.data, d.remote)
            s.close()

    peer.run(send_half_open)
    wait_until(lambda: charon.swanctl("--list-sas", check=False).count("CONNECTING") >= 3, timeout=5, what="half-open")
    peer.call("initiate", "pair")
    ev = wait_until(lambda: peer.of(ChildSaEstablished), timeout=15, what="child SA up after COOKIE")[0]
    sa = peer.run(lambda: peer.engine.sas[ev.ike_sa])
    assert sa.counters.get("cookie_retries", 0) >= 1
    assert "COOKIE" in charon.log_text()
    assert ping(ix.NS_ES, ix.ES_INNER, ix.SS_INNER, 2)


def test_pq_initiator_falls_back_to_classic(env: tuple[ix.Charon, ix.EsplanadePeer]) -> None:
    charon, peer = env
    _establish(charon, peer, ix.ss_conn(), ix.es_conn(proposals=["aes256gcm16-prfsha256-ecp256-ke1_mlkem768"]))
    est = peer.of(IkeSaEstablished)[0]
    assert "mlkem" not in est.suite and "ecp256" in est.suite
    assert ping(ix.NS_SS, ix.SS_INNER, ix.ES_INNER, 2)


def test_spoofed_init_flood_triggers_cookies(env: tuple[ix.Charon, ix.EsplanadePeer]) -> None:
    """IKE_SA_INIT from 300 spoofed sources: Esplanade answers with COOKIEs, strongSwan still connects."""
    import random
    import socket
    import struct
    import threading

    from esplanade.keyexchange.ikev2.dispatcher import IkeDispatcher

    charon, peer = env
    charon.clear_sas()
    charon.load(ix.ss_conn(), ix.PSK_SECRETS)
    cfg = ConnectionConfig.from_dict("pair", ix.es_conn(remote_addrs=[]))
    peer.configure([cfg], cookie_threshold=10, cookie_threshold_ip=0, block_threshold=0)
    fake = IkeDispatcher(
        [ConnectionConfig.from_dict("pair", ix.es_conn(remote_addrs=[ix.ES_IP]))], rng=random.Random(4)
    )
    packets = []
    for _ in range(300):
        fake.initiate("pair", 0.0, local=("198.18.0.3", 500))
    for i, d in enumerate(fake.datagrams_to_send()):
        src = f"198.18.{1 + i // 250}.{1 + i % 250}"
        udp = struct.pack("!HHHH", 500, 500, 8 + len(d.data), 0) + d.data
        ip = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), i, 0, 64, 17, 0, socket.inet_aton(src), socket.inet_aton(ix.ES_IP)
        )
        packets.append(ip + udp)
    done = threading.Event()

    def flood() -> None:
        ix.setns(ix.NS_SS)
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        for p in packets:
            s.sendto(p, (ix.ES_IP, 0))
        s.close()
        done.set()

    t = threading.Thread(target=flood)
    t.start()
    charon.swanctl("--initiate", "--ike", "pair", "--child", "net", "--timeout", "20")
    t.join(10)
    assert done.is_set()
    wait_until(lambda: peer.of(ChildSaEstablished), timeout=15, what="legitimate peer connected")
    counters = peer.run(lambda: dict(peer.engine.counters))
    assert counters.get("cookies_sent", 0) > 0, counters
    assert peer.run(lambda: peer.engine.half_open_count()) <= 10
    assert ping(ix.NS_SS, ix.SS_INNER, ix.ES_INNER, 2)


@pytest.mark.parametrize("who", ["esplanade", "strongswan"])
def test_reauthentication(env: tuple[ix.Charon, ix.EsplanadePeer], who: str) -> None:
    """A new IKE SA (full IKE_SA_INIT + IKE_AUTH) replaces the old one; traffic flows after."""
    from esplanade.keyexchange.ikev2.events import IkeSaDeleted

    charon, peer = env
    ike_id = _establish(charon, peer, ix.ss_conn(), ix.es_conn())
    if who == "esplanade":
        peer.call("reauth", ike_id)
    else:
        charon.swanctl("--rekey", "--ike", "pair", "--reauth")
    wait_until(lambda: len(peer.of(IkeSaEstablished)) == 2, timeout=15, what="new IKE SA")
    wait_until(lambda: any(e.ike_sa == ike_id for e in peer.of(IkeSaDeleted)), timeout=15, what="old IKE SA gone")
    wait_until(lambda: charon.sa_count() == 1, timeout=10, what="one IKE SA left on strongSwan")
    if who == "esplanade":
        assert peer.of(IkeSaEstablished)[1].reauth_of == ike_id
    assert ping(ix.NS_SS, ix.SS_INNER, ix.ES_INNER, 2)


def _tcp_roundtrip(server_ns: str, server_ip: str, client_ns: str, client_ip: str, size: int = 300_000) -> None:
    """Send `size` bytes client->server and back over TCP through the tunnel; compare digests."""
    import hashlib
    import os
    import socket
    import threading

    payload = os.urandom(size)
    result: dict[str, bytes] = {}
    ready = threading.Event()

    def server() -> None:
        ix.setns(server_ns)
        with socket.create_server((server_ip, 5201)) as srv:
            srv.settimeout(15)
            ready.set()
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(15)
                got = bytearray()
                while len(got) < size:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    got += chunk
                result["server"] = hashlib.sha256(got).digest()
                conn.sendall(bytes(got))

    def client() -> None:
        ix.setns(client_ns)
        ready.wait(10)
        with socket.create_connection((server_ip, 5201), timeout=15, source_address=(client_ip, 0)) as c:
            c.sendall(payload)
            got = bytearray()
            while len(got) < size:
                chunk = c.recv(65536)
                if not chunk:
                    break
                got += chunk
            result["client"] = hashlib.sha256(got).digest()

    threads = [threading.Thread(target=server), threading.Thread(target=client)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    want = hashlib.sha256(payload).digest()
    assert result.get("server") == want and result.get("client") == want


def test_tcp_both_directions(env: tuple[ix.Charon, ix.EsplanadePeer]) -> None:
    charon, peer = env
    _establish(charon, peer, ix.ss_conn(), ix.es_conn())
    _tcp_roundtrip(ix.NS_SS, ix.SS_INNER, ix.NS_ES, ix.ES_INNER)  # Esplanade side connects
    _tcp_roundtrip(ix.NS_ES, ix.ES_INNER, ix.NS_SS, ix.SS_INNER)  # strongSwan side connects
