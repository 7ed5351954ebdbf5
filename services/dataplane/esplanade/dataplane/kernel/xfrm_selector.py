"""Traffic selectors as the kernel sees them: `struct xfrm_selector`.

An Esplanade `TrafficSelector` is an address *range*, a protocol and a port *range*. The
kernel's selector is one prefix per side, a protocol and one port/mask per side. So one
pair of traffic selectors becomes the cross product of

- the CIDR blocks that exactly cover each address range (`summarize_address_range`), and
- the aligned power-of-two blocks that exactly cover each port range (a port and a mask:
  the kernel matches `(port ^ sel.port) & sel.mask == 0`, so any prefix mask works).

Nothing is widened: the kernel selectors match exactly the packets the traffic selectors
match. `MAX_KERNEL_SELECTORS` caps the product; beyond it the request is refused
(`SelectorError`) rather than flooding the SPD.

ICMP and ICMPv6 carry type and code in the 16-bit "port" (type in the high byte, RFC 4301
§4.4.1.1); the kernel expects the type in `sport` and the code in `dport` (its flow keys
are `fl4_icmp_type`/`fl4_icmp_code`), as strongSwan's kernel-netlink arranges it. OPAQUE
ports (RFC 7296 §3.13.1) have no kernel equivalent and are refused.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from itertools import product
from typing import Any

from esplanade.ipsec.selectors import ANY_PROTOCOL, MAX_PORT, TrafficSelector

MAX_KERNEL_SELECTORS = 64
ICMP_PROTOCOLS = (1, 58)
AF_INET = socket.AF_INET
AF_INET6 = socket.AF_INET6


class SelectorError(ValueError):
    """A traffic selector the kernel cannot express (message says why)."""


def family_of(address: str) -> int:
    return AF_INET if ipaddress.ip_address(address).version == 4 else AF_INET6


def pack_address(address: str | None) -> bytes:
    """xfrm_address_t: 16 bytes, IPv4 in the first four; '' or None is the zero address."""
    if not address:
        return bytes(16)
    return ipaddress.ip_address(address).packed.ljust(16, b"\0")


def unpack_address(raw: bytes, family: int) -> str:
    if family == AF_INET:
        return str(ipaddress.IPv4Address(bytes(raw[:4])))
    if family == AF_INET6:
        return str(ipaddress.IPv6Address(bytes(raw[:16])))
    return ""


@dataclass(frozen=True, slots=True, order=True)
class XfrmSelector:
    """struct xfrm_selector with textual addresses; ports and masks in host order."""

    family: int
    saddr: str
    daddr: str
    prefixlen_s: int = 0
    prefixlen_d: int = 0
    proto: int = 0
    sport: int = 0
    sport_mask: int = 0
    dport: int = 0
    dport_mask: int = 0
    ifindex: int = 0

    @classmethod
    def unspecified(cls) -> XfrmSelector:
        """The all-zero selector (family AF_UNSPEC): tunnel-mode SAs carry this one."""
        return cls(family=0, saddr="", daddr="")

    @classmethod
    def any(cls, family: int) -> XfrmSelector:
        zero = "0.0.0.0" if family == AF_INET else "::"
        return cls(family=family, saddr=zero, daddr=zero)

    def to_fields(self, prefix: str) -> dict[str, Any]:
        return {
            f"{prefix}family": self.family,
            f"{prefix}saddr": pack_address(self.saddr),
            f"{prefix}daddr": pack_address(self.daddr),
            f"{prefix}prefixlen_s": self.prefixlen_s,
            f"{prefix}prefixlen_d": self.prefixlen_d,
            f"{prefix}proto": self.proto,
            f"{prefix}sport": self.sport,
            f"{prefix}sport_mask": self.sport_mask,
            f"{prefix}dport": self.dport,
            f"{prefix}dport_mask": self.dport_mask,
            f"{prefix}ifindex": self.ifindex,
            f"{prefix}user": 0,
        }

    @classmethod
    def from_fields(cls, msg: Any, prefix: str) -> XfrmSelector:
        family = int(msg[f"{prefix}family"])
        return cls(
            family=family,
            saddr=unpack_address(msg[f"{prefix}saddr"], family),
            daddr=unpack_address(msg[f"{prefix}daddr"], family),
            prefixlen_s=int(msg[f"{prefix}prefixlen_s"]),
            prefixlen_d=int(msg[f"{prefix}prefixlen_d"]),
            proto=int(msg[f"{prefix}proto"]),
            sport=int(msg[f"{prefix}sport"]),
            sport_mask=int(msg[f"{prefix}sport_mask"]),
            dport=int(msg[f"{prefix}dport"]),
            dport_mask=int(msg[f"{prefix}dport_mask"]),
            ifindex=int(msg[f"{prefix}ifindex"]),
        )

    def __str__(self) -> str:
        def side(addr: str, plen: int, port: int, mask: int) -> str:
            text = f"{addr}/{plen}"
            return f"{text}:{port}/{mask:#06x}" if mask else text

        proto = f" proto {self.proto}" if self.proto else ""
        return (
            f"{side(self.saddr, self.prefixlen_s, self.sport, self.sport_mask)} -> "
            f"{side(self.daddr, self.prefixlen_d, self.dport, self.dport_mask)}{proto}"
        )


def port_blocks(start: int, end: int) -> list[tuple[int, int]]:
    """(port, mask) pairs that exactly cover [start, end]; (0, 0) for any port."""
    if start == 0 and end == MAX_PORT:
        return [(0, 0)]
    blocks = []
    port = start
    while port <= end:
        size = port & -port if port else 1 << 16
        while port + size - 1 > end:
            size >>= 1
        blocks.append((port, (~(size - 1)) & 0xFFFF))
        port += size
    return blocks


def _icmp_blocks(start: int, end: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """((type, type_mask), (code, code_mask)) pairs for an ICMP type<<8|code range."""
    out = []
    for value, mask in port_blocks(start, end):
        out.append(((value >> 8, mask >> 8), (value & 0xFF, mask & 0xFF)))
    return out


def kernel_selectors(src: TrafficSelector, dst: TrafficSelector) -> list[XfrmSelector]:
    """The kernel selectors that together match exactly the packets src -> dst match."""
    if src.version != dst.version:
        raise SelectorError(f"selector pair mixes IPv{src.version} and IPv{dst.version}: {src} -> {dst}")
    if src.opaque_ports or dst.opaque_ports:
        raise SelectorError(f"OPAQUE ports cannot be expressed as a kernel selector: {src} -> {dst}")
    if src.protocol != ANY_PROTOCOL and dst.protocol != ANY_PROTOCOL and src.protocol != dst.protocol:
        raise SelectorError(f"selector pair names two protocols: {src} -> {dst}")
    family = AF_INET if src.version == 4 else AF_INET6
    proto = max(src.protocol, dst.protocol)
    src_nets, dst_nets = src.networks(), dst.networks()
    port_pairs: list[tuple[tuple[int, int], tuple[int, int]]]
    if proto in ICMP_PROTOCOLS:
        restricted = [ts for ts in (src, dst) if not ts.any_port]
        if len(restricted) == 2 and (src.start_port, src.end_port) != (dst.start_port, dst.end_port):
            raise SelectorError(f"both selectors restrict ICMP type/code differently: {src} -> {dst}")
        port_pairs = (
            _icmp_blocks(restricted[0].start_port, restricted[0].end_port) if restricted else [((0, 0), (0, 0))]
        )
    else:
        port_pairs = list(product(port_blocks(src.start_port, src.end_port), port_blocks(dst.start_port, dst.end_port)))
    count = len(src_nets) * len(dst_nets) * len(port_pairs)
    if count > MAX_KERNEL_SELECTORS:
        raise SelectorError(
            f"{src} -> {dst} needs {count} kernel selectors (more than {MAX_KERNEL_SELECTORS}):"
            " use CIDR-aligned address ranges and port ranges"
        )
    return [
        XfrmSelector(
            family=family,
            saddr=str(s.network_address),
            daddr=str(d.network_address),
            prefixlen_s=s.prefixlen,
            prefixlen_d=d.prefixlen,
            proto=proto,
            sport=sport,
            sport_mask=smask,
            dport=dport,
            dport_mask=dmask,
        )
        for s, d, ((sport, smask), (dport, dmask)) in product(src_nets, dst_nets, port_pairs)
    ]


def selector_matches(sel: XfrmSelector, src: str, dst: str, proto: int, sport: int, dport: int) -> bool:
    """The kernel's xfrm_selector_match() for one flow (used by tests and diagnostics)."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    bits = 32 if s.version == 4 else 128

    def in_prefix(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, net: str, plen: int) -> bool:
        if plen == 0:
            return True
        shift = bits - plen
        return int(addr) >> shift == int(ipaddress.ip_address(net)) >> shift

    return (
        in_prefix(s, sel.saddr, sel.prefixlen_s)
        and in_prefix(d, sel.daddr, sel.prefixlen_d)
        and not ((sport ^ sel.sport) & sel.sport_mask)
        and not ((dport ^ sel.dport) & sel.dport_mask)
        and (sel.proto == 0 or sel.proto == proto)
    )
