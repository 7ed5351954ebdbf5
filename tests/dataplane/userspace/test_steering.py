"""SPI steering in the kernel: SO_REUSEPORT CBPF for UDP/4500, per-worker filters on raw ESP sockets."""

from __future__ import annotations

import socket

import pytest

from esplanade.dataplane.userspace.outer_transport import OuterTransport
from esplanade.dataplane.userspace.raw_esp import RawEspSettings, RawEspSocket
from esplanade.dataplane.userspace.socket_filters import raw_esp_spi_program, reuseport_spi_program
from esplanade.dataplane.userspace.udp_socket import EspUdpSocket, UdpSocketSettings
from tests.conditions import wait_until
from tests.netns_topology import inside_netns

pytestmark = pytest.mark.netns

SPIS = [*range(0x100, 0x100 + 24), 0xFFFFFFFF, 0x12345678]


def _esp(spi: int) -> bytes:
    return spi.to_bytes(4, "big") + b"\x00\x00\x00\x01" + b"payload"


def _drain(rooms: list[OuterTransport], total: int) -> list[list[int]]:
    seen: list[list[int]] = [[] for _ in rooms]

    def complete() -> bool:
        for index, room in enumerate(rooms):
            seen[index].extend(int.from_bytes(p[:4], "big") for _, p in room.recv_batch(64))
        return sum(map(len, seen)) >= total

    wait_until(complete, timeout=5, what=f"{total} ESP packets")
    return seen


def test_programs_are_what_the_docstring_says() -> None:
    assert reuseport_spi_program(3) == [(0x20, 0, 0, 0), (0x94, 0, 0, 3), (0x16, 0, 0, 0)]
    assert raw_esp_spi_program(2, 1)[0] == (0xB1, 0, 0, 0)
    with pytest.raises(ValueError):
        raw_esp_spi_program(2, 2)


@pytest.mark.parametrize("workers", [2, 3])
def test_reuseport_group_steers_each_spi_to_socket_spi_mod_n(scratch: str, workers: int) -> None:
    with inside_netns(scratch):
        rooms = [
            EspUdpSocket.open(UdpSocketSettings(bind_address="127.0.0.1", reuseport=True, gro=False))
            for _ in range(workers)
        ]
        rooms[-1].attach_spi_steering(workers)
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for spi in SPIS:
            sender.sendto(_esp(spi), ("127.0.0.1", 4500))
        sender.sendto(b"\x00\x00\x00\x00ike", ("127.0.0.1", 4500))
        seen = _drain(list(rooms), len(SPIS))
        for index, spis in enumerate(seen):
            assert spis and all(spi % workers == index for spi in spis), (index, spis)
        assert sorted(s for spis in seen for s in spis) == sorted(SPIS)
        wait_until(lambda: rooms[0].recv_batch(8) == [] and bool(rooms[0].ike_inbox), timeout=5, what="IKE on socket 0")
    finally:
        for room in rooms:
            room.close()
        sender.close()


def test_raw_esp_sockets_each_keep_their_share(scratch: str) -> None:
    with inside_netns(scratch):
        rooms = [RawEspSocket.open(RawEspSettings()) for _ in range(2)]
        for index, room in enumerate(rooms):
            room.attach_spi_filter(2, index)
        sender = RawEspSocket.open(RawEspSettings())
        unfiltered = RawEspSocket.open(RawEspSettings())
    try:
        assert sender.send_batch([(("127.0.0.1", 0), _esp(spi)) for spi in SPIS]) == len(SPIS)
        seen = _drain(list(rooms), len(SPIS))
        assert all(spi % 2 == 0 for spi in seen[0]) and all(spi % 2 == 1 for spi in seen[1])
        assert sorted(seen[0] + seen[1]) == sorted(SPIS)
        # a socket without filter sees everything (that is why each worker needs its filter)
        everything = _drain([unfiltered], len(SPIS))[0]
        assert sorted(everything) == sorted(SPIS)
    finally:
        for room in [*rooms, sender, unfiltered]:
            room.close()
