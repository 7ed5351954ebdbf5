"""Identity filters enforced by the kernel: a governed tunnel-mode Child SA on a gateway whose
IN and FWD policies the backend narrowed to the grant (`set_identity_filter`).

Client (side a, 10.1.0.1) -> ESP -> gateway (side b, 10.2.0.1 itself, negotiated site
10.2.0.0/24) -> forwarded to a server namespace (10.2.0.3). A granted host:port receives; a port
and a host the grant does not name, in the same negotiated network, are dropped by the
gateway's policy check (XfrmInPolBlock moves); after a revocation the formerly granted flow is
dropped too; without a filter everything in the negotiated selectors passes again. In
transport mode the BLOCK entry is what drops the rest (without it the packet would pass).

Negative checks are ordered, not timed: the denied packet is sent first and a granted one
through the same SA after it; once the granted one has arrived, the denied one was decided.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
from collections.abc import Iterator
from functools import partial

import pytest

from esplanade.dataplane.kernel.backend import KernelXfrmBackend
from esplanade.dataplane.kernel.xfrm_messages import XfrmPolicyAction
from esplanade.ipsec.selectors import TrafficSelector
from esplanade.ipsec.spd import PolicyDirection
from esplanade.ipsec.transforms import Mode
from tests.conditions import async_wait_until, wait_until
from tests.dataplane.kernel.backend_harness import started_backend, udp_socket_in
from tests.dataplane.kernel.child_sa_builders import TRANSFORMS_BY_LABEL, Peer, child_sa_pair, protect_policies
from tests.dataplane.kernel.netns_topology import NetnsPair, in_netns, ip_batch, netns_pair, run, unique_name

pytestmark = pytest.mark.vm

SERVER = "10.2.0.3"
OTHER = "10.2.0.2"  # a second address of the gateway, same negotiated network
SITE = TrafficSelector.from_network("10.2.0.0/24")
CLIENT = TrafficSelector.from_network("10.1.0.1/32")


@contextlib.contextmanager
def topology() -> Iterator[tuple[NetnsPair, str]]:
    with netns_pair() as pair:
        server = unique_name("srv")
        try:
            ip_batch([f"netns add {server}"])
            ip_batch([f"link add vbs netns {pair.b.netns} type veth peer name vs netns {server}"])
            ip_batch(
                [
                    "addr add 172.16.9.1/30 dev vbs",
                    "link set vbs up",
                    f"route add {SERVER}/32 via 172.16.9.2",
                    f"addr add {OTHER}/32 dev lo",
                ],
                netns=pair.b.netns,
            )
            ip_batch(
                ["link set lo up", "addr add 172.16.9.2/30 dev vs", "link set vs up", f"addr add {SERVER}/32 dev lo"],
                netns=server,
            )
            in_netns(pair.b.netns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            ip_batch([f"route add {SITE.networks()[0]} via {pair.b.outer4} src {pair.a.inner4}"], netns=pair.a.netns)
            yield pair, server
        finally:
            run("ip", "netns", "del", server, check=False)


class Receivers:
    """UDP sockets of the gateway and the server, by (address, port)."""

    def __init__(self, stack: contextlib.ExitStack, places: dict[tuple[str, int], str]) -> None:
        self.socks: dict[tuple[str, int], socket.socket] = {}
        for (addr, port), ns in places.items():
            sock = stack.enter_context(udp_socket_in(ns, addr, port))
            sock.setblocking(False)
            self.socks[(addr, port)] = sock

    def take(self, where: tuple[str, int]) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.socks[where].recv(2048))
            except BlockingIOError:
                return out


async def test_a_filter_lets_the_grant_through_and_drops_the_rest_of_the_negotiated_network() -> None:
    with topology() as (pair, server), contextlib.ExitStack() as stack:
        client, gateway = Peer(pair.a.outer4, pair.a.inner4), Peer(pair.b.outer4, pair.b.inner4)
        record_a, record_b = child_sa_pair("governed", client, gateway, TRANSFORMS_BY_LABEL["aes128gcm16"])
        async with started_backend(pair.a.netns) as backend_a, started_backend(pair.b.netns) as backend_b:
            await backend_a.install_child_sa(record_a, protect_policies(record_a, local_ts=CLIENT, remote_ts=SITE))
            await backend_b.install_child_sa(record_b)
            # the gateway's entries come on their own, after the filter, as the reconciler installs them
            await backend_b.set_identity_filter(record_b.id, [TrafficSelector.parse(f"{SERVER}/32[udp/7000]")])
            out, inbound = protect_policies(record_b, local_ts=SITE, remote_ts=CLIENT)
            fwd = dataclasses.replace(inbound, id="governed-fwd", direction=PolicyDirection.FWD)
            for policy in (out, inbound, fwd):
                await backend_b.install_policy(policy)

            receivers = Receivers(
                stack,
                {
                    (SERVER, 7000): server,
                    (SERVER, 7001): server,
                    (pair.b.inner4, 7000): pair.b.netns,
                    (OTHER, 7000): pair.b.netns,
                },
            )
            sender = stack.enter_context(udp_socket_in(pair.a.netns, pair.a.inner4, 0))
            base = await _blocked(backend_b)

            async def sent_in_order(denied: list[tuple[str, int]], granted: tuple[str, int], tag: bytes) -> None:
                for where in denied:
                    sender.sendto(tag + b" denied", where)
                sender.sendto(tag + b" granted", granted)
                wait_until(partial(receivers.take, granted), timeout=20, what=f"{tag!r} granted to {granted}")

            # 1: only SERVER udp/7000 is granted: another port, the gateway itself and another
            #    gateway address in the same negotiated network are dropped
            denied = [(SERVER, 7001), (pair.b.inner4, 7000), (OTHER, 7000)]
            await sent_in_order(denied, (SERVER, 7000), b"1")
            assert all(receivers.take(where) == [] for where in denied)
            await async_wait_until(partial(_at_least, backend_b, base + 3), timeout=10, what="3 drops counted")

            # 2: revocation: the grant moves to the gateway's own address; the formerly granted
            #    flow is dropped from now on
            await backend_b.set_identity_filter(record_b.id, [TrafficSelector.parse(f"{pair.b.inner4}/32[udp/7000]")])
            base = await _blocked(backend_b)
            await sent_in_order([(SERVER, 7000)], (pair.b.inner4, 7000), b"2")
            assert receivers.take((SERVER, 7000)) == []
            await async_wait_until(partial(_at_least, backend_b, base + 1), timeout=10, what="the revoked flow's drop")

            # 3: no filter: the negotiated selectors again, everything in 10.2.0.0/24 passes
            await backend_b.set_identity_filter(record_b.id, None)
            for where in [(SERVER, 7001), (OTHER, 7000), (SERVER, 7000)]:
                sender.sendto(b"3", where)
                wait_until(partial(receivers.take, where), timeout=20, what=f"unfiltered to {where}")
            received = {c.spi: c.packets for c in backend_b.counters() if c.direction == "in"}
            assert received[record_b.inbound.spi] >= 9  # all of it came through the SA


async def _blocked(backend: KernelXfrmBackend) -> int:
    drops = await backend.identity_filter_drops()
    return drops.unattributed["XfrmInPolBlock"]


async def _at_least(backend: KernelXfrmBackend, count: int) -> bool:
    return await _blocked(backend) >= count


async def test_transport_mode_needs_and_gets_the_block_entry() -> None:
    """A decapsulated transport-mode packet that matches no policy passes the kernel's check
    (only tunnel-mode SAs are rejected without one): the BLOCK entry over the negotiated
    selector is what drops what the filter does not grant."""
    with netns_pair() as pair, contextlib.ExitStack() as stack:
        a, b = Peer(pair.a.outer4, pair.a.inner4), Peer(pair.b.outer4, pair.b.inner4)
        record_a, record_b = child_sa_pair("tr", a, b, TRANSFORMS_BY_LABEL["aes128gcm16"], mode=Mode.TRANSPORT)
        async with started_backend(pair.a.netns) as backend_a, started_backend(pair.b.netns) as backend_b:
            await backend_a.install_child_sa(record_a, protect_policies(record_a))
            await backend_b.install_child_sa(record_b, protect_policies(record_b))
            await backend_b.set_identity_filter(record_b.id, [TrafficSelector.parse(f"{b.outer}/32[udp/7000]")])
            receivers = Receivers(stack, {(b.outer, 7000): pair.b.netns, (b.outer, 7001): pair.b.netns})
            sender = stack.enter_context(udp_socket_in(pair.a.netns, a.outer, 0))
            base = await _blocked(backend_b)
            sender.sendto(b"denied", (b.outer, 7001))
            sender.sendto(b"granted", (b.outer, 7000))
            wait_until(partial(receivers.take, (b.outer, 7000)), timeout=20, what="the granted packet")
            assert receivers.take((b.outer, 7001)) == []
            await async_wait_until(partial(_at_least, backend_b, base + 1), timeout=10, what="the denied packet's drop")

            # without the BLOCK entry (removed behind the backend's back) the denied port is reached
            (block,) = [p for p in backend_b.client.dump_policies() if p.action == XfrmPolicyAction.BLOCK]
            backend_b.client.delete_policy(block.key)
            sender.sendto(b"unguarded", (b.outer, 7001))
            wait_until(partial(receivers.take, (b.outer, 7001)), timeout=20, what="the unguarded packet")
            received = {c.spi: c.packets for c in backend_b.counters() if c.direction == "in"}
            assert received[record_b.inbound.spi] == 3  # every one of them came through the SA
