"""The IKE relay: UDP 500 and 4500 (non-ESP marker) <-> RelayIke streams, with addresses and ports."""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest

from demo.manual_sites import SiteService, TunnelKeys, child_sa_for
from esplanade.dataplane.ike_relay import IkeRelay
from esplanade.v1 import dataplane_pb2, dataplane_pb2_grpc
from tests.dataplane.service.relay_client import RelayClient
from tests.netns_topology import Topology, inside_netns

MARKER = b"\x00\x00\x00\x00"


def ike_message(spi: int, body: bytes = b"") -> bytes:
    """An IKE header's worth: initiator SPI, zero responder SPI, then whatever."""
    return spi.to_bytes(8, "big") + bytes(8) + b"\x21\x20\x22\x08" + bytes(8) + body


# -- routing (no sockets) ------------------------------------------------------------------
def test_datagrams_of_one_ike_sa_stick_to_one_stream_and_spread_over_streams() -> None:
    relay = IkeRelay()
    streams = [relay.attach(f"kx-{i}") for i in range(3)]
    owners = {}
    for spi in range(1, 301):
        relay.deliver("198.18.0.1", 500, "198.18.0.2", 500, ike_message(spi * 7919))
        relay.deliver("198.18.0.1", 4500, "198.18.0.2", 4500, ike_message(spi * 7919))
        got = [s for s in streams if s.queue.qsize() == 2]
        assert len(got) == 1, "both messages of the IKE SA reach the same stream"
        owners[spi] = got[0].key
        got[0].queue.get_nowait()
        got[0].queue.get_nowait()
    counts = {s.key: sum(1 for k in owners.values() if k == s.key) for s in streams}
    assert all(60 < n < 140 for n in counts.values()), counts
    # rendezvous hashing: when kx-1 leaves, only its IKE SAs move
    relay.detach(streams[1])
    for spi, owner in owners.items():
        if owner == "kx-1":
            continue
        assert relay.choose(ike_message(spi * 7919)[:8]) is next(s for s in streams if s.key == owner)


def test_runts_and_datagrams_without_a_client_are_counted() -> None:
    relay = IkeRelay()
    relay.deliver("198.18.0.1", 500, "198.18.0.2", 500, ike_message(5))
    stream = relay.attach()
    relay.deliver("198.18.0.1", 4500, "198.18.0.2", 4500, b"\x01\x02")
    assert relay.counters["dropped_no_client_500"] == 1 and relay.counters["dropped_runt_4500"] == 1
    assert stream.queue.empty()


# -- the real service ------------------------------------------------------------------------
@pytest.mark.netns
async def test_ike_on_500_and_4500_reaches_the_client_and_its_answers_leave_from_the_same_port(
    two_sites: tuple[Topology, SiteService, SiteService],
) -> None:
    topo, site_a, _ = two_sites
    a, b = topo.nodes
    with inside_netns(b.name):  # the peer's sockets: plain UDP in node b
        peer500 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer4500 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        peer500.bind((b.underlay_addr, 5500))
        peer4500.bind((b.underlay_addr, 4600))  # node b's own dataplane holds 4500
        for sock in (peer500, peer4500):
            sock.settimeout(5)
        async with RelayClient(site_a.target, instance="kx-test") as client:
            await client.connected.wait()
            init = ike_message(0x1122334455667788, b"sa-init")
            auth = ike_message(0x1122334455667788, b"auth")
            # the relay stream is live once the server has attached it: retry the first send
            for _ in range(50):
                peer500.sendto(init, (a.underlay_addr, 500))
                try:
                    first = await client.receive(timeout=0.2)
                    break
                except TimeoutError:
                    continue
            else:
                pytest.fail("no IKE datagram reached the relay client")
            assert (first.local_addr, first.local_port) == (a.underlay_addr, 500)
            assert (first.remote_addr, first.remote_port) == (b.underlay_addr, 5500)
            assert first.payload == init
            while client.pending():  # retries of the first send
                await client.receive()

            peer4500.sendto(MARKER + auth, (a.underlay_addr, 4500))
            natt = await client.receive()
            assert (natt.local_addr, natt.local_port) == (a.underlay_addr, 4500)
            assert (natt.remote_addr, natt.remote_port) == (b.underlay_addr, 4600)
            assert natt.payload == auth, "the non-ESP marker is removed"

            await client.send(a.underlay_addr, 500, b.underlay_addr, 5500, b"response-500")
            data, source = await asyncio.to_thread(peer500.recvfrom, 2048)
            assert (data, source) == (b"response-500", (a.underlay_addr, 500))
            await client.send(a.underlay_addr, 4500, b.underlay_addr, 4600, b"response-4500")
            data, source = await asyncio.to_thread(peer4500.recvfrom, 2048)
            assert (data, source) == (MARKER + b"response-4500", (a.underlay_addr, 4500))
            await client.send(a.underlay_addr, 4500, b.underlay_addr, 4600, b"\xff")  # NAT keep-alive
            data, source = await asyncio.to_thread(peer4500.recvfrom, 2048)
            assert (data, source) == (b"\xff", (a.underlay_addr, 4500))

            # a NAT keep-alive and a runt on 4500 never reach the client
            peer4500.sendto(b"\xff", (a.underlay_addr, 4500))
            peer4500.sendto(MARKER + b"\x01", (a.underlay_addr, 4500))
            peer500.sendto(init, (a.underlay_addr, 500))
            follow = await client.receive()
            assert follow.payload == init and client.pending() == 0
    finally:
        peer500.close()
        peer4500.close()


@pytest.mark.netns
async def test_watch_events_reports_installs_and_deletes(two_sites: tuple[Topology, SiteService, SiteService]) -> None:
    topo, _, site_b = two_sites
    a, b = topo.nodes
    keys = TunnelKeys.generate()
    async with grpc.aio.insecure_channel(site_b.target) as channel:
        stub = dataplane_pb2_grpc.DataplaneStub(channel)
        events = stub.WatchEvents(dataplane_pb2.WatchDataplaneEventsRequest())
        child = child_sa_for(b, a, keys, local_is_a=False, udp=True, child_id="watched")
        await asyncio.wait_for(events.initial_metadata(), 10)  # subscribed: nothing is missed from here
        await stub.InstallChildSa(dataplane_pb2.InstallChildSaRequest(child_sa=child), timeout=20)
        installed = await asyncio.wait_for(events.read(), 10)
        await stub.DeleteChildSa(dataplane_pb2.DeleteChildSaRequest(id="watched"), timeout=20)
        deleted = await asyncio.wait_for(events.read(), 10)
        events.cancel()
    assert (installed.kind, installed.child_sa, installed.spi, installed.node) == (
        "installed",
        "watched",
        keys.spi_ab,
        "site-b",
    )
    assert (deleted.kind, deleted.child_sa) == ("deleted", "watched")
