"""BENCHMARK STAND-IN ONLY: a minimal RFC 4106 AES-GCM ESP transform for the throughput harness.

It exists so the userspace datapath can be measured with real per-packet AEAD work before the
ESP engine (esplanade.dataplane.esp) is wired in. It writes and reads genuine RFC 4303/4106
tunnel-mode packets (SPI, sequence, 8-byte IV, padding to 4, pad length, next header, 16-byte
ICV, AAD = SPI + sequence), but has NO replay window, NO lifetimes, NO ESN, NO SPD beyond
"destination network -> SA", and a fixed key from the bench config. Never use it for traffic.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import Counter
from collections.abc import Sequence
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from esplanade.dataplane.backend import DataplaneEvent
from esplanade.dataplane.userspace.outer_transport import Datagram, Endpoint
from esplanade.dataplane.userspace.transform import WorkerContext

_HEADER = struct.Struct("!II")
_NEXT_HEADER = {4: 4, 6: 41}  # IPIP / IPv6 in tunnel mode
_PADS = [bytes(range(1, n + 1)) + bytes((n,)) for n in range(4)]  # RFC 4303 §2.4 monotonic padding + pad length


class _Sa:
    __slots__ = ("aead", "endpoint", "salt", "seq", "spi")

    def __init__(self, spi: int, key: bytes, salt: bytes, endpoint: Endpoint) -> None:
        self.spi = spi
        self.aead = AESGCM(key)
        self.salt = salt
        self.endpoint = endpoint
        self.seq = 0


class AesGcmStandInTransform:
    """Implements `PacketTransform` and `SaSteering`."""

    diagnostic_only = True

    def __init__(self, routes: list[dict[str, Any]], context: WorkerContext) -> None:
        self.context = context
        self.out: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, _Sa]] = []
        self.inbound: dict[int, _Sa] = {}
        self.owner: dict[int, int] = {}
        for route in routes:
            keymat_out = bytes.fromhex(route["keymat_out"])
            keymat_in = bytes.fromhex(route["keymat_in"])
            endpoint = (str(route["endpoint"][0]), int(route["endpoint"][1]))
            sa = _Sa(int(route["spi_out"]), keymat_out[:-4], keymat_out[-4:], endpoint)
            self.out.append((ipaddress.ip_network(route["network"]), sa))
            self.inbound[int(route["spi_in"])] = _Sa(int(route["spi_in"]), keymat_in[:-4], keymat_in[-4:], endpoint)
            self.owner[sa.spi] = int(route["spi_in"]) % context.count
        self.cache: dict[bytes, _Sa | None] = {}
        self.drops: Counter[str] = Counter()
        self.packets_in = 0
        self.packets_out = 0

    def _sa_for(self, packet: bytes) -> _Sa | None:
        version = packet[0] >> 4 if packet else 0
        if version == 4 and len(packet) >= 20:
            dst = packet[16:20]
        elif version == 6 and len(packet) >= 40:
            dst = packet[24:40]
        else:
            return None
        sa = self.cache.get(dst, False)
        if sa is False:
            address = ipaddress.ip_address(dst)
            sa = next((s for net, s in self.out if address in net), None)
            self.cache[dst] = sa
        return sa  # type: ignore[return-value]

    def outbound_batch(self, packets: Sequence[bytes], now: float) -> list[Datagram]:
        out: list[Datagram] = []
        pack = _HEADER.pack
        for packet in packets:
            sa = self._sa_for(packet)
            if sa is None:
                self.drops["no_sa"] += 1
                continue
            sa.seq += 1
            header = pack(sa.spi, sa.seq)
            iv = sa.seq.to_bytes(8, "big")
            trailer = _PADS[(-(len(packet) + 2)) % 4][:-1]
            plaintext = packet + trailer + bytes((len(trailer), _NEXT_HEADER.get(packet[0] >> 4, 4)))
            out.append((sa.endpoint, header + iv + sa.aead.encrypt(sa.salt + iv, plaintext, header)))
        self.packets_out += len(out)
        return out

    def inbound_batch(self, datagrams: Sequence[Datagram], now: float) -> list[bytes]:
        out: list[bytes] = []
        inbound = self.inbound
        for _endpoint, payload in datagrams:
            sa = inbound.get(int.from_bytes(payload[:4], "big"))
            if sa is None or len(payload) < 8 + 8 + 16 + 4:
                self.drops["unknown_spi_or_runt"] += 1
                continue
            try:
                plaintext = sa.aead.decrypt(sa.salt + payload[8:16], payload[16:], payload[:8])
            except InvalidTag:
                self.drops["icv"] += 1
                continue
            pad = plaintext[-2]
            out.append(plaintext[: -2 - pad])
        self.packets_in += len(out)
        return out

    def get_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> list[Datagram]:
        return []

    def drain_events(self) -> list[DataplaneEvent]:
        return []

    def esp_overhead(self) -> int:
        return 8 + 8 + 3 + 2 + 16  # header, IV, worst padding, trailer, ICV

    def status(self) -> dict[str, object]:
        return {
            "transform": "aes-gcm stand-in (BENCHMARK ONLY: no replay window)",
            "packets_out": self.packets_out,
            "packets_in": self.packets_in,
            "drops": dict(self.drops),
        }

    def outbound_worker(self, packet: bytes) -> int:
        sa = self._sa_for(packet)
        return -1 if sa is None else self.owner[sa.spi]

    def inbound_worker(self, spi: int) -> int:
        return spi % self.context.count


def make(context: WorkerContext, config: dict[str, Any]) -> AesGcmStandInTransform:
    """The factory the diagnostic runner calls in every worker (`transform: bench.aesgcm_standin:make`)."""
    return AesGcmStandInTransform(list(config["standin_routes"]), context)
