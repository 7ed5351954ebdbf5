"""The UDP room on a real kernel: GSO on send, GRO on receive, demultiplexing, fallbacks."""

from __future__ import annotations

import errno
import socket

import pytest

from esplanade.dataplane.userspace.outer_transport import Datagram
from esplanade.dataplane.userspace.udp_socket import EspUdpSocket, UdpSocketSettings
from tests.conditions import wait_until
from tests.dataplane.compiled_module import requires_compiled
from tests.netns_topology import Topology, inside_netns

pytestmark = pytest.mark.netns


def _esp(spi: int, seq: int, size: int) -> bytes:
    return spi.to_bytes(4, "big") + seq.to_bytes(4, "big") + bytes((seq + i) & 0xFF for i in range(size - 8))


def _collect(room: EspUdpSocket, count: int) -> list[Datagram]:
    got: list[Datagram] = []

    def enough() -> bool:
        got.extend(room.recv_batch(64))
        return len(got) >= count

    wait_until(enough, timeout=5, what=f"{count} datagrams")
    return got


@pytest.mark.parametrize("offloads", [True, False])
def test_batches_arrive_intact_with_and_without_gso_gro(scratch: str, offloads: bool) -> None:
    with inside_netns(scratch):
        rx = EspUdpSocket.open(UdpSocketSettings(bind_address="127.0.0.1", port=4500, gso=offloads, gro=offloads))
        tx = EspUdpSocket.open(UdpSocketSettings(bind_address="127.0.0.1", port=4501, gso=offloads, gro=offloads))
    try:
        payloads = [_esp(0x1234, i, 1000) for i in range(30)] + [_esp(0x1234, 30, 500), _esp(0x99, 1, 1000)]
        assert tx.send_batch([(("127.0.0.1", 4500), p) for p in payloads]) == len(payloads)
        got = _collect(rx, len(payloads))
        assert [p for _, p in got] == payloads
        assert {e for e, _ in got} == {("127.0.0.1", 4501)}
        if offloads:
            assert tx.gso and rx.gro
            assert tx.counters["gso_sends"] == 1, "30 x 1000 + 500 in one sendmsg, then a lone datagram"
            assert rx.counters["gro_batches"] >= 1
        else:
            assert not tx.gso and tx.counters["gso_sends"] == 0
        assert not tx.drops and not rx.drops
    finally:
        rx.close()
        tx.close()


def test_ike_keepalives_and_runts_are_set_aside(scratch: str) -> None:
    with inside_netns(scratch):
        rx = EspUdpSocket.open(UdpSocketSettings(bind_address="127.0.0.1", port=4500))
        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for message in (b"\x00\x00\x00\x00IKEv2 message", b"\xff", b"\x01\x02\x03", _esp(0x500, 1, 100)):
            raw.sendto(message, ("127.0.0.1", 4500))
        esp = _collect(rx, 1)
        assert [p for _, p in esp] == [_esp(0x500, 1, 100)]
        ike = rx.take_ike()
        assert [m for _, m in ike] == [b"IKEv2 message"]
        assert rx.take_ike() == []
        assert rx.counters["nat_keepalives"] == 1
        assert rx.drops["runt"] == 1
    finally:
        rx.close()
        raw.close()


def test_send_errors_are_counted_drops(scratch: str) -> None:
    with inside_netns(scratch):
        tx = EspUdpSocket.open(UdpSocketSettings(bind_address="127.0.0.1", port=4501))
    try:
        # no route to this network inside the namespace: ENETUNREACH, counted, nothing raised
        assert tx.send_batch([(("192.0.2.1", 4500), _esp(0x300, i, 200)) for i in range(5)]) == 0
        assert sum(tx.drops.values()) == 5
        assert tx.send_batch([(("127.0.0.1", 4500), b"x" * 70_000)]) == 0
        assert tx.drops["send_emsgsize"] == 1
    finally:
        tx.close()


def test_batches_cross_a_device_without_checksum_offload() -> None:
    """Kernels before ~6.6 refuse UDP GSO there with EIO (we then fall back); newer ones checksum in software."""
    with Topology("dpth-", 2) as topo:
        a, b = topo.nodes
        assert a.run(["ethtool", "-K", "ul0", "tx", "off"]).returncode == 0
        with inside_netns(b.name):
            rx = EspUdpSocket.open(UdpSocketSettings(bind_address=b.underlay_addr, port=4500))
        with inside_netns(a.name):
            tx = EspUdpSocket.open(UdpSocketSettings(bind_address=a.underlay_addr, port=4500))
        try:
            payloads = [_esp(0x700, i, 1200) for i in range(10)]
            for _ in range(2):
                assert tx.send_batch([((b.underlay_addr, 4500), p) for p in payloads]) == 10
                assert [p for _, p in _collect(rx, 10)] == payloads
            assert tx.gso or "EIO" in tx.gso_note
        finally:
            rx.close()
            tx.close()


class _GsoRefusingSocket:
    """Stands in for a kernel whose egress device cannot do UDP GSO (EIO) or takes the segment as too big."""

    family = socket.AF_INET

    def __init__(self, errno_on_gso: int) -> None:
        self.errno_on_gso = errno_on_gso
        self.sent: list[bytes] = []

    def sendmsg(self, buffers: list[bytes], ancdata: object, flags: int, address: object) -> int:
        raise OSError(self.errno_on_gso, "refused")

    def sendto(self, payload: bytes, address: object) -> int:
        self.sent.append(payload)
        return len(payload)


@pytest.mark.parametrize(("code", "stays_on"), [(errno.EIO, False), (errno.EINVAL, True), (errno.EMSGSIZE, True)])
def test_refused_gso_send_is_resent_one_by_one(code: int, stays_on: bool) -> None:
    fake = _GsoRefusingSocket(code)
    room = EspUdpSocket(fake, UdpSocketSettings())  # type: ignore[arg-type]
    room.gso = True
    payloads = [_esp(0x800, i, 300) for i in range(6)]
    assert room.send_batch([(("198.51.100.1", 4500), p) for p in payloads]) == 6
    assert fake.sent == payloads
    assert room.gso is stays_on
    assert not room.drops


def test_other_gso_errors_are_drops() -> None:
    fake = _GsoRefusingSocket(errno.ENOBUFS)
    room = EspUdpSocket(fake, UdpSocketSettings())  # type: ignore[arg-type]
    room.gso = True
    assert room.send_batch([(("198.51.100.1", 4500), _esp(0x800, i, 300)) for i in range(4)]) == 0
    assert room.drops["send_enobufs"] == 4 and fake.sent == []


@requires_compiled
@pytest.mark.parametrize("offloads", [True, False])
def test_compiled_send_and_receive_loops(scratch: str, offloads: bool) -> None:
    """`send_payloads` (one compiled call, a sendmsg per GSO run) and `recv_gro` (one compiled call
    for several reads): the same datagrams as the per-call paths; a read that mixes SPIs, IKE, a
    keep-alive and plain-ESP destinations are handed back to the caller."""
    from esplanade.dataplane.fastpath import PacketBatch

    with inside_netns(scratch):
        rx = EspUdpSocket.open(UdpSocketSettings(bind_address="127.0.0.1", port=4500, gso=offloads, gro=offloads))
        tx = EspUdpSocket.open(UdpSocketSettings(bind_address="127.0.0.1", port=4501, gso=offloads, gro=offloads))
    try:
        payloads = [_esp(0x1234, i, 1000) for i in range(30)] + [_esp(0x1234, 30, 500)]
        others = [_esp(0x99, 1, 800), _esp(0x99, 2, 800)]
        batch = PacketBatch.from_packets([*payloads, *others, b"\x01" * 700], [0] * 31 + [1, 1, 2])
        endpoints = [("127.0.0.1", 4500), ("127.0.0.1", 4500), ("192.0.2.9", 0)]
        sent, plain = tx.send_payloads(batch.data, batch.spans, batch.count, endpoints)
        assert sent == 33 and plain == [(("192.0.2.9", 0), b"\x01" * 700)]
        assert tx.counters["gso_sends"] == (2 if offloads else 0)
        buf, spans = bytearray(), bytearray()
        got: list[bytes] = []

        def enough() -> bool:
            count, _, spis, odd = rx.recv_gro(buf, spans, 8, {0x1234})
            got.extend(PacketBatch(buf, spans, count).to_list())
            for at, nbytes, segment, endpoint, _ in odd:
                assert endpoint == ("127.0.0.1", 4501)
                got.extend(bytes(buf[o : min(o + segment, at + nbytes)]) for o in range(at, at + nbytes, segment))
            assert set(spis) <= {0x1234}
            return len(got) >= 33

        wait_until(enough, timeout=5, what="33 datagrams")
        assert sorted(got) == sorted(payloads + others)
        assert not tx.drops and not rx.drops
    finally:
        rx.close()
        tx.close()


class _RefusingRuns:
    """Stands in for `_espfast` when every GSO run comes back refused with one errno."""

    def __init__(self, code: int) -> None:
        self.code = code

    def send_runs(self, fd: int, data: bytearray, spans: bytearray, count: int, *rest: object) -> tuple[int, int, list]:  # type: ignore[type-arg]
        from esplanade.dataplane.fastpath import PacketBatch

        runs = PacketBatch(data, spans, count).gso_runs(64, 65000)
        return 0, 0, [(offset, length, segment, n, tag, self.code) for offset, length, segment, n, tag in runs]


@pytest.mark.parametrize(
    ("code", "stays_on", "delivered"),
    [(errno.EIO, False, 6), (errno.EINVAL, True, 6), (errno.EMSGSIZE, True, 6), (errno.ENOBUFS, True, 0)],
)
def test_runs_refused_by_the_compiled_send_fall_back_like_send_batch(
    monkeypatch: pytest.MonkeyPatch, code: int, stays_on: bool, delivered: int
) -> None:
    from esplanade.dataplane.fastpath import PacketBatch
    from esplanade.dataplane.userspace import udp_socket

    monkeypatch.setattr(udp_socket, "load_compiled", lambda: (_RefusingRuns(code), ""))
    fake = _GsoRefusingSocket(code)
    fake.fileno = lambda: -1  # type: ignore[attr-defined]
    room = EspUdpSocket(fake, UdpSocketSettings())  # type: ignore[arg-type]
    room.gso = True
    payloads = [_esp(0x800, i, 300) for i in range(6)]
    batch = PacketBatch.from_packets(payloads)
    sent, plain = room.send_payloads(batch.data, batch.spans, batch.count, [("198.51.100.1", 4500)])
    assert (sent, plain) == (delivered, [])
    assert fake.sent == (payloads if delivered else [])
    assert room.gso is stays_on
    assert room.drops == ({} if delivered else {"send_enobufs": 6})
