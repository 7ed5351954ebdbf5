"""Traffic selectors (RFC 7296 §3.13.1) and the narrowing arithmetic of §2.9.

A selector is an address range, an IP protocol (0 = any) and a port range. IKE puts lists
of them into TSi/TSr payloads; the SPD matches packets against them; the policy compiler
produces them per identity. All three use this one type.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from enum import IntEnum

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class TsType(IntEnum):
    IPV4_ADDR_RANGE = 7
    IPV6_ADDR_RANGE = 8


ANY_PROTOCOL = 0
MAX_PORT = 65535


@dataclass(frozen=True, slots=True, order=True)
class TrafficSelector:
    """One TS substructure: [start_addr, end_addr] x protocol x [start_port, end_port].

    For ICMP (1) and ICMPv6 (58) the "port" holds type in its high byte and code in its low
    byte (RFC 4301 §4.4.1.1); OPAQUE ports (start 65535, end 0) are represented as is.
    """

    start_addr: IPAddress
    end_addr: IPAddress
    protocol: int = ANY_PROTOCOL
    start_port: int = 0
    end_port: int = MAX_PORT

    def __post_init__(self) -> None:
        if self.start_addr.version != self.end_addr.version:
            raise ValueError("selector mixes IPv4 and IPv6 addresses")
        if int(self.start_addr) > int(self.end_addr):
            raise ValueError(f"selector address range {self.start_addr}-{self.end_addr} is empty")
        if not 0 <= self.protocol <= 255:
            raise ValueError(f"IP protocol {self.protocol} out of range")
        if not (0 <= self.start_port <= MAX_PORT and 0 <= self.end_port <= MAX_PORT):
            raise ValueError("port out of range")
        if self.start_port > self.end_port and not self.opaque_ports:
            raise ValueError(f"port range {self.start_port}-{self.end_port} is empty")

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_network(
        cls, cidr: str, protocol: int = ANY_PROTOCOL, start_port: int = 0, end_port: int = MAX_PORT
    ) -> TrafficSelector:
        net = ipaddress.ip_network(cidr, strict=False)
        return cls(net.network_address, net.broadcast_address, protocol, start_port, end_port)

    @classmethod
    def any(cls, version: int = 4) -> TrafficSelector:
        return cls.from_network("0.0.0.0/0" if version == 4 else "::/0")

    @classmethod
    def parse(cls, text: str) -> TrafficSelector:
        """Parse the swanctl-like form ``CIDR[proto/port]``, e.g. ``10.0.0.0/24[tcp/443]``.

        ``proto`` is a name (tcp, udp, icmp, icmpv6) or a number; ``port`` a number, a range
        ``a-b`` or empty for any port.
        """
        return _parse(text.strip())

    @classmethod
    def _parse_uncached(cls, text: str) -> TrafficSelector:
        proto, start, end = ANY_PROTOCOL, 0, MAX_PORT
        if text.endswith("]") and "[" in text:
            text, spec = text[:-1].split("[", 1)
            proto_s, _, port_s = spec.partition("/")
            proto = _parse_protocol(proto_s) if proto_s else ANY_PROTOCOL
            if port_s:
                lo, _, hi = port_s.partition("-")
                start = int(lo)
                end = int(hi) if hi else start
        if "-" in text and "/" not in text:
            lo_a, hi_a = text.split("-", 1)
            return cls(ipaddress.ip_address(lo_a), ipaddress.ip_address(hi_a), proto, start, end)
        return cls.from_network(text, proto, start, end)

    # -- properties ---------------------------------------------------------------------
    @property
    def ts_type(self) -> TsType:
        return TsType.IPV4_ADDR_RANGE if self.start_addr.version == 4 else TsType.IPV6_ADDR_RANGE

    @property
    def version(self) -> int:
        return self.start_addr.version

    @property
    def opaque_ports(self) -> bool:
        return self.start_port == MAX_PORT and self.end_port == 0

    @property
    def any_port(self) -> bool:
        return self.start_port == 0 and self.end_port == MAX_PORT

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """The CIDR blocks that exactly cover the address range (for routes)."""
        return list(_networks(self.start_addr, self.end_addr))

    # -- set arithmetic -----------------------------------------------------------------
    def contains(self, other: TrafficSelector) -> bool:
        """True if every packet matching `other` also matches `self`."""
        if self.version != other.version:
            return False
        if not (int(self.start_addr) <= int(other.start_addr) and int(other.end_addr) <= int(self.end_addr)):
            return False
        if self.protocol != ANY_PROTOCOL and self.protocol != other.protocol:
            return False
        if self.any_port:
            return True
        if other.opaque_ports or self.opaque_ports:
            return self.opaque_ports and other.opaque_ports
        return self.start_port <= other.start_port and other.end_port <= self.end_port

    def intersect(self, other: TrafficSelector) -> TrafficSelector | None:
        """The largest selector inside both, or None (RFC 7296 §2.9 narrowing of one pair)."""
        if self.version != other.version:
            return None
        lo = max(int(self.start_addr), int(other.start_addr))
        hi = min(int(self.end_addr), int(other.end_addr))
        if lo > hi:
            return None
        if self.protocol == ANY_PROTOCOL:
            proto = other.protocol
        elif other.protocol in (ANY_PROTOCOL, self.protocol):
            proto = self.protocol
        else:
            return None
        if self.opaque_ports or other.opaque_ports:
            if self.any_port or other.any_port or (self.opaque_ports and other.opaque_ports):
                sp, ep = MAX_PORT, 0
            else:
                return None
        else:
            sp, ep = max(self.start_port, other.start_port), min(self.end_port, other.end_port)
            if sp > ep:
                return None
        make = ipaddress.IPv4Address if self.version == 4 else ipaddress.IPv6Address
        return TrafficSelector(make(lo), make(hi), proto, sp, ep)

    def matches(self, addr: IPAddress, protocol: int, port: int) -> bool:
        """Does a packet's (address, protocol, port) fall inside this selector?

        `port` is the transport port, or ICMP type<<8|code; pass -1 for a packet without
        ports (e.g. a non-first fragment), which only an any-port selector matches.
        """
        if addr.version != self.version:
            return False
        if not int(self.start_addr) <= int(addr) <= int(self.end_addr):
            return False
        if self.protocol != ANY_PROTOCOL and self.protocol != protocol:
            return False
        if self.any_port:
            return True
        if port < 0:
            return False
        return self.start_port <= port <= self.end_port

    def __str__(self) -> str:
        return _render(self)

    def _render_uncached(self) -> str:
        nets = _networks(self.start_addr, self.end_addr)
        addr = str(nets[0]) if len(nets) == 1 else f"{self.start_addr}-{self.end_addr}"
        if self.protocol == ANY_PROTOCOL and self.any_port:
            return addr
        proto = _PROTOCOL_NAMES.get(self.protocol, str(self.protocol)) if self.protocol else ""
        if self.any_port:
            port = ""
        elif self.opaque_ports:
            port = "opaque"
        elif self.start_port == self.end_port:
            port = str(self.start_port)
        else:
            port = f"{self.start_port}-{self.end_port}"
        return f"{addr}[{proto}/{port}]"


# Selectors are immutable and a service sees the same few over and over (every record,
# policy and handoff of a connection names them): parsing, rendering and the CIDR cover are
# computed once per distinct value. Bounded, so a flood of distinct ones only evicts.
_CACHE_SIZE = 4096


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _parse(text: str) -> TrafficSelector:
    return TrafficSelector._parse_uncached(text)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _render(ts: TrafficSelector) -> str:
    return ts._render_uncached()


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _networks(start: IPAddress, end: IPAddress) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.summarize_address_range(start, end))


_PROTOCOL_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "ipv6-icmp", 132: "sctp"}
_PROTOCOL_NUMBERS = {v: k for k, v in _PROTOCOL_NAMES.items()} | {"icmpv6": 58, "any": 0}


def _parse_protocol(text: str) -> int:
    text = text.strip().lower()
    if text.isdigit():
        return int(text)
    try:
        return _PROTOCOL_NUMBERS[text]
    except KeyError:
        raise ValueError(f"unknown IP protocol {text!r}") from None


def narrow(proposed: list[TrafficSelector], allowed: list[TrafficSelector]) -> list[TrafficSelector]:
    """Narrow a peer's proposed selectors to what local policy allows (RFC 7296 §2.9).

    The result is every non-empty pairwise intersection, most specific first, without
    entries wholly contained in another.
    """
    out: list[TrafficSelector] = []
    for p in proposed:
        for a in allowed:
            x = a.intersect(p)
            if x is not None and x not in out:
                out.append(x)
    return [ts for ts in out if not any(o != ts and o.contains(ts) for o in out)]
