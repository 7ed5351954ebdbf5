"""The kernel backend against this machine's kernel, in private network namespaces.

This kernel has XFRM netlink but no ESP (CONFIG_INET_ESP off): policies, socket bypass and
ACQUIRE work for real; SAs are refused with the reason, and the refusal leaves nothing.
The same backend with ESP is proven in the VM (tests/vm).
"""

from __future__ import annotations

import dataclasses
import errno
import socket
from collections.abc import AsyncIterator, Iterator

import pytest

from esplanade.dataplane.backend import (
    AlreadyExists,
    DataplaneError,
    DataplaneEventKind,
    InvalidArgument,
    NotFound,
    Unsupported,
)
from esplanade.dataplane.backend_selection import choose_backend
from esplanade.dataplane.kernel.backend import KernelXfrmBackend
from esplanade.dataplane.kernel.esp_probe import probe_kernel_esp
from esplanade.dataplane.kernel.xfrm_messages import XfrmPolicyDir
from esplanade.dataplane.kernel.xfrm_policy import xfrm_policies_from_spd
from esplanade.dataplane.kernel.xfrm_socket import XfrmNetlinkError
from esplanade.ipsec.selectors import TrafficSelector
from esplanade.ipsec.spd import PolicyAction, PolicyDirection, SpdPolicy
from tests.conditions import wait_until
from tests.dataplane.kernel.backend_harness import EventWatcher, started_backend, udp_socket_in
from tests.dataplane.kernel.child_sa_builders import TRANSFORMS_BY_LABEL, Peer, child_sa_pair, protect_policies
from tests.dataplane.kernel.netns_topology import PREFIX, NetnsPair, in_netns, netns, netns_pair, run

pytestmark = pytest.mark.netns

POLICY = SpdPolicy(
    id="office",
    direction=PolicyDirection.OUT,
    local_ts=TrafficSelector.parse("10.1.0.0/24"),
    remote_ts=TrafficSelector.parse("10.2.0.0/24"),
    tunnel_src="192.0.2.1",
    tunnel_dst="192.0.2.2",
    reqid=7,
    priority=500,
)


@pytest.fixture
def namespace() -> Iterator[str]:
    with netns("host") as ns:
        yield ns


@pytest.fixture
async def backend(namespace: str) -> AsyncIterator[KernelXfrmBackend]:
    async with started_backend(namespace) as b:
        yield b


def ip_xfrm_policies(namespace: str) -> str:
    return run("ip", "-n", namespace, "xfrm", "policy", "list").stdout


async def test_policies_install_list_and_delete(backend: KernelXfrmBackend, namespace: str) -> None:
    policies = [
        POLICY,
        dataclasses.replace(
            POLICY, id="office-in", direction=PolicyDirection.IN, tunnel_src="192.0.2.2", tunnel_dst="192.0.2.1"
        ),
        dataclasses.replace(
            POLICY, id="office-fwd", direction=PolicyDirection.FWD, tunnel_src="192.0.2.2", tunnel_dst="192.0.2.1"
        ),
        dataclasses.replace(
            POLICY,
            id="v6",
            local_ts=TrafficSelector.parse("fd01::/64"),
            remote_ts=TrafficSelector.parse("fd02::/64[tcp/22]"),
        ),
        dataclasses.replace(
            POLICY, id="drop-telnet", action=PolicyAction.DISCARD, remote_ts=TrafficSelector.parse("0.0.0.0/0[tcp/23]")
        ),
        dataclasses.replace(
            POLICY,
            id="mgmt",
            action=PolicyAction.BYPASS,
            remote_ts=TrafficSelector.parse("10.9.0.0/16"),
            mark=3,
            if_id=4,
        ),
    ]
    for policy in policies:
        await backend.install_policy(policy)
    sent = [kp for p in policies for kp in xfrm_policies_from_spd(p, reqid=7)]
    assert sorted(backend.client.dump_policies(), key=lambda p: p.key) == sorted(sent, key=lambda p: p.key)
    listing = ip_xfrm_policies(namespace)  # iproute2's independent decoding of the same SPD
    assert "src 10.1.0.0/24 dst 10.2.0.0/24" in listing and "dir fwd" in listing and "action block" in listing
    assert "dst fd02::/64 proto tcp dport 22" in listing and "if_id 0x4" in listing

    await backend.install_policy(POLICY)  # the same again: nothing to do
    await backend.delete_policy("office-in")
    assert len(backend.client.dump_policies()) == len(policies) - 1
    for policy in policies:
        if policy.id != "office-in":
            await backend.delete_policy(policy.id)
    assert backend.client.dump_policies() == [] and ip_xfrm_policies(namespace) == ""
    with pytest.raises(NotFound):
        await backend.delete_policy("office")


async def test_reinstalling_an_id_replaces_it_in_place(backend: KernelXfrmBackend) -> None:
    await backend.install_policy(POLICY)
    wider = dataclasses.replace(POLICY, remote_ts=TrafficSelector.parse("10.2.0.0-10.2.0.255[udp/500-503]"), priority=9)
    await backend.install_policy(wider)
    (kernel,) = backend.client.dump_policies()
    assert (kernel.selector.proto, kernel.selector.dport, kernel.priority) == (17, 500, 9)
    narrower = dataclasses.replace(wider, remote_ts=TrafficSelector.parse("10.2.0.0-10.2.0.2"))
    await backend.install_policy(narrower)
    assert sorted(p.selector.prefixlen_d for p in backend.client.dump_policies()) == [31, 32]


async def test_a_colliding_expansion_is_rolled_back_entirely(backend: KernelXfrmBackend) -> None:
    ranged = dataclasses.replace(POLICY, remote_ts=TrafficSelector.parse("10.2.0.0-10.2.0.6"))
    expanded = xfrm_policies_from_spd(ranged, reqid=7)
    assert len(expanded) == 3
    foreign = dataclasses.replace(expanded[2], priority=1)
    backend.client.add_policy(foreign)  # someone else holds the third selector
    with pytest.raises(AlreadyExists, match="already exists in the kernel"):
        await backend.install_policy(ranged)
    assert backend.client.dump_policies() == [foreign]

    # a replacement that collides restores the previous version
    await backend.install_policy(POLICY)
    with pytest.raises(AlreadyExists):
        await backend.install_policy(dataclasses.replace(ranged, priority=3))
    assert sorted(p.priority for p in backend.client.dump_policies()) == [1, 500]
    await backend.delete_policy("office")
    assert backend.client.dump_policies() == [foreign]


async def test_two_ids_cannot_claim_the_same_selector(backend: KernelXfrmBackend) -> None:
    await backend.install_policy(POLICY)
    with pytest.raises(AlreadyExists, match="belongs to policy 'office'"):
        await backend.install_policy(dataclasses.replace(POLICY, id="other"))


async def test_inexpressible_policy_is_refused(backend: KernelXfrmBackend) -> None:
    with pytest.raises(InvalidArgument, match="needs tunnel_src and tunnel_dst"):
        await backend.install_policy(dataclasses.replace(POLICY, tunnel_dst=""))
    assert backend.client.dump_policies() == []


async def test_child_sa_is_refused_with_the_reason_and_leaves_nothing(backend: KernelXfrmBackend) -> None:
    a, b = Peer("192.0.2.1", "10.1.0.1"), Peer("192.0.2.2", "10.2.0.1")
    for label, words in [("aes128gcm16", "ENOSYS"), ("aes128-sha256", "EPROTONOSUPPORT")]:
        record, _ = child_sa_pair(label, a, b, TRANSFORMS_BY_LABEL[label])
        with pytest.raises(Unsupported) as refused:
            await backend.install_child_sa(record, protect_policies(record))
        assert words in str(refused.value)
        assert isinstance(refused.value.__cause__, XfrmNetlinkError)
        assert backend.client.dump_sas() == [] and backend.client.dump_policies() == []
    assert backend.status().details["child_sas"] == "0"
    with pytest.raises(NotFound):
        await backend.delete_child_sa("nope")


async def test_trap_policy_and_traffic_raise_acquire() -> None:
    with netns_pair() as pair:
        a, b = Peer(pair.a.outer4, pair.a.inner4), Peer(pair.b.outer4, pair.b.inner4)
        record, _ = child_sa_pair("trap", a, b, TRANSFORMS_BY_LABEL["aes128gcm16"])
        trap = dataclasses.replace(protect_policies(record)[0], id="trap", trap=True, reqid=77, child_sa="")
        async with started_backend(pair.a.netns) as backend:
            watcher = EventWatcher(backend)
            await backend.install_policy(trap)
            in_netns(pair.a.netns, "ping", "-c", "1", "-W", "1", "-I", a.inner, b.inner, check=False)
            event = await watcher.wait_for(DataplaneEventKind.ACQUIRE, timeout=10)
            assert event.policy == "trap" and "10.1.0.1 -> 10.2.0.1 proto 1 (reqid 77)" in event.reason
            await watcher.close()


def exchange(sender: socket.socket, receiver: socket.socket) -> bytes:
    receiver.settimeout(1)
    sender.sendto(b"ike", receiver.getsockname())
    return receiver.recv(100)


async def test_bypass_sockets_pass_where_policies_block() -> None:
    with netns_pair() as pair:
        a_ts, b_ts = TrafficSelector.from_network(pair.a.outer4), TrafficSelector.from_network(pair.b.outer4)
        block_out = SpdPolicy("block-out", PolicyDirection.OUT, a_ts, b_ts, action=PolicyAction.DISCARD)
        block_in = SpdPolicy("block-in", PolicyDirection.IN, b_ts, a_ts, action=PolicyAction.DISCARD)
        async with started_backend(pair.a.netns) as backend_a, started_backend(pair.b.netns) as backend_b:
            await backend_a.install_policy(block_out)
            await backend_b.install_policy(block_in)
            with (
                udp_socket_in(pair.a.netns, pair.a.outer4, 500) as ike_a,
                udp_socket_in(pair.b.netns, pair.b.outer4, 500) as ike_b,
            ):
                with pytest.raises(OSError) as blocked:
                    exchange(ike_a, ike_b)
                assert blocked.value.errno == errno.EPERM  # XFRM_POLICY_BLOCK on output
                backend_a.bypass_socket(ike_a)
                with pytest.raises(TimeoutError):  # out now, but B's inbound policy drops it
                    exchange(ike_a, ike_b)
                backend_b.bypass_socket(ike_b, esp_in_udp=False)
                assert exchange(ike_a, ike_b) == b"ike"
                assert exchange(ike_b, ike_a) == b"ike"
                socket_policies = [
                    p for p in backend_a.client.dump_policies(include_socket_policies=True) if p.is_socket_policy
                ]
                assert {p.direction - 3 for p in socket_policies} == {XfrmPolicyDir.IN, XfrmPolicyDir.OUT}
            with udp_socket_in(pair.a.netns, pair.a.outer4, 4500) as natt:
                backend_a.bypass_socket(natt, esp_in_udp=True)  # the NAT-T socket: bypass + UDP_ENCAP


def test_probe_and_selection_explain_why_not_the_kernel() -> None:
    probe = probe_kernel_esp(f"{PREFIX}probe")
    assert not probe.esp
    assert probe.reason == "kernel lacks ESP (xfrm_state add: EPROTONOSUPPORT: Requested type not found)"
    assert probe.results["aes128gcm16"].startswith("ENOSYS")
    choice = choose_backend("auto", probe=lambda: probe)
    assert (choice.name, choice.reason) == ("userspace", probe.reason)
    with pytest.raises(Unsupported, match="kernel backend requested, but kernel lacks ESP"):
        choose_backend("kernel", probe=lambda: probe)
    assert not [name for name in run("ip", "netns", "list").stdout.split() if name.startswith(f"{PREFIX}probe")]


async def test_status_reports_the_reason(namespace: str) -> None:
    async with started_backend(namespace, reason="kernel has ESP (probe installed aes128gcm16)") as backend:
        await backend.install_policy(POLICY)
        status = backend.status()
        assert (status.name, status.reason) == ("kernel", "kernel has ESP (probe installed aes128gcm16)")
        assert status.details["netns"] == namespace and status.details["policies"] == "1"
    # stop() removed what the backend installed
    assert ip_xfrm_policies(namespace) == ""


def test_pair_topology_is_reachable_in_the_clear() -> None:
    with netns_pair() as pair:
        check_reachable(pair)


def check_reachable(pair: NetnsPair) -> None:
    # the first IPv6 echo can go while neighbour discovery on the fresh veth is still pending
    # (the echo is then dropped, not queued, on a loaded machine): ask again until a deadline
    for src, dst in ((pair.a.inner4, pair.b.inner4), (pair.a.inner6, pair.b.inner6)):
        wait_until(
            lambda src=src, dst=dst: (
                in_netns(pair.a.netns, "ping", "-c", "1", "-W", "1", "-I", src, dst, check=False).returncode == 0
            ),
            timeout=15,
            what=f"{src} reaches {dst} in the clear",
        )


async def test_a_missing_namespace_is_a_clear_error() -> None:
    backend = KernelXfrmBackend(netns=f"{PREFIX}does-not-exist")
    with pytest.raises(DataplaneError, match="cannot open NETLINK_XFRM in network namespace"):
        await backend.start()
