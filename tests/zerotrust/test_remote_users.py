"""Acceptance (issue #6): strongSwan remote users in two groups through an Esplanade gateway
(policy + keyexchange + dataplane services, real netns, UDP, TUN). Each user gets a virtual IP and
only the routes of what its group may reach (exact narrowing); through a coarsely narrowed
connection a real client's traffic outside its grant reaches the gateway and is dropped and logged
with its 5-tuple; revoking a rule cuts a live TCP session within a second, with an audit record; a
dial-out-only connector fronts a resource and answers nothing from outside."""

from __future__ import annotations

import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from esplanade.journal.audit import AuditLog
from tests.conditions import wait_until
from tests.keyexchange.esp_tunnel import EspState
from tests.keyexchange.service.sites import DP_PORT, KX_PORT, nsx
from tests.zerotrust.gateway import (
    APP,
    APP_NS,
    CONNECTOR_WAN,
    CRM,
    EDGE_NET,
    GW_WAN,
    PRIVATE,
    WEB,
    Bed,
    Gateway,
    Listener,
    StampedServer,
    decision_lines,
    gateway_record,
    ike_sa_init,
    nft_tables,
    send_esp,
    stamped_sender,
    tcp_reaches,
    tcp_syn,
    udp_answered,
    zero_trust_bed,
)

pytestmark = [pytest.mark.netns, pytest.mark.strongswan]


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    with zero_trust_bed(tmp_path_factory.mktemp("zt")) as opened:
        yield opened


def test_each_user_gets_a_virtual_ip_and_only_its_routes(bed: Bed) -> None:
    alice_ip, bob_ip = bed.alice.virtual_ip(), bed.bob.virtual_ip()
    assert alice_ip != bob_ip
    # narrowed by the gateway to the identity's compiled selectors (the client asked for 10.60.0.0/16)
    alice_sas, bob_sas = bed.alice.sas(), bed.bob.sas()
    assert f"{WEB}/32[tcp/8443]" in alice_sas and f"{APP}/32[tcp/17000]" in alice_sas
    assert f"{CRM}/32[tcp/9000]" in bob_sas
    for wide in ("10.60.0.0/16", EDGE_NET):
        assert wide not in alice_sas and wide not in bob_sas
    assert bed.alice.tunnel_routes() == [WEB, APP]
    assert bed.bob.tunnel_routes() == [CRM]
    # the configuration reply: the virtual IP and one INTERNAL_IP4_SUBNET per granted route
    assert "CPRP(ADDR SUBNET SUBNET)" in bed.alice.charon.log_text()
    assert "CPRP(ADDR SUBNET)" in bed.bob.charon.log_text()
    connects = decision_lines(bed.gw.kx_log, "connect allow")
    assert any(" alice " in line and "eng-app,eng-web" in line for line in connects), connects
    assert any(" bob " in line and "sales-crm" in line for line in connects), connects


def test_a_user_granted_nothing_is_refused_at_setup_and_the_denial_logged(bed: Bed) -> None:
    assert "INSTALLED" not in bed.carol.sas()  # no Child SA: the gateway answered TS_UNACCEPTABLE
    assert "TS_UNACCEPTABLE" in bed.carol.charon.log_text()
    denied = decision_lines(bed.gw.kx_log, "connect deny carol")
    assert denied and "policy grants identity 'carol' nothing" in denied[0], denied


def test_allowed_tcp_works_and_the_other_group_gets_a_different_set(bed: Bed) -> None:
    alice_ip, bob_ip = bed.alice.virtual_ip(), bed.bob.virtual_ip()
    web, crm = Listener(WEB, 8443), Listener(CRM, 9000)
    other_port, neighbour = Listener(WEB, 9000), Listener(CRM, 8443)
    try:
        assert tcp_reaches(bed.alice, alice_ip, WEB, 8443)
        assert tcp_reaches(bed.bob, bob_ip, CRM, 9000)
        assert not tcp_reaches(bed.alice, alice_ip, WEB, 9000)  # same host, other port
        assert not tcp_reaches(bed.alice, alice_ip, CRM, 8443)  # neighbouring host
        assert not tcp_reaches(bed.bob, bob_ip, WEB, 8443)  # alice's resource
    finally:
        for listener in (web, crm, other_port, neighbour):
            listener.stop()


def test_coarse_narrowing_sends_a_real_clients_denied_flows_to_the_gateways_filter(bed: Bed) -> None:
    """dave (eng, like alice) connects through `rw-coarse` (`access_narrowing: networks`): his SA
    and routes cover the site networks, so the real strongSwan client sends every flow toward them
    through the tunnel; the gateway's per-identity filter passes only web:8443 and drops the rest,
    counted as identity-filter drops and logged with dave's identity and each flow's 5-tuple."""
    gw, dave = bed.gw, bed.dave
    dave_ip = dave.virtual_ip()
    sas = dave.sas()
    assert PRIVATE in sas and EDGE_NET in sas and "[tcp/" not in sas  # address-only
    assert dave.tunnel_routes() == sorted([PRIVATE, EDGE_NET])
    connects = decision_lines(gw.kx_log, "connect allow dave")
    assert connects and f"selectors {PRIVATE} {EDGE_NET}" in connects[-1], connects
    listeners = [Listener(WEB, 8443), Listener(WEB, 9000), Listener(CRM, 8443)]
    try:
        before = gw.drops().get("identity_filter", 0)
        assert tcp_reaches(dave, dave_ip, WEB, 8443)
        assert not tcp_reaches(dave, dave_ip, WEB, 9000, sport=41001)  # same host, another port
        assert not tcp_reaches(dave, dave_ip, CRM, 8443, sport=41002)  # the neighbour, listening too
    finally:
        for listener in listeners:
            listener.stop()
    wait_until(lambda: gw.drops().get("identity_filter", 0) >= before + 2, timeout=10, what="identity-filter drops")
    for flow in (f"tcp {dave_ip}:41001 -> {WEB}:9000", f"tcp {dave_ip}:41002 -> {CRM}:8443"):
        wait_until(
            partial(logged, gw.dp_log, "drop deny dave", flow, "identity filter"),
            timeout=15,  # the first line of a flow comes at once, later ones per 10 s interval
            what=f"dave's drop of {flow} in the decision log",
        )


def logged(path: Path, kind: str, *needles: str) -> list[str]:
    """Decision-log lines of `kind` holding every needle."""
    return [line for line in decision_lines(path, kind) if all(n in line for n in needles)]


def test_revoking_the_rule_cuts_the_live_session_within_a_second(bed: Bed) -> None:
    gw = bed.gw
    alice_ip = bed.alice.virtual_ip()
    server = StampedServer(WEB, 8443, bed.base / "server.log")
    sender = stamped_sender(bed.alice, alice_ip, WEB, 8443, 6.0, bed.base / "sender.log")
    try:
        wait_until(lambda: len(server.lines()) >= 20, timeout=10, what="the live session carries data")
        removed_at = time.time()
        gw.delete_rule("eng-web")
        sender.wait(20)
        sent = [line.split() for line in (bed.base / "sender.log").read_text().splitlines()]
        assert float(sent[-1][1]) > removed_at + 2.0, "the client kept writing after the removal"
        received = server.lines()
        late = [(seq, at) for _, seq, at in received if at > removed_at + 1.0]
        assert not late, f"bytes sent {late[0][1] - removed_at:.3f}s after the removal reached the server"
        assert any(at < removed_at for _, _, at in received)
        audit = AuditLog(gw.audit_path)
        try:
            records = audit.query().records
        finally:
            audit.close()
        removal = [r for r in records if r.get("target") == "rules/eng-web" and r.get("action") == "policy.delete"]
        assert removal and removal[-1]["actor"] == "security-team" and removal[-1]["before"]["groups"] == ["eng"]
        assert gw.drops().get("identity_filter", 0) > 0
        wait_until(
            lambda: [line for line in decision_lines(gw.dp_log, "drop deny alice tcp") if f"-> {WEB}:8443" in line],
            timeout=15,
            what="the cut session's drops logged",
        )
        crm = Listener(CRM, 9000)
        try:
            assert tcp_reaches(bed.bob, bed.bob.virtual_ip(), CRM, 9000)  # bob's access is untouched
        finally:
            crm.stop()
    finally:
        sender.kill()
        server.stop()
        gw.put_rule({"id": "eng-web", "groups": ["eng"], "resources": ["web"]})


def test_a_connector_fronts_a_resource_and_accepts_no_inbound_connection(bed: Bed) -> None:
    """The connector runs with `site.inbound: dial-out-only` (no firewall of the test's own): its
    dataplane owns the nftables table, its keyexchange only initiates. From the gateway's and a
    user's namespace no TCP connection to it succeeds and no UDP datagram (IKE_SA_INIT to 500 and
    4500, or to a closed port) gets any answer, while the allowed user reaches the resource behind it."""
    gw, connector = bed.gw, bed.connector
    assert connector is not None
    assert "table inet esplanade_dial_out" in nft_tables(connector.ns)
    assert nft_tables(connector.ns).count("table") == 1  # the product's table, nothing the test installed
    # the connector dialled out: it is the IKE initiator of its uplink, the gateway the responder
    assert connector.established("uplink")[0].initiator
    assert not gw.established("edge")[0].initiator
    app = Listener(APP, 17000, ns=APP_NS)
    try:
        assert tcp_reaches(bed.alice, bed.alice.virtual_ip(), APP, 17000)  # eng may reach it, through the connector
        assert not tcp_reaches(bed.bob, bed.bob.virtual_ip(), APP, 17000)  # sales may not
    finally:
        app.stop()
    # Nothing gets into the connector from outside, though it has listening sockets on every
    # address (its services' gRPC, and one more opened for this test) and its UDP 500/4500.
    exposed = Listener("0.0.0.0", 7001, ns=connector.ns)
    try:
        ports = listening_ports(connector.ns)
        assert {KX_PORT, DP_PORT, 7001} <= ports
        assert tcp_reaches(connector.ns, "", "127.0.0.1", 7001)  # the listener does accept, locally
        for where in (gw.ns, bed.alice.ns):
            for port in sorted(ports):
                assert not tcp_reaches(where, "", CONNECTOR_WAN, port, timeout=0.5), f"{where} -> connector:{port}"
        assert nsx(gw.ns, "ping", "-c", "1", "-W", "1", CONNECTOR_WAN, check=False).returncode != 0
    finally:
        exposed.stop()
    init = ike_sa_init(CONNECTOR_WAN)
    assert udp_answered(bed.alice.ns, GW_WAN, 500, ike_sa_init(GW_WAN))  # the probe works: the gateway answers
    for where in (gw.ns, bed.alice.ns):
        for port in (500, 4500):
            assert not udp_answered(where, CONNECTOR_WAN, port, init), f"{where} -> connector udp/{port}"
        assert not udp_answered(where, CONNECTOR_WAN, 9, b"x")  # a closed port: not even ICMP unreachable
    assert connector.established("uplink")  # the uplink it dialled is untouched


def listening_ports(ns: str) -> set[int]:
    out = nsx(ns, "ss", "-Htln").stdout
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if line.strip()}


def test_traffic_a_client_sends_outside_its_grant_is_dropped_and_logged(bed: Bed) -> None:
    """A client that sends through its tunnel what its SA's (exact) selectors do not cover (here:
    packets encrypted with alice's real SA keys toward the other port and the neighbouring host)
    has them dropped by the gateway's dataplane (policy_mismatch), counted, and logged as alice's
    drops with each flow's 5-tuple. Last in the module: the forged sequence numbers move the SA's
    replay window past the client's own."""
    gw = bed.gw
    record = gateway_record(gw, "alice@corp.test")
    before = gw.drops().get("policy_mismatch", 0) + gw.drops().get("identity_filter", 0)
    state = EspState(record.inbound)
    state.seq = 1_000_000
    alice_ip = bed.alice.virtual_ip()
    for sent, (dst, port) in enumerate(((WEB, 9000), (CRM, 8443)), start=1):
        # one at a time: the dataplane samples the last such packet per SA and drop poll
        send_esp(bed.alice, record, [state.encrypt(tcp_syn(alice_ip, dst, port), 4)])
        wait_until(partial(drops_at_least, gw, before + sent), timeout=5, what="gateway drops")
        flow = f"tcp {alice_ip}:40000 -> {dst}:{port}"
        wait_until(
            partial(logged, gw.dp_log, "drop deny alice", record.id, flow, "outside the Child SA's selectors"),
            timeout=15,
            what=f"alice's drop of {flow} in the decision log",
        )


def drops_at_least(gw: Gateway, count: int) -> bool:
    return gw.drops().get("policy_mismatch", 0) + gw.drops().get("identity_filter", 0) >= count
