"""NETLINK_XFRM transport: requests with ACK, dumps, and multicast event groups.

Two sockets, as in strongSwan's kernel-netlink: `XfrmSocket` for request/response (the
kernel answers synchronously, so a blocking call under a lock is both simple and fast),
and `XfrmEventSocket`, non-blocking and bound to multicast groups (EXPIRE, ACQUIRE,
AEVENTS, ...), which the backend polls from its event loop.

Either socket can live in another network namespace: it is created there (through
pyroute2's netns support) and then used from this process like any other socket.

Errors come back as `XfrmNetlinkError` carrying the errno, the operation and the
kernel's extended-ACK message ("Requested AEAD algorithm not found"). Requests are sent
with NETLINK_CAP_ACK so that the kernel does not echo the request (and its keys) back in
error messages.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pyroute2.netlink import NETLINK_XFRM, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, nlmsg

from esplanade.dataplane.kernel.xfrm_messages import MESSAGE_CLASSES, XfrmGroup

SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4
NLM_F_CAPPED = 0x100
NLM_F_ACK_TLVS = 0x200
NLMSGERR_ATTR_MSG = 1
_NLMSGHDR = struct.Struct("=IHHII")
RECV_BUFFER = 1 << 18

SocketFactory = Callable[[str | None], socket.socket]


class XfrmNetlinkError(Exception):
    """The kernel refused a request (or the socket failed): errno plus the kernel's words."""

    def __init__(self, code: int, operation: str, kernel_message: str = "") -> None:
        self.errno = code
        self.operation = operation
        self.kernel_message = kernel_message
        super().__init__(str(self))

    @property
    def errno_name(self) -> str:
        return errno.errorcode.get(self.errno, f"errno {self.errno}")

    def __str__(self) -> str:
        text = f"{self.operation}: {self.errno_name} ({os.strerror(self.errno)})"
        return f"{text}: {self.kernel_message}" if self.kernel_message else text


@dataclass(frozen=True, slots=True)
class NetlinkHeader:
    length: int
    type: int
    flags: int
    seq: int
    pid: int


def open_xfrm_socket(netns: str | None) -> socket.socket:
    """A raw NETLINK_XFRM socket in `netns` (None: this process's namespace)."""
    if netns is None:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_XFRM)
    from pyroute2.netns import create_socket  # forks a helper: only when a netns is asked for

    sock: socket.socket = create_socket(
        netns=netns, family=socket.AF_NETLINK, socket_type=socket.SOCK_RAW, proto=NETLINK_XFRM, flags=0
    )
    return sock


def iter_messages(data: bytes) -> Iterable[tuple[NetlinkHeader, bytes]]:
    """Split one datagram into (header, whole message bytes); stops at a malformed header."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        header = NetlinkHeader(*_NLMSGHDR.unpack_from(data, offset))
        if header.length < _NLMSGHDR.size or offset + header.length > len(data):
            return
        yield header, data[offset : offset + header.length]
        offset += (header.length + 3) & ~3


def decode_message(header: NetlinkHeader, raw: bytes) -> nlmsg | None:
    cls = MESSAGE_CLASSES.get(header.type)
    if cls is None:
        return None
    msg = cls(bytearray(raw))
    msg.decode()
    return msg


def parse_error(header: NetlinkHeader, raw: bytes) -> tuple[int, str]:
    """(errno, extended-ACK message) of an NLMSG_ERROR; errno 0 is an ACK."""
    (code,) = struct.unpack_from("=i", raw, _NLMSGHDR.size)
    message = ""
    if header.flags & NLM_F_ACK_TLVS and len(raw) >= _NLMSGHDR.size + 4 + _NLMSGHDR.size:
        (inner_length,) = struct.unpack_from("=I", raw, _NLMSGHDR.size + 4)
        offset = _NLMSGHDR.size + 4 + (_NLMSGHDR.size if header.flags & NLM_F_CAPPED else inner_length)
        offset = (offset + 3) & ~3
        while offset + 4 <= len(raw):
            length, kind = struct.unpack_from("=HH", raw, offset)
            if length < 4:
                break
            if kind & 0x3FFF == NLMSGERR_ATTR_MSG:
                message = raw[offset + 4 : offset + length].split(b"\0", 1)[0].decode("utf-8", "replace")
            offset += (length + 3) & ~3
    return -code, message


class XfrmSocket:
    """Request/response on NETLINK_XFRM. Thread-safe; every call blocks at most `timeout`."""

    def __init__(
        self,
        netns: str | None = None,
        *,
        timeout: float = 5.0,
        socket_factory: SocketFactory = open_xfrm_socket,
    ) -> None:
        self.netns = netns
        self._sock = socket_factory(netns)
        self._sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        self._sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self._sock.bind((0, 0))
        self._sock.settimeout(timeout)
        self._lock = threading.Lock()
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> XfrmSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self, msg: nlmsg, msg_type: int, *, flags: int = NLM_F_REQUEST | NLM_F_ACK, operation: str = ""
    ) -> list[nlmsg]:
        """Send one request and return the replies that came before its ACK."""
        return self._transact(msg, msg_type, flags | NLM_F_REQUEST | NLM_F_ACK, operation or f"xfrm msg {msg_type}")

    def dump(self, msg: nlmsg, msg_type: int, *, operation: str = "") -> list[nlmsg]:
        """Send a dump request and return every message up to NLMSG_DONE."""
        return self._transact(msg, msg_type, NLM_F_REQUEST | NLM_F_DUMP, operation or f"xfrm dump {msg_type}")

    def _transact(self, msg: nlmsg, msg_type: int, flags: int, operation: str) -> list[nlmsg]:
        with self._lock:
            self._seq = self._seq % 0x7FFFFFFF + 1
            seq = self._seq
            msg.reset()
            msg["header"] = {"type": msg_type, "flags": flags, "sequence_number": seq, "pid": 0}
            msg.encode()
            try:
                self._sock.send(bytes(msg.data))
            except OSError as exc:
                raise XfrmNetlinkError(exc.errno or errno.EIO, operation) from None
            replies: list[nlmsg] = []
            while True:
                try:
                    data = self._sock.recv(RECV_BUFFER)
                except TimeoutError:
                    raise XfrmNetlinkError(errno.ETIMEDOUT, operation, "no answer from the kernel") from None
                except OSError as exc:
                    raise XfrmNetlinkError(exc.errno or errno.EIO, operation) from None
                for header, raw in iter_messages(data):
                    if header.seq != seq:
                        continue  # a late answer to an earlier, abandoned request
                    if header.type == NLMSG_ERROR:
                        code, text = parse_error(header, raw)
                        if code:
                            raise XfrmNetlinkError(code, operation, text)
                        return replies
                    if header.type == NLMSG_DONE:
                        (code,) = struct.unpack_from("=i", raw, _NLMSGHDR.size) if len(raw) >= 20 else (0,)
                        if code < 0:
                            raise XfrmNetlinkError(-code, operation)
                        return replies
                    if header.type in (NLMSG_NOOP, NLMSG_OVERRUN):
                        continue
                    decoded = decode_message(header, raw)
                    if decoded is not None:
                        replies.append(decoded)


class XfrmEventSocket:
    """A non-blocking socket joined to XFRM multicast groups; `receive()` drains it."""

    def __init__(
        self,
        netns: str | None = None,
        groups: Iterable[XfrmGroup] = (XfrmGroup.ACQUIRE, XfrmGroup.EXPIRE),
        *,
        socket_factory: SocketFactory = open_xfrm_socket,
    ) -> None:
        self.netns = netns
        self.groups = tuple(groups)
        self.overruns = 0  # times the kernel dropped events because we read too slowly
        self._sock = socket_factory(netns)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        self._sock.bind((0, 0))
        for group in self.groups:
            self._sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, int(group))
        self._sock.setblocking(False)

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def receive(self) -> list[tuple[int, nlmsg]]:
        """Every (message type, message) that is waiting; never blocks."""
        out: list[tuple[int, nlmsg]] = []
        while True:
            try:
                data, (pid, _groups) = self._sock.recvfrom(RECV_BUFFER)
            except BlockingIOError:
                return out
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.overruns += 1
                    continue
                raise
            if pid != 0:
                continue  # only the kernel speaks on these groups
            for header, raw in iter_messages(data):
                decoded = decode_message(header, raw)
                if decoded is not None:
                    out.append((header.type, decoded))
