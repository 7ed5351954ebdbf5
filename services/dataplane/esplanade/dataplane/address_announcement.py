"""Tell the segment that an address moved here: gratuitous ARP (IPv4) and unsolicited
neighbour advertisement (IPv6, RFC 4861 §7.2.6), as keepalived and CARP do on failover.

Neighbours that have the address cached (the upstream router, a peer on the same segment)
update their entry to our MAC at once instead of waiting for it to go stale, and switches
learn the new port from the frame's source. Sent from the current network namespace.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

ETH_P_ARP = 0x0806
BROADCAST = b"\xff" * 6


def gratuitous_arp_frame(mac: bytes, address: str) -> bytes:
    """An ARP request for our own address (RFC 5227 §3 "ARP Announcement")."""
    ip = ipaddress.IPv4Address(address).packed
    ethernet = BROADCAST + mac + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + ip + bytes(6) + ip
    return ethernet + arp


def unsolicited_na(mac: bytes, address: str) -> bytes:
    """ICMPv6 neighbour advertisement, Override set, target link-layer address option (checksum by the kernel)."""
    target = ipaddress.IPv6Address(address).packed
    flags = 0x20000000  # O (override); not a router, not solicited
    return struct.pack("!BBHI", 136, 0, 0, flags) + target + struct.pack("!BB", 2, 1) + mac


def announce(interface: str, mac: bytes, address: str) -> None:
    """Send one announcement of `address` on `interface` (errors are the caller's to count)."""
    if ipaddress.ip_address(address).version == 4:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as sock:
            sock.bind((interface, ETH_P_ARP))
            sock.send(gratuitous_arp_frame(mac, address))
        return
    with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as sock:
        index = socket.if_nametoindex(interface)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
        sock.bind((address, 0, 0, index))
        sock.sendto(unsolicited_na(mac, address), ("ff02::1", 0, 0, index))
