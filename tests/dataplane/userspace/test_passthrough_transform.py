from __future__ import annotations

from esplanade.dataplane.userspace.passthrough_transform import PassThroughRoute, PassThroughTransform
from esplanade.dataplane.userspace.transform import PacketTransform, SaSteering, WorkerContext
from tests.dataplane.userspace.packet_builders import tcp_segments, udp_datagrams

ROUTES = [
    PassThroughRoute("10.80.2.0/25", ("198.18.0.2", 4500), spi_out=0x1001, spi_in=0x2000),
    PassThroughRoute("10.80.2.128/25", ("198.18.0.2", 4500), spi_out=0x1003, spi_in=0x2001),
    PassThroughRoute("fd80:0:2::/64", ("198.18.0.2", 4500), spi_out=0x1005, spi_in=0x2002),
]


def test_frames_with_spi_and_sequence_and_back() -> None:
    out: PacketTransform = PassThroughTransform(ROUTES)
    packets = (
        udp_datagrams(2, dst="10.80.2.5")
        + udp_datagrams(1, dst="10.80.2.200")
        + udp_datagrams(1, v6=True, dst="fd80:0:2::9")
        + udp_datagrams(1, dst="10.99.0.1")
    )
    datagrams = out.outbound_batch(packets, 0.0)
    assert [(e, p[:8]) for e, p in datagrams] == [
        (("198.18.0.2", 4500), bytes.fromhex("0000100100000001")),
        (("198.18.0.2", 4500), bytes.fromhex("0000100100000002")),
        (("198.18.0.2", 4500), bytes.fromhex("0000100300000001")),
        (("198.18.0.2", 4500), bytes.fromhex("0000100500000001")),
    ]
    assert out.status()["drops"] == {"no_route": 1}
    back = PassThroughTransform([PassThroughRoute("10.80.1.0/24", ("198.18.0.1", 4500), spi_out=0x2000, spi_in=0x1001)])
    inner = back.inbound_batch(datagrams, 0.0)
    assert inner == packets[:2]
    assert back.drops["unknown_spi"] == 2


def test_owner_of_an_sa_is_its_inbound_spi_mod_workers() -> None:
    steering: SaSteering = PassThroughTransform(ROUTES, WorkerContext(1, 2))
    assert steering.outbound_worker(tcp_segments(1, dst="10.80.2.5")[0]) == 0x2000 % 2
    assert steering.outbound_worker(tcp_segments(1, dst="10.80.2.130")[0]) == 0x2001 % 2
    assert steering.outbound_worker(tcp_segments(1, dst="10.1.1.1")[0]) == -1
    assert steering.inbound_worker(0x1003) == 1
