"""tcpdump on a test-bed node's underlay, and a small reader of what it captured.

    with UnderlayCapture(node, path, "udp port 4500 or esp") as capture:
        ...traffic...
    capture.lossless         # tcpdump dropped nothing and wrote all it took (the tests require it)
    for packet in capture.ip_packets(): ...

The veth carries Ethernet frames; `ip_packets()` returns the IPv4/IPv6 packets inside,
`esp_headers()` the (source, SPI, sequence number, first 8 bytes after it) of every ESP
packet, whether plain (protocol 50) or ESP-in-UDP on 4500 (non-ESP-marker IKE left out).
"""

from __future__ import annotations

import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

from tests.conditions import ConditionTimeout, wait_until
from tests.netns_topology import Node

_PCAP_HEADER = struct.Struct("<IHHiIII")
_RECORD = struct.Struct("<IIII")
_PCAP_MAGIC = 0xA1B2C3D4
_LINKTYPE_ETHERNET = 1


class EspHeader(NamedTuple):
    source: str
    destination: str
    spi: int
    seq: int
    iv: bytes  # the 8 bytes after the sequence number: the explicit IV of AEAD transforms
    udp: bool


SENTINEL_PORT = 9  # discard: a datagram to it marks the end of what the test sent


class UnderlayCapture:
    """tcpdump on `interface`; on stop it sends a sentinel datagram out of the same interface and
    stops only once the sentinel is in the file, so everything sent before it was written."""

    def __init__(
        self, node: Node, path: Path, expression: str, interface: str = "ul0", peer: str = "", snaplen: int = 96
    ) -> None:
        self.node = node
        self.snaplen = snaplen
        self.path = path
        self.interface = interface
        self.peer = peer or (node.underlay_addr[:-1] + ("2" if node.underlay_addr.endswith("1") else "1"))
        self.expression = f"({expression}) or (src host {node.underlay_addr} and udp dst port {SENTINEL_PORT})"
        self.proc: subprocess.Popen[Any] | None = None
        self.dropped = -1
        self.complete = False
        self.sentinel_seen = False
        self.report = ""

    def __enter__(self) -> UnderlayCapture:
        self.proc = self.node.popen(
            # -B: 64 MiB of capture buffer; -s 96: headers are all we read; -U: write as it goes
            [
                "tcpdump",
                "-i",
                self.interface,
                "-n",
                "--immediate-mode",
                "-B",
                "65536",
                "-s",
                str(self.snaplen),
                "-U",
                "-w",
                str(self.path),
                self.expression,
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        deadline = time.monotonic() + 10
        while "listening on" not in line and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"tcpdump exited: {line}")
            line = self.proc.stderr.readline()
        assert "listening on" in line, line
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _sentinel_written(self) -> bool:
        try:
            return any(self._is_sentinel(p) for p in self.ip_packets())
        except (AssertionError, struct.error):  # the file is still being written
            return False

    def _is_sentinel(self, packet: bytes) -> bool:
        ihl = (packet[0] & 0x0F) * 4
        return (
            packet[0] >> 4 == 4
            and packet[9] == 17
            and int.from_bytes(packet[ihl + 2 : ihl + 4], "big") == SENTINEL_PORT
        )

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        send = (
            "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
            f" s.bind(('{self.node.underlay_addr}', 0)); s.sendto(b'end of capture', ('{self.peer}', {SENTINEL_PORT}))"
        )
        for _ in range(5):  # the sentinel itself may be lost like any datagram: send it again
            self.node.run([sys.executable, "-c", send], timeout=10)
            try:
                wait_until(self._sentinel_written, timeout=3, what="the sentinel in the capture file")
                break
            except ConditionTimeout:
                continue
        self.sentinel_seen = self._sentinel_written()
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=20)
        self.report = err
        match = re.search(r"(\d+) packets? dropped by kernel", err)
        captured = re.search(r"(\d+) packets? captured", err)
        received = re.search(r"(\d+) packets? received by filter", err)
        self.dropped = int(match.group(1)) if match else -1
        self.complete = bool(captured and received and captured.group(1) == received.group(1))

    @property
    def lossless(self) -> bool:
        """The kernel dropped nothing, and everything up to the sentinel is in the file (what
        came after it, if anything, may still have been in tcpdump's ring at SIGINT)."""
        return self.dropped == 0 and self.sentinel_seen

    # -- reading --------------------------------------------------------------------------
    def frames(self) -> Iterator[bytes]:
        for _, frame in self.timed_frames():
            yield frame

    def timed_frames(self) -> Iterator[tuple[float, bytes]]:
        """(capture time, wall clock seconds; Ethernet frame) in capture order."""
        data = self.path.read_bytes()
        magic, _, _, _, _, _, linktype = _PCAP_HEADER.unpack_from(data)
        assert magic == _PCAP_MAGIC and linktype == _LINKTYPE_ETHERNET, (hex(magic), linktype)
        offset = _PCAP_HEADER.size
        while offset + _RECORD.size <= len(data):
            seconds, micros, captured, _ = _RECORD.unpack_from(data, offset)
            offset += _RECORD.size
            yield seconds + micros / 1e6, data[offset : offset + captured]
            offset += captured

    def ip_packets(self) -> Iterator[bytes]:
        for frame in self.frames():
            ethertype = int.from_bytes(frame[12:14], "big")
            if ethertype in (0x0800, 0x86DD):
                yield frame[14:]

    def esp_headers(self) -> Iterator[EspHeader]:
        for packet in self.ip_packets():
            if packet[0] >> 4 != 4:
                continue
            ihl = (packet[0] & 0x0F) * 4
            source = ".".join(str(b) for b in packet[12:16])
            destination = ".".join(str(b) for b in packet[16:20])
            protocol = packet[9]
            if protocol == 50:
                esp, udp = packet[ihl:], False
            elif protocol == 17 and int.from_bytes(packet[ihl + 2 : ihl + 4], "big") == 4500:
                esp, udp = packet[ihl + 8 :], True
                if len(esp) < 8 or esp[:4] == b"\x00\x00\x00\x00":
                    continue  # keep-alive or IKE
            else:
                continue
            if len(esp) >= 16:
                yield EspHeader(
                    source,
                    destination,
                    int.from_bytes(esp[0:4], "big"),
                    int.from_bytes(esp[4:8], "big"),
                    esp[8:16],
                    udp,
                )

    def cleartext_between(self, first: str, second: str) -> list[bytes]:
        """Captured IPv4 packets whose own addresses are these two (inner traffic in clear)."""
        wanted = {first, second}
        out = []
        for packet in self.ip_packets():
            if (
                packet[0] >> 4 == 4
                and {".".join(str(b) for b in packet[12:16]), ".".join(str(b) for b in packet[16:20])} == wanted
            ):
                out.append(packet)
        return out
