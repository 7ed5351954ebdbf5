"""The keyexchange service (a real process, with its dataplane process and embedded store)
against strongSwan 5.9.8 (charon + kernel-libipsec, NAT-T forced) in netns kxs-ss / kxs-es.
One charon for the module; each test loads its own configuration on both sides."""

from __future__ import annotations

import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from esplanade.store import schema
from esplanade.v1 import dataplane_pb2 as dp
from esplanade.v1 import keyexchange_pb2 as kx
from tests.conditions import wait_until
from tests.keyexchange import interop as ix
from tests.keyexchange.service.sites import EventLog, Site, nsx, sh, tcp_echo

pytestmark = [pytest.mark.netns, pytest.mark.strongswan]

NS_SS = "kxs-ss"
SS_IP, ES_IP = "198.18.12.1", "198.18.12.2"
SS_INNER, ES_INNER = "10.94.1.1", "10.94.2.1"
SS_NET, ES_NET = "10.94.1.0/24", "10.94.2.0/24"
SS_ID, ES_ID = "ss.kxs.test", "es.kxs.test"
PSK = "kxs-strongswan-psk-0123456789abcdef"
PSK_SECRETS = f"""
    ike-pair {{
        id-a = {SS_ID}
        id-b = {ES_ID}
        secret = "{PSK}"
    }}"""
PROPOSALS = {
    "gcm-ecp256": ("aes256gcm16-prfsha256-ecp256", "aes256gcm16"),
    "cbc-modp2048": ("aes256-sha256-modp2048", "aes256-sha256"),
    "chacha-x25519": ("chacha20poly1305-prfsha256-curve25519", "chacha20poly1305"),
}


class Env:
    def __init__(self, charon: ix.Charon, es: Site, events: EventLog) -> None:
        self.charon = charon
        self.es = es
        self.events = events


def ss_conn(**kw: Any) -> str:
    return ix.ss_conn(
        remote_id=ES_ID,
        local_id=SS_ID,
        local_ip=SS_IP,
        remote_ip=ES_IP,
        local_ts=SS_NET,
        remote_ts=ES_NET,
        **kw,
    )


def es_conn(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "local_addrs": [ES_IP],
        "remote_addrs": [SS_IP],
        "local": {"auth": "psk", "id": ES_ID},
        "remote": {"auth": "psk", "id": SS_ID},
        "psk": PSK,
        "proposals": ["aes256gcm16-prfsha256-ecp256"],
        "children": {"net": {"local_ts": ES_NET, "remote_ts": SS_NET, "esp_proposals": ["aes256gcm16"]}},
    }
    for k, v in over.items():
        if k.startswith("child_"):
            d["children"]["net"][k[6:]] = v
        else:
            d[k] = v
    return d


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("kxs-ss")
    es = Site("kxs-es", 13, ES_IP, ES_INNER, base / "es")
    sh("ip", "netns", "del", NS_SS, check=False)
    es.create_netns()
    sh("ip", "netns", "add", NS_SS)
    nsx(NS_SS, "ip", "link", "set", "lo", "up")
    nsx(NS_SS, "ip", "addr", "add", f"{SS_INNER}/32", "dev", "lo")
    sh("ip", "link", "add", "kxsss0", "netns", NS_SS, "type", "veth", "peer", "name", "kxses0", "netns", es.ns)
    nsx(NS_SS, "ip", "addr", "add", f"{SS_IP}/24", "dev", "kxsss0")
    nsx(es.ns, "ip", "addr", "add", f"{ES_IP}/24", "dev", "kxses0")
    nsx(NS_SS, "ip", "link", "set", "kxsss0", "up")
    nsx(es.ns, "ip", "link", "set", "kxses0", "up")
    charon = ix.Charon(base / "charon", ns=NS_SS)
    events: EventLog | None = None
    try:
        charon.start(log_level=1)
        es.start_dataplane()
        nsx(es.ns, "ip", "route", "add", SS_NET, "dev", "esp0", "src", ES_INNER)
        es.start_keyexchange()
        events = EventLog(es)
        yield Env(charon, es, events)
    finally:
        if events is not None:
            events.close()
        es.stop()
        charon.stop()
        sh("ip", "netns", "del", NS_SS, check=False)
        es.delete_netns()


def reset(e: Env, ss: str, es: dict[str, Any], secrets: str = PSK_SECRETS) -> None:
    """Both sides without SAs, then the given configurations loaded."""
    if e.charon.proc is None or e.charon.proc.poll() is not None:
        e.charon.start(log_level=1)
    for c in e.es.kx_stub().ListConnections(kx.ListConnectionsRequest()).connections:
        e.es.kx_stub().UnloadConnection(kx.UnloadConnectionRequest(name=c.name))
    e.charon.clear_sas()
    wait_until(lambda: not e.es.sas(), timeout=10, what="no Esplanade SAs")
    wait_until(lambda: not e.es.store_range(schema.prefix("sas", "child")), timeout=10, what="no records")
    e.charon.load(ss, secrets)
    e.es.load("pair", es)
    e.events.events.clear()


def up(e: Env, esplanade_initiates: bool) -> kx.IkeSaInfo:
    if esplanade_initiates:
        e.es.kx_stub().Initiate(kx.InitiateRequest(connection="pair"))
    else:
        e.charon.swanctl("--initiate", "--ike", "pair", "--child", "net", "--timeout", "15")
    sas = wait_until(lambda: e.es.established("pair"), timeout=20, what="Esplanade SA up")
    wait_until(lambda: "INSTALLED" in e.charon.swanctl("--list-sas"), timeout=10, what="strongSwan child up")
    return sas[0]


def ping(ns: str, src: str, dst: str, count: int = 3) -> bool:
    r = nsx(ns, "ping", "-c", str(count), "-i", "0.2", "-W", "2", "-I", src, dst, check=False, timeout=30)
    return r.returncode == 0


def dataplane_sas(site: Site) -> list[str]:
    """Child SAs the dataplane reports counters for, i.e. has installed."""
    reply = site.dp_stub().GetCounters(dp.GetCountersRequest(), timeout=5)
    return sorted({c.child_sa for c in reply.sas})


def ss_counters(charon: ix.Charon) -> tuple[int, int]:
    raw = charon.swanctl("--list-sas", "--raw")
    bytes_in = sum(int(x) for x in re.findall(r"bytes-in=(\d+)", raw))
    bytes_out = sum(int(x) for x in re.findall(r"bytes-out=(\d+)", raw))
    return bytes_in, bytes_out


@pytest.mark.parametrize("suite", list(PROPOSALS))
def test_psk_esplanade_initiator_proposals(env: Env, suite: str) -> None:
    ike, esp = PROPOSALS[suite]
    reset(env, ss_conn(proposals=ike, esp=esp), es_conn(proposals=[ike], child_esp_proposals=[esp]))
    sa = up(env, esplanade_initiates=True)
    assert sa.initiator and sa.nat_remote
    assert ping(env.es.ns, ES_INNER, SS_INNER) and ping(NS_SS, SS_INNER, ES_INNER)
    assert tcp_echo(env.es.ns, ES_INNER, NS_SS, SS_INNER, 100_000)
    assert tcp_echo(NS_SS, SS_INNER, env.es.ns, ES_INNER, 100_000, port=7778)
    child = env.es.established("pair")[0].children[0]
    expected = {"gcm-ecp256": "aes_gcm_16", "cbc-modp2048": "aes_cbc", "chacha-x25519": "chacha20_poly1305"}[suite]
    assert child.encr.lower().startswith(expected.split("_")[0]), child.encr
    # counters on both sides agree (Esplanade: GetCounters via ListSas; strongSwan: --raw)
    es_child = wait_until(lambda: env.es.established("pair")[0].children[0], timeout=5)
    ss_in, ss_out = ss_counters(env.charon)
    for ours, theirs in ((es_child.bytes_out, ss_in), (es_child.bytes_in, ss_out)):
        assert theirs > 100_000 and abs(ours - theirs) <= 0.05 * theirs + 2000, (ours, theirs)


def test_psk_esplanade_responder(env: Env) -> None:
    reset(env, ss_conn(), es_conn())
    sa = up(env, esplanade_initiates=False)
    assert not sa.initiator
    assert ping(NS_SS, SS_INNER, ES_INNER) and ping(env.es.ns, ES_INNER, SS_INNER)
    assert tcp_echo(NS_SS, SS_INNER, env.es.ns, ES_INNER, 100_000)
    assert env.events.of("ike_up") and env.events.of("child_up")


@pytest.mark.parametrize(("kind", "esplanade_initiates"), [("ecdsa", True), ("rsa", False), ("ecdsa", False)])
def test_certificates(env: Env, kind: str, esplanade_initiates: bool) -> None:
    from tests.keyexchange import pki

    ca = pki.make_ca(kind)
    ss, es = pki.issue(ca, SS_ID, kind), pki.issue(ca, ES_ID, kind)
    base = env.charon.base
    for d in ("x509", "x509ca", "private"):
        for f in (base / d).iterdir():
            f.unlink()
    (base / "x509ca" / "ca.crt").write_bytes(ca.cert_pem())
    (base / "x509" / "a.crt").write_bytes(ss.cert_pem())
    (base / "private" / "a.key").write_bytes(ss.key_pem())
    cfg = es_conn(
        local={"auth": "pubkey", "id": ES_ID, "certs": [es.cert_pem().decode()], "private_key": es.key_pem().decode()},
        remote={"auth": "pubkey", "id": SS_ID},
        cacerts=[ca.cert_pem().decode()],
    )
    del cfg["psk"]
    reset(env, ss_conn(auth="pubkey", cert="a.crt"), cfg, secrets="")
    sa = up(env, esplanade_initiates)
    assert sa.remote_id == SS_ID
    assert ping(env.es.ns, ES_INNER, SS_INNER) and ping(NS_SS, SS_INNER, ES_INNER)
    assert es.key_pem().decode() not in env.es.logs()


def _pinger(ns: str, src: str, dst: str, count: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, "ping", "-c", str(count), "-i", "0.05", "-W", "1", "-I", src, dst],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _lost(p: subprocess.Popen[str]) -> tuple[int, int]:
    out, _ = p.communicate(timeout=60)
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert m, out
    seqs = {int(x) for x in re.findall(r"icmp_seq=(\d+)", out)}
    missing = sorted(set(range(1, int(m.group(1)) + 1)) - seqs)
    if missing:
        print("missing icmp_seq", missing, out)  # shown on failure
    return int(m.group(1)) - int(m.group(2)), int(m.group(1))


def test_rekeys_by_either_side_under_traffic(env: Env) -> None:
    reset(env, ss_conn(), es_conn())
    up(env, esplanade_initiates=True)
    es = env.es
    for who, what in (("es", "child"), ("ss", "child"), ("es", "ike"), ("ss", "ike")):
        sa = es.established("pair")[0]
        before = (sa.id, sa.children[0].id)
        drops_before = es.drops()
        pinger = _pinger(es.ns, ES_INNER, SS_INNER, 40)
        wait_until(lambda: es.established("pair")[0].children[0].packets_out > 0, timeout=5)
        if who == "es":
            req = kx.RekeyRequest(child_sa=before[1]) if what == "child" else kx.RekeyRequest(ike_sa=before[0])
            es.kx_stub().Rekey(req)
        else:
            env.charon.swanctl(
                "--rekey", "--child" if what == "child" else "--ike", "net" if what == "child" else "pair"
            )

        def changed(before: tuple[str, str] = before, what: str = what) -> bool:
            sas = es.established("pair")
            if len(sas) != 1 or len(sas[0].children) != 1:
                return False
            return (sas[0].id if what == "ike" else sas[0].children[0].id) != before[0 if what == "ike" else 1]

        wait_until(changed, timeout=10, what=f"{what} rekey by {who}")
        lost, sent = _lost(pinger)
        assert lost == 0, f"{lost} of {sent} pings lost across the {what} rekey by {who}: {drops_before} {es.drops()}"
    assert len(env.events.of("child_rekeyed")) == 2 and len(env.events.of("ike_rekeyed")) >= 1
    live = {c.id for sa in es.established("pair") for c in sa.children}
    wait_until(lambda: set(es.store_range(schema.prefix("sas", "child"))) == live, timeout=10, what="old records gone")


@pytest.mark.parametrize("closer", ["es", "ss"])
def test_delete_from_either_side(env: Env, closer: str) -> None:
    reset(env, ss_conn(), es_conn())
    up(env, esplanade_initiates=True)
    if closer == "es":
        assert env.es.kx_stub().Terminate(kx.TerminateRequest(connection="pair")).terminated == 1
    else:
        env.charon.swanctl("--terminate", "--ike", "pair", "--timeout", "5")
    wait_until(lambda: not env.es.sas(), timeout=10, what="Esplanade SAs gone")
    wait_until(lambda: "pair:" not in env.charon.swanctl("--list-sas", check=False), timeout=10)
    wait_until(lambda: not env.es.store_range(schema.prefix("sas", "child")), timeout=10, what="records gone")
    assert not env.es.store_range(schema.prefix("spd"))
    wait_until(lambda: not dataplane_sas(env.es), timeout=10, what="the dataplane's SAs gone")
    assert not ping(env.es.ns, ES_INNER, SS_INNER, 1)


def test_no_proposal_chosen_is_reported(env: Env) -> None:
    reset(env, ss_conn(proposals="aes128-sha256-modp3072"), es_conn())
    env.es.kx_stub().Initiate(kx.InitiateRequest(connection="pair"))
    ev = wait_until(lambda: env.events.of("negotiation_failed"), timeout=10, what="negotiation_failed")[0]
    assert ev.notify == "NO_PROPOSAL_CHOSEN" and ev.connection == "pair" and ev.reason, ev
    assert "NO_PROPOSAL_CHOSEN" in env.es.kx_log.read_text()
    # and as responder: our reason names what we would have accepted
    env.events.events.clear()
    env.charon.swanctl("--initiate", "--ike", "pair", "--child", "net", "--timeout", "5", check=False)
    ev = wait_until(lambda: env.events.of("negotiation_failed"), timeout=10, what="responder failure")[0]
    assert ev.notify == "NO_PROPOSAL_CHOSEN" and "proposal" in ev.reason.lower(), ev
    assert not env.es.sas()


def test_bad_psk_is_authentication_failed_and_leaves_nothing(env: Env) -> None:
    reset(env, ss_conn(), es_conn(psk="not-the-right-psk-0123456789abcdef"))
    env.es.kx_stub().Initiate(kx.InitiateRequest(connection="pair"))
    ev = wait_until(lambda: env.events.of("auth_failed"), timeout=10, what="auth_failed")[0]
    assert ev.notify == "AUTHENTICATION_FAILED"
    wait_until(lambda: not env.es.sas(), timeout=10)
    assert not env.es.store_range(schema.prefix("sas", "child"))
    assert not env.es.store_range(schema.prefix("spd"))
    assert not dataplane_sas(env.es)
    assert "not-the-right-psk" not in env.es.logs()
    assert PSK not in env.es.logs()


def test_strongswan_cookie_honoured(env: Env) -> None:
    """charon demands COOKIEs above 3 half-open IKE SAs from one address: the service answers them."""
    import random
    import socket

    from esplanade.keyexchange.config import ConnectionConfig
    from esplanade.keyexchange.ikev2.dispatcher import IkeDispatcher

    reset(env, ss_conn(), es_conn())
    fake = IkeDispatcher([ConnectionConfig.from_dict("pair", es_conn())], rng=random.Random(3))
    for port in (5001, 5002, 5003):
        fake.initiate("pair", 0.0, local=(ES_IP, port))
    script = "; ".join(
        f"s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('{d.local[0]}', {d.local[1]}));"
        f" s.sendto(bytes.fromhex('{d.data.hex()}'), ('{d.remote[0]}', {d.remote[1]}))"
        for d in fake.datagrams_to_send()
    )
    nsx(env.es.ns, "python3", "-c", f"import socket; {script}")
    wait_until(lambda: env.charon.swanctl("--list-sas", check=False).count("CONNECTING") >= 3, timeout=5)
    _ = socket
    up(env, esplanade_initiates=True)
    assert ping(env.es.ns, ES_INNER, SS_INNER, 2)


def test_pq_initiator_falls_back_to_classic(env: Env) -> None:
    reset(env, ss_conn(), es_conn(proposals=["aes256gcm16-prfsha256-ecp256-ke1_mlkem768"]))
    sa = up(env, esplanade_initiates=True)
    assert sa.ke == "ecp_256" or "256" in sa.ke, sa.ke
    assert not sa.additional_ke
    assert ping(NS_SS, SS_INNER, ES_INNER, 2)


def test_dpd_notices_a_killed_peer(env: Env) -> None:
    reset(
        env,
        ss_conn(),
        es_conn(dpd_delay="1s", retransmit={"timeout": 0.5, "base": 1.4, "tries": 2}),
    )
    up(env, esplanade_initiates=True)
    assert env.charon.proc is not None
    # kill charon outright (no DELETE): `ip netns exec` runs sh, which execs charon
    env.charon.proc.send_signal(signal.SIGKILL)
    env.charon.proc.wait(5)
    ev = wait_until(lambda: env.events.of("ike_down"), timeout=20, what="DPD declares the peer dead")[0]
    assert "dead peer" in ev.reason or "did not answer" in ev.reason, ev
    wait_until(lambda: not env.es.store_range(schema.prefix("sas", "child")), timeout=10, what="SAs removed")
    env.charon.stop()
    Path(env.charon.base / "run" / "charon.pid").unlink(missing_ok=True)


def test_grpc_errors(env: Env) -> None:
    with pytest.raises(grpc.RpcError) as info:
        env.es.kx_stub().Terminate(kx.TerminateRequest(ike_sa="nosuch"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
