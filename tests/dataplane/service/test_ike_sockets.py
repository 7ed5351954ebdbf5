"""The IKE sockets the dataplane process holds itself: port 500, and 4500 as the kernel backend
uses it (UDP_ENCAP_ESPINUDP: the kernel keeps ESP, IKE comes up behind the marker)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from esplanade.dataplane.ike_sockets import IkeSocket
from tests.conditions import async_wait_until
from tests.netns_topology import inside_netns, scratch_netns

pytestmark = [pytest.mark.netns]

MARKER = b"\x00\x00\x00\x00"


@pytest.fixture
def namespace() -> Iterator[str]:
    with scratch_netns("dps-") as name:
        yield name


async def test_kernel_mode_4500_strips_the_marker_and_never_passes_keepalives(namespace: str) -> None:
    arrived: list[tuple[str, int, str, int, bytes]] = []
    with inside_netns(namespace):
        natt = IkeSocket("127.0.0.1", 4500, lambda *args: arrived.append(args), esp_in_udp=True)
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        peer.bind(("127.0.0.1", 4600))
        peer.setblocking(False)
        peer.sendto(MARKER + b"ike-message", ("127.0.0.1", 4500))
        peer.sendto(b"\xff", ("127.0.0.1", 4500))
        peer.sendto(MARKER + b"second", ("127.0.0.1", 4500))
        await async_wait_until(lambda: _ready(len(arrived) == 2), timeout=5, what="two IKE messages")
        assert arrived == [
            ("127.0.0.1", 4500, "127.0.0.1", 4600, b"ike-message"),
            ("127.0.0.1", 4500, "127.0.0.1", 4600, b"second"),
        ]
        # the keep-alive between them was eaten by the kernel's ESP-in-UDP handler (RFC 3948 §2.3)
        assert await natt.send("127.0.0.1", "127.0.0.1", 4600, b"answer")
        data, source = await asyncio.get_running_loop().sock_recvfrom(peer, 2048)
        assert (data, source) == (MARKER + b"answer", ("127.0.0.1", 4500))
    finally:
        natt.close()
        peer.close()


async def test_port_500_passes_datagrams_as_they_are(namespace: str) -> None:
    arrived: list[tuple[str, int, str, int, bytes]] = []
    with inside_netns(namespace):
        ike = IkeSocket("0.0.0.0", 500, lambda *args: arrived.append(args))
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        peer.bind(("127.0.0.1", 5500))
        peer.setblocking(False)
        peer.sendto(b"\x00" * 28, ("127.0.0.1", 500))
        await async_wait_until(lambda: _ready(bool(arrived)), timeout=5, what="the datagram on 500")
        assert arrived == [("127.0.0.1", 500, "127.0.0.1", 5500, b"\x00" * 28)]  # local address from IP_PKTINFO
        assert await ike.send("127.0.0.1", "127.0.0.1", 5500, b"reply")
        data, source = await asyncio.get_running_loop().sock_recvfrom(peer, 2048)
        assert (data, source) == (b"reply", ("127.0.0.1", 500))
    finally:
        ike.close()
        peer.close()


async def _ready(value: bool) -> bool:
    return value
