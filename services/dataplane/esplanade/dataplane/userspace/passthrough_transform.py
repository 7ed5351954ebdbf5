"""DIAGNOSTIC AND TEST USE ONLY: a `PacketTransform` with no confidentiality and no integrity.

It frames each inner packet as SPI (4 bytes) + sequence number (4 bytes) + the packet, so
that the I/O rooms, SPI steering, MTU handling and multi-queue workers can be tested and
measured without the ESP engine, and so that a baseline shows what the rooms cost by
themselves. It checks nothing an attacker could not forge. Never configure it for traffic
that matters; `DatapathSettings` refuses it unless `diagnostic_transform` is set.

Routes map inner destination networks to (outer endpoint, outbound SPI); the inbound SPIs
it accepts are listed too. An SA here is the pair (inbound SPI, outbound SPI) of one route,
owned by the worker `SpiOwnership` names, and counted per SPI so tests can see who handled
what.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from esplanade.dataplane.backend import DataplaneEvent
from esplanade.dataplane.userspace.outer_transport import Datagram, Endpoint
from esplanade.dataplane.userspace.transform import WorkerContext

PASSTHROUGH_OVERHEAD = 8
_ROUTE_CACHE_LIMIT = 4096
_HEADER = struct.Struct("!II")


@dataclass(frozen=True, slots=True)
class PassThroughRoute:
    """Inner destinations in `network` leave for `endpoint` under `spi_out`; `spi_in` comes back."""

    network: str
    endpoint: Endpoint
    spi_out: int
    spi_in: int

    def to_document(self) -> dict[str, object]:
        return {
            "network": self.network,
            "endpoint": list(self.endpoint),
            "spi_out": self.spi_out,
            "spi_in": self.spi_in,
        }

    @classmethod
    def from_document(cls, doc: dict[str, object]) -> PassThroughRoute:
        endpoint = doc["endpoint"]
        if not isinstance(endpoint, list | tuple) or len(endpoint) != 2:
            raise ValueError("endpoint must be [address, port]")
        return cls(
            str(doc["network"]), (str(endpoint[0]), int(endpoint[1])), int(str(doc["spi_out"])), int(str(doc["spi_in"]))
        )


class _OutboundSa:
    __slots__ = ("endpoint", "packets", "seq", "spi")

    def __init__(self, route: PassThroughRoute) -> None:
        self.spi = route.spi_out
        self.endpoint = route.endpoint
        self.seq = 0
        self.packets = 0


class PassThroughTransform:
    """Implements `PacketTransform` and `SaSteering` (owner = inbound SPI mod worker count)."""

    diagnostic_only = True

    def __init__(self, routes: Sequence[PassThroughRoute], context: WorkerContext | None = None) -> None:
        self.context = context or WorkerContext(0, 1)
        self._sas = {r.spi_out: _OutboundSa(r) for r in routes}
        self.routes = [(ipaddress.ip_network(r.network), self._sas[r.spi_out]) for r in routes]
        self.routes.sort(key=lambda item: item[0].prefixlen, reverse=True)
        self._inbound: dict[int, list[int]] = {r.spi_in: [0] for r in routes}  # SPI -> [packets]
        self._owner_by_out = {r.spi_out: r.spi_in % self.context.count for r in routes}
        self._cache: dict[bytes, _OutboundSa | None] = {}
        self.drops: Counter[str] = Counter()

    @property
    def packets_out(self) -> dict[int, int]:
        return {sa.spi: sa.packets for sa in self._sas.values() if sa.packets}

    @property
    def packets_in(self) -> dict[int, int]:
        return {spi: count[0] for spi, count in self._inbound.items() if count[0]}

    def _route(self, packet: bytes) -> _OutboundSa | None:
        version = packet[0] >> 4 if packet else 0
        if version == 4 and len(packet) >= 20:
            dst = packet[16:20]
        elif version == 6 and len(packet) >= 40:
            dst = packet[24:40]
        else:
            return None
        try:
            return self._cache[dst]
        except KeyError:
            pass
        address = ipaddress.ip_address(dst)
        found = next((sa for net, sa in self.routes if address in net), None)
        if len(self._cache) >= _ROUTE_CACHE_LIMIT:
            self._cache.clear()
        self._cache[dst] = found
        return found

    # -- PacketTransform ------------------------------------------------------------------
    def outbound_batch(self, packets: Sequence[bytes], now: float) -> list[Datagram]:
        out: list[Datagram] = []
        append = out.append
        cache = self._cache
        pack = _HEADER.pack
        for packet in packets:
            sa = cache.get(packet[16:20]) if packet and packet[0] >> 4 == 4 else None
            if sa is None:
                sa = self._route(packet)
                if sa is None:
                    self.drops["no_route"] += 1
                    continue
            seq = sa.seq = sa.seq + 1
            sa.packets += 1
            append((sa.endpoint, pack(sa.spi, seq & 0xFFFFFFFF) + packet))
        return out

    def inbound_batch(self, datagrams: Sequence[Datagram], now: float) -> list[bytes]:
        out: list[bytes] = []
        append = out.append
        known = self._inbound
        unpack = _HEADER.unpack_from
        for _endpoint, payload in datagrams:
            counter = known.get(unpack(payload)[0]) if len(payload) >= 8 else None
            if counter is None:
                self.drops["unknown_spi"] += 1
                continue
            counter[0] += 1
            append(payload[8:])
        return out

    def get_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> list[Datagram]:
        return []

    def drain_events(self) -> list[DataplaneEvent]:
        return []

    def esp_overhead(self) -> int:
        return PASSTHROUGH_OVERHEAD

    def status(self) -> dict[str, object]:
        return {
            "transform": "passthrough (DIAGNOSTIC ONLY: no encryption, no integrity)",
            "packets_out": {str(k): v for k, v in self.packets_out.items()},
            "packets_in": {str(k): v for k, v in self.packets_in.items()},
            "drops": dict(self.drops),
        }

    # -- SaSteering -----------------------------------------------------------------------
    def outbound_worker(self, packet: bytes) -> int:
        sa = self._route(packet)
        return -1 if sa is None else self._owner_by_out[sa.spi]

    def inbound_worker(self, spi: int) -> int:
        return spi % self.context.count
