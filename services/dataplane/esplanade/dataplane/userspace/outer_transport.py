"""What the worker loop needs from a socket that carries ESP on the outer network.

Two implementations: `udp_socket.EspUdpSocket` (ESP-in-UDP, RFC 3948, port 4500, with UDP
GSO/GRO) and `raw_esp.RawEspSocket` (plain ESP, IP protocol 50). Both are batched.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple, Protocol

# An outer address: (IP address text, UDP port). The port is 0 for plain ESP.
Endpoint = tuple[str, int]
# One ESP packet as it crossed the outer network: who sent it and the ESP bytes (SPI first).
Datagram = tuple[Endpoint, bytes]


class IkeArrival(NamedTuple):
    """An IKE message that arrived on the ESP-in-UDP socket (non-ESP marker removed)."""

    remote: Endpoint
    payload: bytes
    local_addr: str  # the address it was sent to ("" when the socket cannot tell)
    local_port: int


class OuterTransport(Protocol):
    drops: Counter[str]

    def fileno(self) -> int: ...

    def recv_batch(self, limit: int) -> list[Datagram]:
        """Up to `limit` ESP packets, without blocking; non-ESP traffic is set aside, not returned."""
        ...

    def send_batch(self, datagrams: list[Datagram]) -> int:
        """Send each ESP packet to its endpoint; return how many left. Failures are counted drops."""
        ...

    def take_ike(self) -> list[Datagram]:
        """IKE messages (non-ESP marker removed) that arrived on this socket since the last call."""
        ...

    def set_socket_option(self, level: int, name: int, value: int) -> None:
        """setsockopt on the underlying socket (outer DF policy); raises OSError when refused."""
        ...

    def status(self) -> dict[str, object]: ...

    def close(self) -> None: ...
