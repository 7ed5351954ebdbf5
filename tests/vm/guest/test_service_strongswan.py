"""Esplanade's services on the kernel backend against strongSwan 5.9.8 on kernel-netlink.

What libipsec cannot show, with a real kernel ESP on both sides: ESN, transport mode, plain
ESP (protocol 50, no NAT-T), AH, a soft expire that ends in a rekey with the peer, an
ACQUIRE on a trap policy that initiates, an XFRM interface steered by a route, and the
dataplane restarting under traffic (kernel SAs adopted; a kernel that lost them gets them
back with sequence numbers that continue from the ledger).

One namespace holds an Esplanade site (keyexchange + dataplane processes, embedded store,
`dataplane.backend=kernel`), the other charon. One charon and one site serve the whole
module; each test loads its own configuration on both sides.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from esplanade.store import schema
from esplanade.v1 import dataplane_pb2 as dp
from esplanade.v1 import ipsec_pb2
from esplanade.v1 import keyexchange_pb2 as kx
from tests.conditions import ConditionTimeout, wait_until
from tests.keyexchange.service.sites import DP_PORT, EventLog, Site, nsx, sh
from tests.vm.guest.service_peers import (
    UP_TIMEOUT,
    Pinger,
    charon,
    diagnostics,
    kernel_site,
    oseq_of,
    ping,
    plain_netns,
    strongswan_conn,
    tcp_transfer,
    unload_all,
    veth,
    wait_clean,
    xfrm_spis,
    xfrm_states,
)

pytestmark = [pytest.mark.vm, pytest.mark.strongswan]

NS_SS, NS_ES = "kvm-ss", "kvm-es"
SS_IP, ES_IP = "198.18.21.1", "198.18.21.2"
SS_INNER, ES_INNER = "10.95.1.1", "10.95.2.1"
SS_NET, ES_NET = "10.95.1.0/24", "10.95.2.0/24"
SS_ID, ES_ID = "ss.kvm.test", "es.kvm.test"
PSK = "kvm-strongswan-psk-0123456789abcdef"
SECRETS = f"""
    ike-pair {{
        id-a = {SS_ID}
        id-b = {ES_ID}
        secret = "{PSK}"
    }}"""
POLL = 0.3


class Env:
    def __init__(self, ss: Any, es: Site, events: EventLog) -> None:
        self.charon = ss
        self.es = es
        self.events = events


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("kvm-ss")
    es = kernel_site(NS_ES, 21, ES_IP, ES_INNER, base / "es")
    es.create_netns()
    plain_netns(NS_SS, SS_INNER)
    veth(NS_SS, "kvmss0", f"{SS_IP}/24", NS_ES, "kvmes0", f"{ES_IP}/24")
    # a gateway's default route: the XFRM policies pick what goes into the tunnel
    nsx(NS_ES, "ip", "route", "add", "default", "via", SS_IP)
    ss = charon(base / "charon", NS_SS)
    events: EventLog | None = None
    started = time.monotonic()
    try:
        # both services start at once: their imports alone take tens of seconds in the VM
        es.start_dataplane(wait=False)
        es.start_keyexchange(wait=False, ESPLANADE_KEYEXCHANGE__COUNTERS_INTERVAL_SECONDS="2")
        ss.start(log_level=1)
        es.wait_dataplane()
        es.wait_keyexchange()
        events = EventLog(es)
        print(f"[vm] site and charon up in {time.monotonic() - started:.1f}s")
        yield Env(ss, es, events)
    finally:
        if events is not None:
            events.close()
        es.stop()
        ss.stop()
        sh("ip", "netns", "del", NS_SS, check=False)
        es.delete_netns()


def es_conn(child: dict[str, Any] | None = None, **over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "local_addrs": [ES_IP],
        "remote_addrs": [SS_IP],
        "local": {"auth": "psk", "id": ES_ID},
        "remote": {"auth": "psk", "id": SS_ID},
        "psk": PSK,
        "proposals": ["aes256gcm16-prfsha256-ecp256"],
        "children": {"net": {"local_ts": ES_NET, "remote_ts": SS_NET, "esp_proposals": ["aes256gcm16"]}},
    }
    for k, v in (child or {}).items():
        if v is None:
            d["children"]["net"].pop(k, None)
        else:
            d["children"]["net"][k] = v
    d.update(over)
    return d


def ss_conn(**child: Any) -> str:
    return strongswan_conn(
        local_ip=SS_IP,
        remote_ip=ES_IP,
        local_ts=SS_NET,
        remote_ts=ES_NET,
        local_id=SS_ID,
        remote_id=ES_ID,
        child=child,
    )


def reset(e: Env, ss: str, es: dict[str, Any]) -> None:
    if e.charon.proc is None or e.charon.proc.poll() is not None:
        e.charon.start(log_level=1)
    unload_all(e.es)
    e.charon.clear_sas()
    wait_clean(e.es)
    e.charon.load(ss, SECRETS)
    e.es.load("pair", es)
    e.events.events.clear()


def up(e: Env, esplanade_initiates: bool = True) -> kx.IkeSaInfo:
    if esplanade_initiates:
        e.es.kx_stub().Initiate(kx.InitiateRequest(connection="pair"))
    else:
        e.charon.swanctl("--initiate", "--ike", "pair", "--child", "net", "--timeout", "60", timeout=90)
    sas = wait_until(lambda: e.es.established("pair"), timeout=UP_TIMEOUT, interval=POLL, what="Esplanade SA up")
    wait_until(
        lambda: "INSTALLED" in e.charon.swanctl("--list-sas"), timeout=30, interval=POLL, what="strongSwan child up"
    )
    return sas[0]


def our_states(e: Env) -> str:
    return "\n".join(xfrm_states(e.es.ns))


def explain(e: Env) -> str:
    return diagnostics(
        NS_ES,
        NS_SS,
        logs=e.es.logs(),
        charon_log=e.charon.log_text(),
        swanctl=e.charon.swanctl("--list-sas", check=False),
    )


def expect(e: Env, predicate: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    try:
        return wait_until(predicate, timeout=timeout, interval=POLL, what=what)
    except ConditionTimeout as exc:
        raise AssertionError(f"{exc}\n{explain(e)}") from None


# name: (strongSwan child settings, Esplanade child settings, what `ip xfrm state` must show,
#        ping/TCP between inner (tunnel) or outer (transport) addresses, Esplanade initiates)
SCENARIOS: dict[str, tuple[dict[str, Any], dict[str, Any], tuple[str, ...], bool]] = {
    "esn-tunnel-plain-esp": (
        {"esp_proposals": "aes256gcm16-esn"},
        {"esp_proposals": ["aes256gcm16-esn"]},
        ("proto esp", "mode tunnel", "esn", "aead rfc4106(gcm(aes))"),
        True,
    ),
    "transport-cbc-sha256": (
        {"esp_proposals": "aes128-sha256", "mode": "transport", "local_ts": SS_IP, "remote_ts": ES_IP},
        {"esp_proposals": ["aes128-sha256"], "mode": "transport", "local_ts": ES_IP, "remote_ts": SS_IP},
        ("proto esp", "mode transport", "enc cbc(aes)", "auth-trunc hmac(sha256)"),
        False,
    ),
    "ah-sha256-tunnel": (
        {"esp_proposals": None, "ah_proposals": "sha256"},
        {"esp_proposals": None, "ah_proposals": ["sha256"]},
        ("proto ah", "mode tunnel", "auth-trunc hmac(sha256)"),
        True,
    ),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_ping_tcp_and_kernel_state(env: Env, scenario: str) -> None:
    ss_child, es_child, expected, esplanade_initiates = SCENARIOS[scenario]
    reset(env, ss_conn(**ss_child), es_conn(es_child))
    up(env, esplanade_initiates)
    transport = es_child.get("mode") == "transport"
    (src, dst) = (ES_IP, SS_IP) if transport else (ES_INNER, SS_INNER)
    assert ping(NS_ES, src, dst) and ping(NS_SS, dst, src), explain(env)
    received = tcp_transfer(NS_ES, src, NS_SS, dst)
    states = xfrm_states(NS_ES)
    assert len(states) == 2, our_states(env)
    for block in states:
        for text in expected:
            assert text in block, f"{text!r} missing:\n{block}"
        assert "encap" not in block, f"plain ESP/AH expected, found UDP encapsulation:\n{block}"
    # the kernel's counters on our side and charon's agree that the transfer went through the SAs
    counters = env.es.dp_stub().GetCounters(dp.GetCountersRequest(), timeout=10)
    assert sum(c.bytes for c in counters.sas if c.direction == ipsec_pb2.DIRECTION_OUT) >= received
    assert "pair" in env.charon.swanctl("--list-sas")


def test_soft_expire_in_the_kernel_rekeys_with_the_peer(env: Env) -> None:
    """Tiny packet lifetimes on our side: XFRM_MSG_EXPIRE (soft) -> dataplane event ->
    keyexchange CREATE_CHILD_SA with charon -> new SAs in the kernel, the old ones deleted,
    and the pings never stop."""
    child = {"rekey_packets": 40, "life_packets": 100000}
    reset(env, ss_conn(), es_conn(child))
    first = up(env)
    old_spis = xfrm_spis(NS_ES)
    pinger = Pinger(NS_ES, ES_INNER, SS_INNER, count=80, interval=0.1)

    def rekeyed() -> bool:
        sas = env.es.established("pair")
        return bool(env.events.of("child_rekeyed")) and len(sas) == 1 and sas[0].children[0].id != first.children[0].id

    expect(env, rekeyed, "a Child SA rekey started by the soft expire")
    lost, sent, out = pinger.lost()
    assert lost <= 1, f"{lost} of {sent} pings lost across the rekey:\n{out}"
    new_spis = wait_until(lambda: (s := xfrm_spis(NS_ES)) and not (s & old_spis) and s, timeout=30, interval=POLL)
    assert len(new_spis) == 2, our_states(env)  # the old pair is gone from the kernel, the new one carries
    assert ping(NS_ES, ES_INNER, SS_INNER) and ping(NS_SS, SS_INNER, ES_INNER)
    # charon agrees: one Child SA, not the old one (gone once its DELETE exchange is done)
    expect(
        env,
        lambda: (
            (listed := env.charon.swanctl("--list-sas")).count("INSTALLED") == 1
            and not any(f"{spi:08x}" in listed for spi in old_spis)
        ),
        "charon down to the new Child SA",
        timeout=30,
    )
    rekey = env.events.of("child_rekeyed")[0]
    assert rekey.child_sa == first.children[0].id


def test_acquire_on_a_trap_policy_initiates(env: Env) -> None:
    reset(env, ss_conn(), es_conn({"start_action": "trap"}))
    trap = wait_until(
        lambda: [p for p in env.es.dp_stub().ListPolicies(dp.ListPoliciesRequest()).policies if "trap" in p.id],
        timeout=30,
        interval=POLL,
        what="the trap policy in the dataplane",
    )
    assert trap and not env.es.sas()
    ping(NS_ES, ES_INNER, SS_INNER, count=1)  # the first packet makes the kernel ACQUIRE
    sa = wait_until(lambda: env.es.established("pair"), timeout=UP_TIMEOUT, interval=POLL, what="SA on demand")[0]
    assert sa.initiator
    wait_until(lambda: ping(NS_ES, ES_INNER, SS_INNER, count=2), timeout=30, interval=1, what="traffic")
    assert ping(NS_SS, SS_INNER, ES_INNER)
    # the Child SA's entries took the trap's place in the kernel (one policy per selector)
    policies = env.es.dp_stub().ListPolicies(dp.ListPoliciesRequest()).policies
    assert any(p.child_sa == sa.children[0].id for p in policies), policies
    assert "already belongs" not in env.es.logs(), env.es.logs()[-3000:]


def test_xfrm_interface_carries_what_a_route_steers_into_it(env: Env) -> None:
    """Route-based VPN: our Child SA asks for 0.0.0.0/0 on interface id 42; only a route into
    the XFRM interface puts traffic into it (the default route alone sends it in the clear,
    and charon drops that)."""
    child = {"local_ts": "0.0.0.0/0", "remote_ts": "0.0.0.0/0", "if_id_in": 42, "if_id_out": 42}
    nsx(NS_ES, "ip", "link", "add", "kvmxfrm42", "type", "xfrm", "if_id", "42")
    nsx(NS_ES, "ip", "link", "set", "kvmxfrm42", "up")
    try:
        reset(env, ss_conn(), es_conn(child))
        up(env)
        for block in xfrm_states(NS_ES):
            assert "if_id 0x2a" in block, block
        policies = nsx(NS_ES, "ip", "xfrm", "policy").stdout
        assert "if_id 0x2a" in policies, policies
        assert not ping(NS_ES, ES_INNER, SS_INNER, count=1)  # no route into the interface yet
        nsx(NS_ES, "ip", "route", "add", SS_NET, "dev", "kvmxfrm42", "src", ES_INNER)
        assert ping(NS_ES, ES_INNER, SS_INNER) and ping(NS_SS, SS_INNER, ES_INNER)
        tcp_transfer(NS_ES, ES_INNER, NS_SS, SS_INNER)
        rx = nsx(NS_ES, "ip", "-s", "link", "show", "kvmxfrm42").stdout
        assert re.search(r"RX:.*\n\s+(\d+)", rx) and int(re.search(r"RX:.*\n\s+(\d+)", rx).group(1)) > 0, rx
    finally:
        nsx(NS_ES, "ip", "link", "del", "kvmxfrm42", check=False)


def ledger_bound(site: Site, spi: int) -> int:
    raw = site.store_range(schema.prefix("dataplane", "seq")).get(f"{spi:08x}")
    return int(json.loads(raw)["upto"]) if raw else 0


def test_dataplane_restart_adopts_kernel_sas_and_a_lost_kernel_state_resumes_from_the_ledger(env: Env) -> None:
    reset(env, ss_conn(), es_conn())
    sa = up(env)
    child = sa.children[0]
    out_spi = child.spi_out
    pinger = Pinger(NS_ES, ES_INNER, SS_INNER, count=10_000, interval=0.1)
    try:
        # kill -9: the kernel keeps the SAs and keeps forwarding without any process
        assert env.es.dp is not None
        env.es.dp.kill()
        env.es.dp.wait(10)
        env.es.dp = None
        before = oseq_of(NS_ES, out_spi)
        wait_until(lambda: oseq_of(NS_ES, out_spi) >= before + 10, timeout=30, interval=POLL, what="traffic flows")
        env.es.start_dataplane()
        expect(env, lambda: dataplane_ready(env.es), "the restarted dataplane reconciled", timeout=120)
        status = env.es.dp_stub().GetStatus(dp.GetStatusRequest(), timeout=10)
        assert status.details["kernel_adopted_sas"] == "2", dict(status.details)
        assert "not_installed" not in status.details, f"{status.details['not_installed']}\n{explain(env)}"
        assert child.id in env.es.dataplane_children()
        # the ledger is taken over and raised above what the kernel sent meanwhile
        sent = oseq_of(NS_ES, out_spi)
        wait_until(lambda: ledger_bound(env.es, out_spi) > sent, timeout=30, interval=POLL, what="ledger ahead")
    finally:
        pinger.stop()
    lost, total, out = pinger.lost()
    assert lost <= 3, f"{lost} of {total} pings lost while the dataplane restarted:\n{out}"

    # The kernel loses its state while the dataplane is down (as at a reboot): the restarted
    # dataplane installs the SAs again, continuing after every number the ledger reserved.
    bound = ledger_bound(env.es, out_spi)
    sent = oseq_of(NS_ES, out_spi)
    env.es.stop_dataplane()
    nsx(NS_ES, "ip", "xfrm", "state", "flush")
    nsx(NS_ES, "ip", "xfrm", "policy", "flush")
    # The reinstall asks for a rekey at once, so the reinstalled SA may live only seconds:
    # traffic runs throughout and every poll notes the highest number we sent under it and
    # the highest charon accepted.
    seen = {"ours": 0, "charon": 0}

    def sample() -> None:
        where = ((NS_ES, "ours", r"oseq (0x[0-9a-f]+)"), (NS_SS, "charon", r"context: seq (0x[0-9a-f]+)"))
        for ns, side, pattern in where:
            for block in xfrm_states(ns):
                if f"spi {out_spi:#010x}" in block and (m := re.search(pattern, block)):
                    seen[side] = max(seen[side], int(m.group(1), 16))

    pinger = Pinger(NS_ES, ES_INNER, SS_INNER, count=10_000, interval=0.1)
    try:
        env.es.start_dataplane(wait=False)
        expect(env, lambda: sample() or dataplane_ready(env.es), "the restarted dataplane reconciled", timeout=150)
        expect(env, lambda: sample() or env.events.of("child_rekeyed"), "rekey after the reinstall", timeout=90)
    finally:
        pinger.stop()
    # the reinstalled SA continued after every number the ledger reserved, and charon took the
    # jump forward (its replies stay below our raised replay floor until the rekey)
    assert seen["ours"] >= bound > sent, (seen, bound, sent)
    assert seen["charon"] >= bound, (seen, bound, sent)
    wait_until(lambda: out_spi not in xfrm_spis(NS_ES), timeout=30, interval=POLL, what="the old SAs gone")
    assert ping(NS_ES, ES_INNER, SS_INNER) and ping(NS_SS, SS_INNER, ES_INNER)


def dataplane_ready(site: Site) -> bool:
    """Health SERVING: the first reconcile from the store is done."""
    channel = grpc.insecure_channel(f"{site.mgmt_ip}:{DP_PORT}")
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False
    finally:
        channel.close()
