"""UDP sockets the dataplane process itself holds for IKE: port 500, and port 4500 with the kernel backend.

`IkeSocket` reads with IP_PKTINFO (so a relayed datagram says which local address it
reached; NAT detection hashes it, RFC 7296 §2.23) and sends from a chosen local address.
Both are exempt from IPsec policies (`bypass_ipsec`, where XFRM exists), as strongSwan's
`bypass_socket()` does, so IKE between gateways is never caught by a policy that protects
their own addresses.

With the kernel backend the 4500 socket also gets UDP_ENCAP_ESPINUDP: the kernel takes
ESP-in-UDP off it and passes up what starts with the non-ESP marker (IKE, marker kept:
removed here) and NAT keep-alives (counted, dropped) (RFC 3948). With the userspace
backend the workers own 4500 instead (`userspace.udp_socket`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
from collections import Counter
from collections.abc import Callable

from esplanade.dataplane.kernel.socket_options import bypass_ipsec, enable_esp_in_udp
from esplanade.dataplane.userspace.udp_socket import IP_PKTINFO, IPV6_RECVPKTINFO, pktinfo_cmsg

log = logging.getLogger(__name__)

NON_ESP_MARKER = b"\x00\x00\x00\x00"
MAX_DATAGRAM = 65535
_CMSG_SPACE = socket.CMSG_SPACE(20)

# (local addr, local port, remote addr, remote port, IKE message)
IkeReceiver = Callable[[str, int, str, int, bytes], None]


def _local_address(ancdata: list[tuple[int, int, bytes]]) -> str:
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            return socket.inet_ntop(socket.AF_INET, data[8:12])
        if level == socket.IPPROTO_IPV6 and kind == 50 and len(data) >= 16:  # IPV6_PKTINFO
            address = socket.inet_ntop(socket.AF_INET6, data[:16])
            return address[7:] if address.startswith("::ffff:") and "." in address else address
    return ""


class IkeSocket:
    def __init__(
        self,
        bind_address: str,
        port: int,
        receiver: IkeReceiver,
        *,
        esp_in_udp: bool = False,
        bypass: bool = True,
    ) -> None:
        self.port = port
        self.receiver = receiver
        self.esp_in_udp = esp_in_udp
        self.counters: Counter[str] = Counter()
        v6 = ipaddress.ip_address(bind_address).version == 6
        self.sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if v6:
                self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                self.sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
            else:
                self.sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            if bypass:
                try:
                    bypass_ipsec(self.sock)
                except OSError as exc:  # no XFRM in this kernel: there are no policies to bypass either
                    self.counters[f"bypass_{errno.errorcode.get(exc.errno or 0, 'error').lower()}"] += 1
            if esp_in_udp:
                enable_esp_in_udp(self.sock)
            self.sock.bind((bind_address, port))
            self.sock.setblocking(False)
        except BaseException:
            self.sock.close()
            raise
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        for _ in range(64):
            try:
                data, ancdata, flags, address = self.sock.recvmsg(MAX_DATAGRAM, _CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # queued ICMP errors (ECONNREFUSED) and the like
                self.counters[f"recv_{errno.errorcode.get(exc.errno or 0, 'error').lower()}"] += 1
                continue
            if flags & socket.MSG_TRUNC:
                self.counters["truncated"] += 1
                continue
            remote = address[0]
            if remote.startswith("::ffff:") and "." in remote:
                remote = remote[7:]
            if self.esp_in_udp:
                if data == b"\xff":
                    self.counters["nat_keepalives"] += 1
                    continue
                if not data.startswith(NON_ESP_MARKER):
                    self.counters["esp_not_taken_by_kernel"] += 1
                    continue
                data = data[4:]
            self.counters["received"] += 1
            try:
                self.receiver(_local_address(ancdata), self.port, remote, address[1], data)
            except Exception:
                log.exception("IKE receiver failed")

    async def send(self, local_addr: str, remote_addr: str, remote_port: int, payload: bytes) -> bool:
        # on 4500: the non-ESP marker before IKE; a NAT keep-alive (0xFF) goes as it is (RFC 3948)
        buffers = [NON_ESP_MARKER, payload] if self.esp_in_udp and payload != b"\xff" else [payload]
        cmsgs = []
        if local_addr and local_addr not in ("0.0.0.0", "::"):
            cmsg = pktinfo_cmsg(self.sock.family, local_addr)
            if cmsg is None:
                self.counters["send_bad_local_address"] += 1
                return False
            cmsgs.append(cmsg)
        destination = remote_addr
        if self.sock.family == socket.AF_INET6 and "." in remote_addr:
            destination = "::ffff:" + remote_addr
        try:
            self.sock.sendmsg(buffers, cmsgs, 0, (destination, remote_port))
        except OSError as exc:
            self.counters[f"send_{errno.errorcode.get(exc.errno or 0, 'error').lower()}"] += 1
            return False
        self.counters["sent"] += 1
        return True

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
