"""The worker loop's pipelines with fake rooms: what reaches the transform, what leaves, what is counted."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections import Counter
from collections.abc import Sequence
from typing import Any, cast

from esplanade.dataplane.backend import DataplaneEvent, DataplaneEventKind
from esplanade.dataplane.userspace.handoff import Mailbox, mailbox_pairs
from esplanade.dataplane.userspace.loop import DatapathLoop, LoopParts
from esplanade.dataplane.userspace.mtu import MssClamp, MtuGuard
from esplanade.dataplane.userspace.offloads import DatapathFeatures
from esplanade.dataplane.userspace.outer_transport import Datagram
from esplanade.dataplane.userspace.passthrough_transform import PassThroughRoute, PassThroughTransform
from esplanade.dataplane.userspace.segmentation import coalesce_for_tun
from esplanade.dataplane.userspace.tun import TunOffload, TunQueue
from esplanade.dataplane.userspace.vnet_header import PLAIN_VNET_HDR, VNET_HDR_LEN, GsoType, VnetHeader
from tests.dataplane.userspace.packet_builders import tcp_segments, udp_datagrams

FEATURES = DatapathFeatures(
    vnet_hdr=True,
    tun_offload=TunOffload.NONE,
    merge_tcp=True,
    merge_udp=True,
    udp_gso=True,
    udp_gro=True,
    multi_queue=False,
)


class FakeTun:
    def __init__(self, frames: list[bytes] | None = None) -> None:
        self.pending = list(frames or [])
        self.written: list[bytes] = []
        self.drops: Counter[str] = Counter()
        self.frames_read = 0
        self.frames_written = 0
        self.vnet_hdr = True
        self._r, self._w = os.pipe()

    def fileno(self) -> int:
        return self._r

    def read_batch(self, limit: int) -> list[bytes]:
        batch, self.pending = self.pending[:limit], self.pending[limit:]
        return batch

    def write_batch(self, frames: list[bytes]) -> int:
        self.written.extend(frames)
        return len(frames)

    def write_packets(self, packets: list[bytes]) -> int:
        return self.write_batch([PLAIN_VNET_HDR + p for p in packets])


class FakeOuter:
    def __init__(self, incoming: list[Datagram] | None = None) -> None:
        self.incoming = list(incoming or [])
        self.sent: list[Datagram] = []
        self.drops: Counter[str] = Counter()
        self.ike: list[Datagram] = []
        self._r, self._w = os.pipe()

    def fileno(self) -> int:
        return self._r

    def recv_batch(self, limit: int) -> list[Datagram]:
        batch, self.incoming = self.incoming[:limit], self.incoming[limit:]
        return batch

    def send_batch(self, datagrams: list[Datagram]) -> int:
        self.sent.extend(datagrams)
        return len(datagrams)

    def take_ike(self) -> list[Datagram]:
        ike, self.ike = self.ike, []
        return ike

    def set_socket_option(self, level: int, name: int, value: int) -> None:
        pass

    def status(self) -> dict[str, object]:
        return {"kind": "fake"}

    def close(self) -> None:
        pass


class ExplodingTransform(PassThroughTransform):
    def outbound_batch(self, packets: Sequence[bytes], now: float) -> list[Datagram]:
        raise RuntimeError("bug in the crypto room")


class EventfulTransform(PassThroughTransform):
    def drain_events(self) -> list[DataplaneEvent]:
        return [DataplaneEvent(DataplaneEventKind.SOFT_EXPIRE, child_sa="c1", spi=0x1001)]


ROUTES_A = [PassThroughRoute("10.0.0.0/24", ("198.18.0.2", 4500), spi_out=0x1001, spi_in=0x2002)]
ROUTES_B = [PassThroughRoute("10.0.0.0/24", ("198.18.0.1", 4500), spi_out=0x2002, spi_in=0x1001)]


def _parts(tun: FakeTun, outer: FakeOuter, transform: Any = None, **kwargs: Any) -> LoopParts:
    return LoopParts(
        index=kwargs.pop("index", 0),
        count=kwargs.pop("count", 1),
        tun=cast(TunQueue, tun),
        outer=outer,
        transform=transform or PassThroughTransform(ROUTES_A),
        features=kwargs.pop("features", FEATURES),
        clock=lambda: 100.0,
        **kwargs,
    )


def test_tun_frames_become_esp_datagrams_in_batches() -> None:
    packets = tcp_segments(100, 500)
    tun, outer = FakeTun([PLAIN_VNET_HDR + p for p in packets]), FakeOuter()
    loop = DatapathLoop(_parts(tun, outer, batch=64))
    assert loop.tun_to_outer() is True, "a full batch: more may be waiting"
    assert loop.tun_to_outer() is False
    assert [p[8:] for _, p in outer.sent] == packets
    assert loop.counters.packets_out == 100 and loop.counters.datagrams_out == 100


def test_super_packets_from_tun_offloads_are_split_before_the_transform() -> None:
    segments = tcp_segments(5, 1000)
    (merged,) = coalesce_for_tun(segments)
    features = DatapathFeatures(True, TunOffload.CSUM | TunOffload.TSO4, True, False, True, True, False)
    tun, outer = FakeTun([merged]), FakeOuter()
    DatapathLoop(_parts(tun, outer, features=features)).tun_to_outer()
    assert [p[8:] for _, p in outer.sent] == segments


def test_inbound_datagrams_are_merged_into_gso_frames() -> None:
    segments = tcp_segments(20, 1000)
    sender = PassThroughTransform(ROUTES_B)
    datagrams = sender.outbound_batch(segments, 0.0)
    tun, outer = FakeTun(), FakeOuter(datagrams)
    loop = DatapathLoop(_parts(tun, outer))
    loop.outer_to_tun()
    assert len(tun.written) == 1
    assert VnetHeader.unpack(tun.written[0]).gso_type == GsoType.TCPV4
    plain = DatapathLoop(
        _parts(
            FakeTun(),
            FakeOuter(datagrams),
            features=DatapathFeatures(False, TunOffload.NONE, False, False, False, False, False),
        )
    )
    plain.outer_to_tun()
    assert len(cast(FakeTun, plain.parts.tun).written) == 20


def test_a_failing_transform_loses_the_batch_not_the_worker() -> None:
    tun, outer = FakeTun([PLAIN_VNET_HDR + p for p in udp_datagrams(3)]), FakeOuter()
    loop = DatapathLoop(_parts(tun, outer, transform=ExplodingTransform(ROUTES_A)))
    assert loop.tun_to_outer() is False
    assert loop.counters.errors["transform_errors"] == 1 and outer.sent == []


def test_mtu_guard_and_mss_clamp_sit_on_the_outbound_path() -> None:
    class Icmp:
        def __init__(self) -> None:
            self.sent: list[tuple[bool, str, bytes]] = []

        def send(self, v6: bool, destination: str, message: bytes) -> None:
            self.sent.append((v6, destination, message))

    too_big = tcp_segments(1, 1400, src="10.0.1.2", dst="10.0.0.9")[0]
    ok = tcp_segments(1, 100, dst="10.0.0.9")[0]
    icmp = Icmp()
    tun, outer = FakeTun([PLAIN_VNET_HDR + too_big, PLAIN_VNET_HDR + ok]), FakeOuter()
    loop = DatapathLoop(_parts(tun, outer, mtu_guard=MtuGuard(1200), mss_clamp=MssClamp(1200), icmp=icmp))
    loop.tun_to_outer()
    assert [p[8:] for _, p in outer.sent] == [ok]
    assert [(v6, dst) for v6, dst, _ in icmp.sent] == [(False, "10.0.1.2")]


def test_packets_of_sas_owned_elsewhere_go_to_the_owner() -> None:
    pairs = mailbox_pairs(2)
    boxes = [Mailbox(k, pairs[k][0], [pairs[j][1] if j != k else None for j in range(2)]) for k in range(2)]
    try:
        # worker 1 owns SPI 0x2001 (odd) and is the one the SA A->B belongs to
        routes = [PassThroughRoute("10.0.0.0/24", ("198.18.0.2", 4500), spi_out=0x1001, spi_in=0x2001)]
        packets = udp_datagrams(3, dst="10.0.0.5")
        esp_for_worker_1 = (("198.18.0.2", 4500), (0x2001).to_bytes(4, "big") + bytes(4) + packets[0])
        tun, outer = FakeTun([PLAIN_VNET_HDR + p for p in packets]), FakeOuter([esp_for_worker_1])
        transform = PassThroughTransform(routes, context=None)
        loop0 = DatapathLoop(
            _parts(
                tun,
                outer,
                transform=transform,
                index=0,
                count=2,
                mailbox=boxes[0],
                steering=PassThroughTransform(routes, _ctx(0, 2)),
            )
        )
        loop0.tun_to_outer()
        loop0.outer_to_tun()
        assert outer.sent == [] and tun.written == []
        assert loop0.counters.handed_off_out == 3 and loop0.counters.handed_off_in == 1
        tun1, outer1 = FakeTun(), FakeOuter()
        loop1 = DatapathLoop(
            _parts(
                tun1,
                outer1,
                transform=PassThroughTransform(routes, _ctx(1, 2)),
                index=1,
                count=2,
                mailbox=boxes[1],
                steering=PassThroughTransform(routes, _ctx(1, 2)),
            )
        )
        loop1.mailbox_drain()
        assert [p[8:] for _, p in outer1.sent] == packets
        assert [f[VNET_HDR_LEN:] for f in tun1.written] == [packets[0]]
    finally:
        for inbox, outbox in pairs:
            inbox.close()
            outbox.close()


def _ctx(index: int, count: int) -> Any:
    from esplanade.dataplane.userspace.transform import WorkerContext

    return WorkerContext(index, count)


def test_control_channel_status_events_and_stop() -> None:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tun, outer = FakeTun(), FakeOuter()
    outer.ike = [(("198.18.0.2", 4500), b"ike")]
    loop = DatapathLoop(_parts(tun, outer, transform=EventfulTransform(ROUTES_A), control=child))
    thread = threading.Thread(target=loop.run)
    thread.start()
    try:
        parent.settimeout(5)
        parent.send(json.dumps({"op": "status"}).encode())
        replies: list[dict[str, Any]] = []
        while not (any(r["op"] == "status" for r in replies) and any(r["op"] == "events" for r in replies)):
            replies.append(json.loads(parent.recv(1 << 20)))
        status = next(r for r in replies if r["op"] == "status")["status"]
        assert status["worker"] == 0 and status["outer"] == {"kind": "fake"}
        assert any(r["op"] == "events" and r["events"][0]["kind"] == "soft_expire" for r in replies)
        os.write(outer._w, b"x")  # wake the loop so it reads the fake socket and finds IKE without a sink
        parent.send(json.dumps({"op": "stop"}).encode())
        thread.join(5)
        assert not thread.is_alive()
        assert loop.counters.errors["ike_without_sink"] == 1
    finally:
        if thread.is_alive():
            loop.running = False
            thread.join(5)
        parent.close()
        child.close()


class IkeSendingOuter(FakeOuter):
    def __init__(self) -> None:
        super().__init__()
        self.ike_sent: list[tuple[tuple[str, int], bytes, str | None]] = []

    def send_ike(self, endpoint: tuple[str, int], message: bytes, local: str | None = None) -> bool:
        self.ike_sent.append((endpoint, message, local))
        return True


def test_send_ike_is_answered_with_an_id_and_posted_without_one() -> None:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    tun, outer = FakeTun(), IkeSendingOuter()
    loop = DatapathLoop(_parts(tun, outer, control=child))
    thread = threading.Thread(target=loop.run)
    thread.start()
    try:
        parent.settimeout(5)
        send = {"op": "send_ike", "remote_addr": "198.18.0.2", "remote_port": 4500, "local_addr": "198.18.0.1"}
        parent.send(json.dumps({**send, "payload": b"posted".hex()}).encode())
        parent.send(json.dumps({"op": "send_ike", "payload": "zz"}).encode())  # malformed, posted
        parent.send(json.dumps({**send, "payload": b"asked".hex(), "id": 7}).encode())
        answers = [json.loads(parent.recv(1 << 20))]
        parent.send(json.dumps({"op": "stop", "id": 8}).encode())
        thread.join(5)
        assert not thread.is_alive()
        # the posted ones were sent (or counted), and only the request with an id was answered
        assert answers == [{"op": "reply", "id": 7, "ok": True}]
        assert [m for _, m, _ in outer.ike_sent] == [b"posted", b"asked"]
        assert outer.ike_sent[0][0] == ("198.18.0.2", 4500)
        assert loop.counters.errors["ike_send_failed"] == 1
    finally:
        if thread.is_alive():
            loop.running = False
            thread.join(5)
        parent.close()
        child.close()
