"""Two Esplanade sites (keyexchange + dataplane processes each, embedded store each) in netns."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from esplanade.store import schema
from esplanade.v1 import keyexchange_pb2 as kx
from tests.conditions import wait_until
from tests.keyexchange.service.sites import Site, link_sites, nsx, struct

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
    assert sa.initiator and sa.encr
    wait_until(lambda: a.established("ab")[0].children[0].packets_out >= 3, timeout=5, what="counters")
    assert child.local_ts == [NET1] and child.remote_ts == [NET2]
    # the key handoff in the store: sealed record, SPD entries, SPI reservation
    raw = Path(a.store_path).read_bytes()
    assert PSK.encode() not in raw
    assert PSK not in a.logs() and PSK not in b.logs()


def _unload_all(*sites: Site) -> None:
    for s in sites:
        for c in s.kx_stub().ListConnections(kx.ListConnectionsRequest()).connections:
            s.kx_stub().UnloadConnection(kx.UnloadConnectionRequest(name=c.name))
    for s in sites:
        wait_until(lambda s=s: not s.sas(), timeout=15, what=f"{s.ns}: no SAs left")
        wait_until(lambda s=s: not s.store_range(schema.prefix("sas", "child")), timeout=10, what="records gone")


def _up(a: Site, b: Site, name: str, ca: dict[str, Any], cb: dict[str, Any]) -> None:
    b.load(name, cb)
    a.load(name, ca)
    a.kx_stub().Initiate(kx.InitiateRequest(connection=name))
    wait_until(lambda: a.established(name) and b.established(name), timeout=20, what="SAs up on both sites")


def test_store_holds_the_handoff(sites: tuple[Site, Site]) -> None:
    a, b = sites
    _unload_all(a, b)
    _up(a, b, "ab", conn(a, b, NET1, NET2), conn(b, a, NET2, NET1))
    child = a.established("ab")[0].children[0]
    records = a.store_range(schema.prefix("sas", "child"))
    assert list(records) == [child.id]
    doc = json.loads(records[child.id])
    assert doc["inbound"]["spi"] == child.spi_in and doc["outbound"]["spi"] == child.spi_out
    assert doc["inbound"]["encr_key"].startswith("sealed:v1:")
    spd = {k: json.loads(v) for k, v in a.store_range(schema.prefix("spd")).items()}
    assert sorted(p["direction"] for p in spd.values()) == ["fwd", "in", "out"]
    assert {p["child_sa"] for p in spd.values()} == {child.id}
    assert all(k.startswith("ab.net.0-") for k in spd)
    assert all(p["reqid"] == doc["inbound"]["reqid"] != 0 for p in spd.values())
    spis = {k: json.loads(v) for k, v in a.store_range(schema.prefix("spi")).items()}
    assert spis[f"{child.spi_in:08x}"]["child_sa"] == child.id
    assert a.store_range(schema.prefix("dataplane", "acks", child.id))
    # the responder too (its record was written before its IKE_AUTH response left)
    b_child = b.established("ab")[0].children[0]
    assert list(b.store_range(schema.prefix("sas", "child"))) == [b_child.id]


def test_load_connection_validation_and_listing(sites: tuple[Site, Site]) -> None:
    a, _b = sites
    bad = conn(a, a, NET1, NET2, proposals=["aes256gcm16-prfsha256-nosuchgroup"])
    with pytest.raises(grpc.RpcError) as info:
        a.load("bad", bad)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "connections.bad.proposals" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        a.load("bad", {**conn(a, a, NET1, NET2), "rekey_time": "soon"})
    assert "connections.bad.rekey_time" in (info.value.details() or "")
    assert not a.store_range(schema.connection("bad"))
    listed = {c.name: c for c in a.kx_stub().ListConnections(kx.ListConnectionsRequest()).connections}
    assert "psk" not in dict(listed["ab"].config)
    assert PSK not in str(listed["ab"])
    with pytest.raises(grpc.RpcError) as info:
        a.kx_stub().Initiate(kx.InitiateRequest(connection="nosuch"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def _validates(site: Site, request: kx.LoadConnectionRequest) -> bool:
    try:
        site.kx_stub().LoadConnection(request)
    except grpc.RpcError:
        return False
    return True


def _initiates(site: Site, connection: str) -> bool:
    try:
        site.kx_stub().Initiate(kx.InitiateRequest(connection=connection))
    except grpc.RpcError:
        return False
    return True


def _ping_stream(site: Site, dst: str, count: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            site.ns,
            "ping",
            "-D",
            "-c",
            str(count),
            "-i",
            "0.05",
            "-W",
            "1",
            "-I",
            site.inner_ip,
            dst,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _lost(p: subprocess.Popen[str]) -> str:
    out, _ = p.communicate(timeout=60)
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert m, out
    lost = int(m.group(1)) - int(m.group(2))
    if lost:
        seqs = {int(x) for x in re.findall(r"icmp_seq=(\d+)", out)}
        print("missing icmp_seq", sorted(set(range(1, int(m.group(1)) + 1)) - seqs))  # shown on failure
        print(out)
    return f"{lost} of {m.group(1)} lost"


def test_child_rekey_either_side_under_traffic(sites: tuple[Site, Site]) -> None:
    a, b = sites
    if not a.established("ab"):
        _up(a, b, "ab", conn(a, b, NET1, NET2), conn(b, a, NET2, NET1))
    for rekeyer in (a, b, a):
        drops_before = (a.drops(), b.drops())
        old = rekeyer.established("ab")[0].children[0].id
        pinger = _ping_stream(a, b.inner_ip, 40)
        wait_until(lambda: a.established("ab")[0].children[0].packets_out > 0, timeout=5, what="traffic flowing")
        rekeyer.kx_stub().Rekey(kx.RekeyRequest(child_sa=old))
        wait_until(
            lambda rk=rekeyer, old=old: [c.id for sa in rk.established("ab") for c in sa.children] not in ([old], []),
            timeout=10,
            what="child rekeyed",
        )
        assert _lost(pinger) == "0 of 40 lost", (rekeyer.ns, drops_before, a.drops(), b.drops())
    for s in (a, b):
        live = {c.id for sa in s.established("ab") for c in sa.children}
        wait_until(lambda s=s, live=live: set(s.store_range(schema.prefix("sas", "child"))) == live, timeout=10)
        spd = {json.loads(v)["child_sa"] for v in s.store_range(schema.prefix("spd")).values()}
        assert spd == live


def test_ike_rekey_either_side_under_traffic(sites: tuple[Site, Site]) -> None:
    a, b = sites
    if not a.established("ab"):
        _up(a, b, "ab", conn(a, b, NET1, NET2), conn(b, a, NET2, NET1))
    for rekeyer in (a, b):
        old = rekeyer.established("ab")[0].id
        pinger = _ping_stream(b, a.inner_ip, 30)
        rekeyer.kx_stub().Rekey(kx.RekeyRequest(ike_sa=old))
        wait_until(lambda rk=rekeyer, old=old: [sa.id for sa in rk.established("ab")] not in ([old], []), timeout=10)
        assert _lost(pinger) == "0 of 30 lost"


def test_reauth_and_terminate_child_and_ike(sites: tuple[Site, Site]) -> None:
    a, b = sites
    if not a.established("ab"):
        _up(a, b, "ab", conn(a, b, NET1, NET2), conn(b, a, NET2, NET1))
    old = a.established("ab")[0]
    a.kx_stub().Rekey(kx.RekeyRequest(ike_sa=old.id, reauth=True))
    wait_until(lambda: [sa.id for sa in a.established("ab")] not in ([old.id], []), timeout=15, what="reauthenticated")
    wait_until(lambda: len(a.sas("ab")) == 1 and len(b.sas("ab")) == 1, timeout=10, what="old IKE SA gone")
    assert a.ping(b.inner_ip), (
        a.drops(),
        b.drops(),
        a.store_range(schema.prefix("spd")),
        b.store_range(schema.prefix("spd")),
    )
    sa = a.established("ab")[0]
    assert a.kx_stub().Terminate(kx.TerminateRequest(child_sa=sa.children[0].id)).terminated == 1
    wait_until(lambda: a.sas("ab") and not a.sas("ab")[0].children, timeout=10, what="child gone, IKE SA stays")
    wait_until(lambda: not b.store_range(schema.prefix("sas", "child")), timeout=10, what="peer's record gone")
    assert a.kx_stub().Terminate(kx.TerminateRequest(ike_sa=sa.id)).terminated == 1
    wait_until(lambda: not a.sas("ab") and not b.sas("ab"), timeout=10, what="IKE SA gone on both")


def test_terminate_from_either_side_clears_store(sites: tuple[Site, Site]) -> None:
    a, b = sites
    for closer, other in ((a, b), (b, a)):
        if not a.established("ab"):
            a.kx_stub().Initiate(kx.InitiateRequest(connection="ab"))
            wait_until(lambda: a.established("ab") and b.established("ab"), timeout=20)
        reply = closer.kx_stub().Terminate(kx.TerminateRequest(connection="ab"))
        assert reply.terminated == 1
        for s in (closer, other):
            wait_until(lambda s=s: not s.sas("ab"), timeout=10, what=f"{s.ns} SAs gone")
            wait_until(lambda s=s: not s.store_range(schema.prefix("sas", "child")), timeout=10, what="records gone")
            assert not s.store_range(schema.prefix("spd"))
            taken = [v for v in s.store_range(schema.prefix("spi")).values() if b"child_sa" in v]
            assert not taken
        assert not a.ping(b.inner_ip, count=1)


def test_ecdsa_certificates(sites: tuple[Site, Site]) -> None:
    from tests.keyexchange import pki

    a, b = sites
    _unload_all(a, b)
    ca = pki.make_ca("ecdsa")
    ia, ib = pki.issue(ca, "s1.kxs.test"), pki.issue(ca, "s2.kxs.test")

    def cert_conn(me: Site, peer: Site, mine: pki.Issued, peer_id: str, ln: str, rn: str) -> dict[str, Any]:
        d = conn(me, peer, ln, rn)
        del d["psk"]
        d["local"] = {
            "auth": "pubkey",
            "id": f"{me.ns[-2:]}.kxs.test",
            "certs": [mine.cert_pem().decode()],
            "private_key": mine.key_pem().decode(),
        }
        d["remote"] = {"auth": "pubkey", "id": peer_id}
        d["cacerts"] = [ca.cert_pem().decode()]
        return d

    # site a the way the REST API stores it: certificate and CA by id (config/certs, config/cas),
    # checked first with validate_only, then written to config/connections/cert directly
    a.store_put_document(schema.certificate("s1"), {"pem": ia.cert_pem().decode(), "private_key": ia.key_pem()})
    a.store_put_document(schema.ca("test-ca"), {"pem": ca.cert_pem().decode()})
    api_doc = conn(a, b, NET1, "dynamic")
    del api_doc["psk"]
    api_doc["children"]["net"]["remote_ts"] = [NET2]
    api_doc["children"]["net"]["local_ts"] = [NET1]
    api_doc["local"] = {"auth": "pubkey", "id": "s1.kxs.test", "certs": ["s1"]}
    api_doc["remote"] = {"auth": "pubkey", "id": "s2.kxs.test", "cacerts": ["test-ca"]}
    check = kx.LoadConnectionRequest(name="cert", config=struct(api_doc), validate_only=True)
    wait_until(lambda: _validates(a, check), timeout=10, what="certificate objects seen by keyexchange")
    bad = kx.LoadConnectionRequest(
        name="cert", config=struct({**api_doc, "remote": {"auth": "pubkey", "cacerts": ["nosuch"]}}), validate_only=True
    )
    with pytest.raises(grpc.RpcError) as info:
        a.kx_stub().LoadConnection(bad)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(info.value.trailing_metadata() or ())["esplanade-field"] == "connections.cert.cacerts"
    assert not a.store_range(schema.connection("cert"))  # validate_only writes nothing
    b.load("cert", cert_conn(b, a, ib, "s1.kxs.test", NET2, NET1))
    a.store_put_document(schema.connection("cert"), api_doc)
    # the instance picks the document up from its watch: Initiate works once it has
    wait_until(lambda: _initiates(a, "cert"), timeout=10, what="connection applied from the store")
    wait_until(lambda: a.established("cert") and b.established("cert"), timeout=20, what="certificate SAs up")
    assert a.established("cert")[0].remote_id == "s2.kxs.test"
    assert a.ping(b.inner_ip) and b.ping(a.inner_ip)
    stored = b.store_range(schema.connection("cert"))
    assert b"PRIVATE KEY" not in next(iter(stored.values()))
    assert b"PRIVATE KEY" not in next(iter(a.store_range(schema.certificate("s1")).values()))
    assert ia.key_pem().decode() not in a.logs()
    listed = {c.name: c for c in b.kx_stub().ListConnections(kx.ListConnectionsRequest()).connections}
    assert "private_key" not in dict(listed["cert"].config["local"])
    _unload_all(a, b)


def test_restart_recovers_connections_and_keeps_forwarding(sites: tuple[Site, Site]) -> None:
    a, b = sites
    _unload_all(a, b)
    b.load("ab", conn(b, a, NET2, NET1))
    start = {"net": {"local_ts": NET1, "remote_ts": NET2, "start_action": "start"}}
    a.load("ab", conn(a, b, NET1, NET2, children=start))
    wait_until(lambda: a.established("ab") and b.established("ab"), timeout=20)
    old_child = a.established("ab")[0].children[0].id
    a.kill_keyexchange()
    # the dataplane keeps the Child SA: traffic still flows without keyexchange
    assert a.ping(b.inner_ip, count=3)
    assert old_child in a.store_range(schema.prefix("sas", "child"))
    a.start_keyexchange()
    names = [c.name for c in a.kx_stub().ListConnections(kx.ListConnectionsRequest()).connections]
    assert names == ["ab"]
    wait_until(lambda: a.established("ab"), timeout=20, what="start_action=start after the restart")
    new_child = a.established("ab")[0].children[0].id
    assert new_child != old_child
    # the new Child SA took the SPD entries over; the peer replaced its old IKE SA (INITIAL_CONTACT)
    wait_until(
        lambda: {json.loads(v)["child_sa"] for v in a.store_range(schema.prefix("spd")).values()} == {new_child},
        timeout=10,
    )
    # the orphaned record of the killed instance went in the same transaction
    assert old_child not in a.store_range(schema.prefix("sas", "child"))
    wait_until(lambda: len(b.sas("ab")) == 1, timeout=10, what="peer dropped the old IKE SA")
    assert a.ping(b.inner_ip) and b.ping(a.inner_ip)
    _unload_all(a, b)


def test_start_action_trap_negotiates_on_traffic(sites: tuple[Site, Site]) -> None:
    a, b = sites
    _unload_all(a, b)
    b.load("ab", conn(b, a, NET2, NET1))
    trap = {"net": {"local_ts": NET1, "remote_ts": NET2, "start_action": "trap"}}
    a.load("ab", conn(a, b, NET1, NET2, children=trap))
    spd = {k: json.loads(v) for k, v in a.store_range(schema.prefix("spd")).items()}
    assert list(spd) == ["ab.net.trap0.out"] and spd["ab.net.trap0.out"]["trap"] is True
    assert not a.sas()
    # traffic hits the trap entry: the dataplane reports an acquire, keyexchange initiates
    # (the dataplane repeats an acquire at most every few seconds while traffic keeps coming)
    wait_until(
        lambda: a.ping(b.inner_ip, count=1) and a.established("ab") and b.established("ab"),
        timeout=30,
        interval=0.5,
        what="SA negotiated on acquire",
    )
    assert a.ping(b.inner_ip)
    # the trap entry stays (lower priority) for when the SA goes; unloading removes it
    assert "ab.net.trap0.out" in a.store_range(schema.prefix("spd"))
    _unload_all(a, b)
    assert not a.store_range(schema.prefix("spd"))
