"""The IKE relay: UDP 500 and 4500 (non-ESP marker) <-> RelayIke streams, with addresses and ports."""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest

from demo.manual_sites import SiteService, TunnelKeys, child_sa_for
from esplanade.dataplane.backend import DataplaneEvent, DataplaneEventKind
from esplanade.dataplane.ike_relay import IkeRelay
from esplanade.dataplane.servicer import EventHub, publish_event
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
def test_a_batch_takes_what_is_queued_and_a_closed_stream_ends_after_it() -> None:
    async def scenario() -> None:
        relay = IkeRelay()
        stream = relay.attach("kx")
        for spi in range(1, 4):
            relay.deliver("198.18.0.1", 500, "198.18.0.2", 500, ike_message(spi))
        batch = await stream.next_batch()
        assert batch is not None and [d.payload[:8] for d in batch] == [spi.to_bytes(8, "big") for spi in (1, 2, 3)]
        for spi in range(10):
            relay.deliver("198.18.0.1", 4500, "198.18.0.2", 4500, ike_message(100 + spi))
        assert len(await stream.next_batch(limit=4) or []) == 4  # at most `limit`, the rest stays queued
        stream.close()
        assert len(await stream.next_batch() or []) == 6  # what was queued still leaves
        assert await stream.next_batch() is None

    asyncio.run(scenario())


def test_watchers_get_only_the_kinds_they_asked_for() -> None:
    async def scenario() -> None:
        hub = EventHub()
        every = hub.subscribe()
        expiries = hub.subscribe(frozenset({"soft_expire"}))
        publish_event(hub, DataplaneEvent(DataplaneEventKind.INSTALLED, child_sa="c1"), "n1")
        publish_event(hub, DataplaneEvent(DataplaneEventKind.SOFT_EXPIRE, child_sa="c1"), "n1")
        assert [every.get_nowait().kind for _ in range(every.qsize())] == ["installed", "soft_expire"]
        assert [expiries.get_nowait().kind for _ in range(expiries.qsize())] == ["soft_expire"]
        hub.unsubscribe(every)
        assert not hub.wants("installed") and hub.wants("soft_expire")

    asyncio.run(scenario())


@pytest.mark.netns
@pytest.mark.parametrize("batched", [False, True], ids=["RelayIke", "RelayIkeBatch"])
async def test_ike_on_500_and_4500_reaches_the_client_and_its_answers_leave_from_the_same_port(
    two_sites: tuple[Topology, SiteService, SiteService], batched: bool
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
        async with RelayClient(site_a.target, instance="kx-test", batched=batched) as client:
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

            # several datagrams sent together all leave, in order
            for n in range(3):
                client.send_nowait(a.underlay_addr, 500, b.underlay_addr, 5500, f"burst-{n}".encode())
            for n in range(3):
                data, _ = await asyncio.to_thread(peer500.recvfrom, 2048)
                assert data == f"burst-{n}".encode()
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


@pytest.mark.netns
async def test_watch_events_with_kinds_reports_only_those(two_sites: tuple[Topology, SiteService, SiteService]) -> None:
    topo, _, site_b = two_sites
    a, b = topo.nodes
    keys = TunnelKeys.generate()
    async with grpc.aio.insecure_channel(site_b.target) as channel:
        stub = dataplane_pb2_grpc.DataplaneStub(channel)
        events = stub.WatchEvents(dataplane_pb2.WatchDataplaneEventsRequest(kinds=["deleted"]))
        child = child_sa_for(b, a, keys, local_is_a=False, udp=True, child_id="filtered")
        await asyncio.wait_for(events.initial_metadata(), 10)
        await stub.InstallChildSa(dataplane_pb2.InstallChildSaRequest(child_sa=child), timeout=20)
        await stub.DeleteChildSa(dataplane_pb2.DeleteChildSaRequest(id="filtered"), timeout=20)
        first = await asyncio.wait_for(events.read(), 10)
        events.cancel()
    assert (first.kind, first.child_sa) == ("deleted", "filtered")  # its "installed" was not sent
