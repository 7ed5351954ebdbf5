"""The plain-ESP room: IP protocol 50 on a raw socket, for peers that are not behind NAT.

Receive: an IPv4 raw socket returns the IP header too (we strip IHL*4 bytes); an IPv6 raw
socket returns the ESP packet only. Every raw socket of the protocol sees every packet, so
with several workers each socket carries a classic BPF filter that keeps SPI mod n == its
index (`socket_filters.raw_esp_spi_program`).

Send: the kernel writes the outer IP header (protocol 50, source by route lookup); there is
no GSO for raw sockets, so this room costs one syscall per packet.

This host has no kernel ESP (CONFIG_INET_ESP off), so nothing else claims protocol 50.
Where kernel ESP exists and an XFRM state matches, the kernel would consume the packet too.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from collections import Counter
from dataclasses import dataclass

from esplanade.dataplane.userspace.outer_transport import Datagram, Endpoint
from esplanade.dataplane.userspace.socket_filters import SO_ATTACH_FILTER, attach, raw_esp_spi_program

IPPROTO_ESP = 50
MIN_ESP_BYTES = 8
SO_RCVBUFFORCE = 33


@dataclass(frozen=True, slots=True)
class RawEspSettings:
    bind_address: str = "0.0.0.0"
    buffer_bytes: int = 4 << 20
    send_timeout: float = 0.05


def _errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, "error").lower()


class RawEspSocket:
    """One raw ESP socket of a worker. Implements `OuterTransport`."""

    def __init__(self, sock: socket.socket, settings: RawEspSettings) -> None:
        self.sock = sock
        self.settings = settings
        self.v6 = sock.family == socket.AF_INET6
        self.drops: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()
        self._buf = bytearray(65536)
        self._view = memoryview(self._buf)
        self.steering = "none"

    @classmethod
    def open(cls, settings: RawEspSettings) -> RawEspSocket:
        family = socket.AF_INET6 if ipaddress.ip_address(settings.bind_address).version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_RAW | socket.SOCK_CLOEXEC, IPPROTO_ESP)
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, settings.buffer_bytes)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, settings.buffer_bytes)
            sock.setsockopt(
                socket.SOL_SOCKET,
                socket.SO_SNDTIMEO,
                struct.pack("ll", int(settings.send_timeout), int((settings.send_timeout % 1) * 1e6)),
            )
            if settings.bind_address not in ("0.0.0.0", "::"):
                sock.bind((settings.bind_address, 0))
        except BaseException:
            sock.close()
            raise
        return cls(sock, settings)

    def attach_spi_filter(self, groups: int, index: int) -> None:
        """Keep only ESP packets whose SPI mod `groups` is `index`."""
        attach(self.sock, SO_ATTACH_FILTER, raw_esp_spi_program(groups, index, ipv4_header=not self.v6))
        self.steering = f"cbpf spi%{groups}=={index}"

    def set_socket_option(self, level: int, name: int, value: int) -> None:
        self.sock.setsockopt(level, name, value)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def status(self) -> dict[str, object]:
        return {
            "kind": "raw_esp",
            "bound": self.settings.bind_address,
            "gso": False,
            "gro": False,
            "steering": self.steering,
            "drops": dict(self.drops),
            "counters": dict(self.counters),
        }

    def take_ike(self) -> list[Datagram]:
        return []  # IKE never arrives on protocol 50

    def recv_batch(self, limit: int) -> list[Datagram]:
        out: list[Datagram] = []
        recv = self.sock.recvfrom_into
        buf, view = self._buf, self._view
        v6 = self.v6
        attempts = 0
        while len(out) < limit and attempts <= limit:
            attempts += 1
            try:
                nbytes, address = recv(buf, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError as exc:
                self.drops[f"recv_{_errname(exc)}"] += 1
                continue
            start = 0 if v6 else (buf[0] & 0x0F) * 4
            if nbytes - start < MIN_ESP_BYTES:
                self.drops["runt"] += 1
                continue
            endpoint: Endpoint = (address[0], 0)
            out.append((endpoint, bytes(view[start:nbytes])))
        return out

    def send_batch(self, datagrams: list[Datagram]) -> int:
        sent = 0
        send = self.sock.sendto
        for endpoint, payload in datagrams:
            try:
                send(payload, (endpoint[0], 0))
                sent += 1
            except OSError as exc:  # EAGAIN/ENOBUFS under pressure, EMSGSIZE, EHOSTUNREACH
                self.drops[f"send_{_errname(exc)}"] += 1
        return sent
