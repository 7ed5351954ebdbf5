"""The UDP room: ESP-in-UDP (RFC 3948) on port 4500, batched, with UDP GSO and GRO.

Send: consecutive ESP packets for one endpoint of equal length (the last may be shorter)
leave in one sendmsg(2) with a UDP_SEGMENT control message; the kernel cuts them into
datagrams (in the NIC, or late in the stack). Receive: with UDP_GRO the kernel hands over
several datagrams of one 4-tuple glued together and says the segment size in a UDP_GRO
control message; we cut them apart again. Both were the largest pure-Python win measured.

Fallbacks, never crashes: a kernel that refuses UDP_GRO or UDP_SEGMENT keeps the plain
path; a GSO send that fails with EIO (the egress device cannot checksum) turns GSO off
for good, EINVAL (segment above the route MTU) resends that group one datagram at a time.
Every other send error is a counted drop.

Demultiplexing port 4500 (RFC 3948 §2.2): a payload starting with four zero bytes (the
non-ESP marker) is IKE and goes to `ike_inbox` for the key-exchange service; a single
0xFF byte is a NAT-keepalive and is counted; anything shorter than SPI+sequence is a runt.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from collections import Counter, deque
from dataclasses import dataclass

from esplanade.dataplane.fastpath.hot_path import load_compiled
from esplanade.dataplane.userspace.outer_transport import Datagram, Endpoint, IkeArrival
from esplanade.dataplane.userspace.socket_filters import SO_ATTACH_REUSEPORT_CBPF, attach, reuseport_spi_program

SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33

NAT_T_PORT = 4500
NON_ESP_MARKER = b"\x00\x00\x00\x00"
NAT_KEEPALIVE = b"\xff"
MIN_ESP_BYTES = 8  # SPI + sequence number

MAX_UDP_PAYLOAD = 65507
DEFAULT_GSO_SEGMENTS = 64  # UDP_MAX_SEGMENTS on every kernel since 4.18
IKE_INBOX_LIMIT = 1024

_GRO_CMSG_SPACE = socket.CMSG_SPACE(4)
# plain ints: the socket module's IntFlag members make every `&` a Python-level enum call
_MSG_TRUNC = int(socket.MSG_TRUNC)
_MSG_DONTWAIT = int(socket.MSG_DONTWAIT)
_PKTINFO_CMSG_SPACE = socket.CMSG_SPACE(20)  # in6_pktinfo (20) >= in_pktinfo (12)
_INT = struct.Struct("i")
_U16 = struct.Struct("H")
IP_PKTINFO = 8
IPV6_RECVPKTINFO = 49
IPV6_PKTINFO = 50


# A raw control message (level, type, data): IP_PKTINFO or IPV6_PKTINFO.
PacketInfo = tuple[int, int, bytes]
# A read `recv_gro` left to the caller: (offset in the buffer, bytes, GRO segment, sender, PKTINFO or None).
OddRead = tuple[int, int, int, Endpoint, PacketInfo | None]
GRO_READ_MAX = 1 << 16  # one UDP read, GRO batch or not: at most 64 KiB


def _local_from_cmsg(level: int, kind: int, data: bytes) -> str | None:
    if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
        return socket.inet_ntop(socket.AF_INET, data[8:12])  # ipi_addr: the header's destination
    if level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO and len(data) >= 16:
        address = socket.inet_ntop(socket.AF_INET6, data[:16])
        return address.removeprefix("::ffff:") if address.startswith("::ffff:") and "." in address else address
    return None


def pktinfo_cmsg(family: socket.AddressFamily, local: str) -> tuple[int, int, bytes] | None:
    """The control message that makes sendmsg use `local` as the source address (None: v4/v6 mismatch)."""
    try:
        if family == socket.AF_INET or (family == socket.AF_INET6 and "." in local):
            packed = socket.inet_pton(socket.AF_INET, local)
            if family == socket.AF_INET6:
                return (
                    socket.IPPROTO_IPV6,
                    IPV6_PKTINFO,
                    socket.inet_pton(socket.AF_INET6, "::ffff:" + local) + bytes(4),
                )
            return (socket.IPPROTO_IP, IP_PKTINFO, bytes(4) + packed + bytes(4))
        return (socket.IPPROTO_IPV6, IPV6_PKTINFO, socket.inet_pton(socket.AF_INET6, local) + bytes(4))
    except OSError:
        return None


@dataclass(frozen=True, slots=True)
class UdpSocketSettings:
    bind_address: str = "0.0.0.0"
    port: int = NAT_T_PORT
    gso: bool = True
    gro: bool = True
    reuseport: bool = False
    buffer_bytes: int = 4 << 20
    send_timeout: float = 0.05  # a send that waits longer than this for buffer space is a drop
    max_gso_segments: int = DEFAULT_GSO_SEGMENTS
    # Learn the local address of each datagram (IP_PKTINFO) so IKE messages relayed to
    # keyexchange say which address they reached (NAT detection hashes it, RFC 7296 §2.23).
    local_address_info: bool = False


def _family_of(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


def _errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, "error").lower()


class EspUdpSocket:
    """One UDP/4500 socket of a worker. Implements `OuterTransport`."""

    def __init__(self, sock: socket.socket, settings: UdpSocketSettings) -> None:
        self.sock = sock
        self.settings = settings
        self.gso = False
        self.gro = False
        self.gso_note = "not requested"
        self.gro_note = "not requested"
        self.max_segments = max(1, settings.max_gso_segments)
        self.drops: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()
        self.ike_inbox: deque[IkeArrival] = deque()
        self.local_info = False
        self._buf = bytearray(65536)
        self._view = memoryview(self._buf)
        self._sockaddrs: dict[Endpoint, bytes] = {}
        v6 = sock.family == socket.AF_INET6
        self._max_total = MAX_UDP_PAYLOAD + (20 if v6 else 0)  # the IPv6 payload length excludes its header
        self._dests: tuple[bytes | None, ...] = ()
        self._dests_of: list[Endpoint] | None = None

    # -- set-up ---------------------------------------------------------------------------
    @classmethod
    def open(cls, settings: UdpSocketSettings) -> EspUdpSocket:
        family = _family_of(settings.bind_address)
        sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            if settings.reuseport:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            room = cls(sock, settings)
            room._size_buffers(settings.buffer_bytes)
            sock.setsockopt(
                socket.SOL_SOCKET,
                socket.SO_SNDTIMEO,
                struct.pack("ll", int(settings.send_timeout), int((settings.send_timeout % 1) * 1e6)),
            )
            if settings.gro:
                room._enable_gro()
            if settings.gso:
                room._enable_gso()
            if settings.local_address_info:
                room._enable_pktinfo()
            sock.bind((settings.bind_address, settings.port))
        except BaseException:
            sock.close()
            raise
        return room

    def _size_buffers(self, size: int) -> None:
        for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, force, size)
            except OSError:  # EPERM without CAP_NET_ADMIN: the sysctl maximum applies
                try:
                    self.sock.setsockopt(socket.SOL_SOCKET, plain, size)
                except OSError:
                    self.counters["buffer_size_refused"] += 1

    def _enable_gro(self) -> None:
        try:
            self.sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        except OSError as exc:  # ENOPROTOOPT before 5.0
            self.gro_note = f"UDP_GRO refused: {_errname(exc)}"
            return
        self.gro, self.gro_note = True, "enabled"

    def _enable_gso(self) -> None:
        try:
            # probing with 0 leaves the per-send cmsg in charge of the segment size
            self.sock.setsockopt(SOL_UDP, UDP_SEGMENT, 0)
        except OSError as exc:  # ENOPROTOOPT before 4.18
            self.gso_note = f"UDP_SEGMENT refused: {_errname(exc)}"
            return
        self.gso, self.gso_note = True, "enabled"

    def _enable_pktinfo(self) -> None:
        try:
            if self.sock.family == socket.AF_INET6:
                self.sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
            else:
                self.sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        except OSError:
            self.counters["pktinfo_refused"] += 1
            return
        self.local_info = True

    def attach_spi_steering(self, group_size: int) -> None:
        """Steer the SO_REUSEPORT group this socket belongs to by SPI mod `group_size`."""
        attach(self.sock, SO_ATTACH_REUSEPORT_CBPF, reuseport_spi_program(group_size))

    def set_socket_option(self, level: int, name: int, value: int) -> None:
        self.sock.setsockopt(level, name, value)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def status(self) -> dict[str, object]:
        return {
            "kind": "udp",
            "bound": f"{self.settings.bind_address}:{self.settings.port}",
            "gso": self.gso,
            "gso_note": self.gso_note,
            "gro": self.gro,
            "gro_note": self.gro_note,
            "drops": dict(self.drops),
            "counters": dict(self.counters),
        }

    # -- receive --------------------------------------------------------------------------
    def recv_batch(self, limit: int) -> list[Datagram]:
        out: list[Datagram] = []
        recv = self.sock.recvmsg_into
        buffers = [self._buf]
        view = self._view
        gro_space = (_GRO_CMSG_SPACE if self.gro else 0) + (_PKTINFO_CMSG_SPACE if self.local_info else 0)
        calls = 0
        while len(out) < limit:
            try:
                nbytes, ancdata, msg_flags, address = recv(buffers, gro_space, _MSG_DONTWAIT)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError as exc:  # ECONNREFUSED et al. from queued ICMP errors: count, keep going
                self.drops[f"recv_{_errname(exc)}"] += 1
                calls += 1
                if calls > limit:
                    break
                continue
            calls += 1
            if msg_flags & _MSG_TRUNC:
                self.drops["recv_truncated"] += 1
                continue
            endpoint: Endpoint = (address[0], address[1])
            segment = nbytes
            local = ""
            for level, kind, data in ancdata:
                if level == SOL_UDP and kind == UDP_GRO and len(data) >= 4:
                    segment = _INT.unpack_from(data)[0] or nbytes
                else:
                    local = _local_from_cmsg(level, kind, data) or local
            if segment >= nbytes:
                self._classify(endpoint, bytes(view[:nbytes]), out, local)
                continue
            self.counters["gro_batches"] += 1
            append = out.append
            for offset in range(0, nbytes, segment):
                payload = bytes(view[offset : min(offset + segment, nbytes)])
                if len(payload) >= MIN_ESP_BYTES and not payload.startswith(NON_ESP_MARKER):
                    append((endpoint, payload))  # the common case, inline
                else:
                    self._classify(endpoint, payload, out, local)
        return out

    @staticmethod
    def local_address(pktinfo: PacketInfo | None) -> str:
        """The local address in a read's IP_PKTINFO / IPV6_PKTINFO control message, "" when unknown."""
        return _local_from_cmsg(*pktinfo) or "" if pktinfo is not None else ""

    def recv_gro(
        self, buf: bytearray, spans: bytearray, max_reads: int, accept: set[int]
    ) -> tuple[int, int, list[int], list[OddRead]]:
        """Up to `max_reads` reads in one compiled call (`_espfast.recv_gro`): the datagrams of
        every read that carries one SPI of `accept` become spans into `buf` (count, reads, their
        SPIs); the other reads stay in `buf` for the caller (`OddRead`s). Errors are counted drops."""
        module = load_compiled()[0]
        assert module is not None, "recv_gro runs with the compiled module only"
        fd = self.sock.fileno()
        count, reads, spis, odd, errnos = module.recv_gro(fd, buf, spans, max_reads, GRO_READ_MAX, accept)
        self.count_reads(count, reads, errnos)
        return count, reads, spis, odd

    def count_reads(self, count: int, reads: int, errnos: list[int]) -> None:
        """recv_gro's bookkeeping (also run after `_espfast.pump_in`)."""
        for err in errnos:
            reason = "truncated" if err == errno.EMSGSIZE else "runt" if not err else _errname(OSError(err, ""))
            self.drops[f"recv_{reason}" if err else "runt"] += 1
        if reads:
            self.counters["reads"] += reads
            self.counters["datagrams_whole"] += count

    def classify(self, endpoint: Endpoint, payload: bytes, out: list[Datagram], local: str = "") -> None:
        """ESP goes to `out`; IKE to the IKE inbox; keep-alives and runts are counted."""
        self._classify(endpoint, payload, out, local)

    def _classify(self, endpoint: Endpoint, payload: bytes, out: list[Datagram], local: str = "") -> None:
        if len(payload) >= MIN_ESP_BYTES and not payload.startswith(NON_ESP_MARKER):
            out.append((endpoint, payload))
        elif payload.startswith(NON_ESP_MARKER):
            if len(self.ike_inbox) >= IKE_INBOX_LIMIT:
                self.drops["ike_inbox_full"] += 1
            else:
                self.ike_inbox.append(IkeArrival(endpoint, payload[4:], local, self.settings.port))
        elif payload == NAT_KEEPALIVE:
            self.counters["nat_keepalives"] += 1
        else:
            self.drops["runt"] += 1

    def take_ike(self) -> list[Datagram]:
        return [(arrival.remote, arrival.payload) for arrival in self.take_ike_arrivals()]

    def take_ike_arrivals(self) -> list[IkeArrival]:
        """IKE messages since the last call, with the local address each reached."""
        if not self.ike_inbox:
            return []
        messages = list(self.ike_inbox)
        self.ike_inbox.clear()
        return messages

    def send_ike(self, endpoint: Endpoint, message: bytes, local: str | None = None) -> bool:
        """Send an IKE message on 4500 with the non-ESP marker (RFC 3948 §2.2), from `local` if given.

        The single byte 0xFF is a NAT keep-alive (RFC 3948 §2.3) and goes out as it is."""
        marker = b"" if message == NAT_KEEPALIVE else NON_ESP_MARKER
        if not local:
            return self._send_one(endpoint, marker + message)
        cmsg = pktinfo_cmsg(self.sock.family, local)
        if cmsg is None:
            self.drops["ike_bad_local_address"] += 1
            return False
        try:
            self.sock.sendmsg([marker, message], [cmsg], 0, endpoint)
            self.counters["ike_sent"] += 1
            return True
        except OSError as exc:
            self.drops[f"ike_send_{_errname(exc)}"] += 1
            return False

    # -- send -----------------------------------------------------------------------------
    def send_batch(self, datagrams: list[Datagram]) -> int:
        if not self.gso:
            return sum(1 for endpoint, payload in datagrams if self._send_one(endpoint, payload))
        sent = 0
        n = len(datagrams)
        i = 0
        max_segments, max_total = self.max_segments, self._max_total
        while i < n:
            endpoint, payload = datagrams[i]
            size = len(payload)
            total = size
            j = i + 1
            stop = min(n, i + max_segments)
            while j < stop:
                next_endpoint, next_payload = datagrams[j]
                length = len(next_payload)
                if length > size or next_endpoint != endpoint or total + length > max_total:
                    break
                total += length
                j += 1
                if length < size:
                    break
            if j - i == 1:
                sent += self._send_one(endpoint, payload)
            else:
                sent += self._send_segmented(datagrams, i, j, size)
            i = j
        return sent

    @property
    def max_gso_bytes(self) -> int:
        return self._max_total

    def sockaddr(self, endpoint: Endpoint) -> bytes | None:
        """`endpoint` packed as this socket's sockaddr (IPv4 v4-mapped on a dual-stack socket),
        None for port 0 (plain ESP: another room's). Cached."""
        packed = self._sockaddrs.get(endpoint)
        if packed is None and endpoint[1]:
            host, port = endpoint
            if self.sock.family == socket.AF_INET6:
                v4 = "." in host
                address = socket.inet_pton(socket.AF_INET6, "::ffff:" + host if v4 else host)
                packed = struct.pack("=H", socket.AF_INET6) + port.to_bytes(2, "big") + bytes(4) + address + bytes(4)
            else:
                address = socket.inet_pton(socket.AF_INET, host)
                packed = struct.pack("=H", socket.AF_INET) + port.to_bytes(2, "big") + address + bytes(8)
            if len(self._sockaddrs) >= 4096:
                self._sockaddrs.clear()
            self._sockaddrs[endpoint] = packed
        return packed

    def send_payloads(
        self, data: bytearray, spans: bytearray, count: int, endpoints: list[Endpoint]
    ) -> tuple[int, list[Datagram]]:
        """Send a batch of ESP payloads (tags: index into `endpoints`) in one compiled call: one
        sendmsg(UDP_SEGMENT) per GSO run. Returns (payloads sent, plain-ESP datagrams for the raw
        room). A refused GSO send falls back as `send_batch` does (EIO: GSO off; EINVAL,
        EMSGSIZE: one by one); other failures are counted drops."""
        module = load_compiled()[0]
        assert module is not None, "send_payloads runs with the compiled module only"
        dests = self.destinations(endpoints)
        sent, sends, aside = module.send_runs(
            self.sock.fileno(), data, spans, count, dests, self.gso, self.max_segments, self._max_total
        )
        return self.settle_runs(data, sent, sends, aside, endpoints)

    def destinations(self, endpoints: list[Endpoint]) -> tuple[bytes | None, ...]:
        """send_runs' `dests` for a list of slot endpoints (remembered for the last list seen: the
        compiled lane replaces its list whenever its slots change)."""
        if endpoints is not self._dests_of:
            self._dests = tuple(self.sockaddr(e) for e in endpoints)
            self._dests_of = endpoints
        return self._dests

    def settle_runs(
        self,
        data: bytearray,
        sent: int,
        sends: int,
        aside: list[tuple[int, int, int, int, int, int]],
        endpoints: list[Endpoint],
    ) -> tuple[int, list[Datagram]]:
        """The Python side of send_runs (also run after `_espfast.pump_out`): GSO counters, the
        fallbacks of refused GSO sends and the plain-ESP runs for the raw room."""
        self.counters["gso_sends"] += sends if self.gso else 0
        plain: list[Datagram] = []
        view = memoryview(data)
        for offset, length, segment, n, tag, err in aside:
            run = view[offset : offset + length]
            endpoint = endpoints[tag]
            if not err:  # plain ESP
                plain.extend((endpoint, bytes(run[at : at + segment])) for at in range(0, length, segment))
                continue
            if err == errno.EIO:
                self.gso = False
                self.gso_note = "disabled after EIO: the egress device cannot checksum UDP GSO"
            elif err not in (errno.EINVAL, errno.EMSGSIZE) or n == 1:
                self.drops[f"send_{errno.errorcode.get(err, 'error').lower()}"] += n
                continue
            self.counters[f"gso_fallback_{errno.errorcode.get(err, 'error').lower()}"] += 1
            sent += sum(1 for at in range(0, length, segment) if self._send_one(endpoint, run[at : at + segment]))
        return sent, plain

    def send_run(self, run: memoryview, segment: int, count: int, endpoint: Endpoint) -> int:
        """Send `count` ESP packets lying back to back in `run` (each `segment` bytes but a shorter
        last one) to one endpoint: one sendmsg with UDP_SEGMENT, or one per packet without GSO."""
        if count > 1 and self.gso:
            try:
                self.sock.sendmsg([run], [(SOL_UDP, UDP_SEGMENT, _U16.pack(segment))], 0, endpoint)
                self.counters["gso_sends"] += 1
                return count
            except OSError as exc:
                code = exc.errno
                if code == errno.EIO:
                    self.gso = False
                    self.gso_note = "disabled after EIO: the egress device cannot checksum UDP GSO"
                elif code not in (errno.EINVAL, errno.EMSGSIZE, errno.EINTR):
                    self.drops[f"send_{_errname(exc)}"] += count
                    return 0
                self.counters[f"gso_fallback_{_errname(exc)}"] += 1
        if count == 1:
            return int(self._send_one(endpoint, run))
        return sum(1 for at in range(0, len(run), segment) if self._send_one(endpoint, run[at : at + segment]))

    def _send_one(self, endpoint: Endpoint, payload: bytes | memoryview) -> bool:
        try:
            self.sock.sendto(payload, endpoint)
            return True
        except InterruptedError:
            return self._retry_one(endpoint, payload)
        except OSError as exc:  # EAGAIN (send timeout), ENOBUFS, EMSGSIZE, EHOSTUNREACH, ...
            self.drops[f"send_{_errname(exc)}"] += 1
            return False

    def _retry_one(self, endpoint: Endpoint, payload: bytes | memoryview) -> bool:
        try:
            self.sock.sendto(payload, endpoint)
            return True
        except OSError as exc:
            self.drops[f"send_{_errname(exc)}"] += 1
            return False

    def _send_segmented(self, datagrams: list[Datagram], start: int, stop: int, size: int) -> int:
        endpoint = datagrams[start][0]
        buffers = [payload for _, payload in datagrams[start:stop]]
        try:
            self.sock.sendmsg(buffers, [(SOL_UDP, UDP_SEGMENT, _U16.pack(size))], 0, endpoint)
            self.counters["gso_sends"] += 1
            return stop - start
        except OSError as exc:
            code = exc.errno
            if code == errno.EIO:
                self.gso = False
                self.gso_note = "disabled after EIO: the egress device cannot checksum UDP GSO"
            elif code not in (errno.EINVAL, errno.EMSGSIZE, errno.EINTR):
                self.drops[f"send_{_errname(exc)}"] += stop - start
                return 0
            self.counters[f"gso_fallback_{_errname(exc)}"] += 1
        return sum(1 for payload in buffers if self._send_one(endpoint, payload))
