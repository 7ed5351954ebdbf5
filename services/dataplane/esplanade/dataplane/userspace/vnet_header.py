"""The virtio_net_hdr that a TUN device with IFF_VNET_HDR puts before every packet.

Layout (include/uapi/linux/virtio_net.h, little-endian on every Linux host unless
TUNSETVNETBE is used, which we never do)::

    u8  flags        VIRTIO_NET_HDR_F_NEEDS_CSUM: checksum from csum_start, field at +csum_offset
    u8  gso_type     GSO_NONE, TCPV4, UDP (UFO, obsolete), TCPV6, UDP_L4 (USO); | ECN
    u16 hdr_len      bytes of headers (L2..L4) before the payload that is segmented
    u16 gso_size     payload bytes per segment
    u16 csum_start   offset where checksumming starts (the L4 header)
    u16 csum_offset  offset of the checksum field from csum_start (TCP 16, UDP 6)

Reading the TUN yields this header followed by one IP packet (possibly a GSO super-packet
when offloads were negotiated); writing takes the same. A "plain" header is ten zero bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

VNET_HDR_LEN = 10

VIRTIO_NET_HDR_F_NEEDS_CSUM = 0x01
VIRTIO_NET_HDR_F_DATA_VALID = 0x02

GSO_ECN_BIT = 0x80

TCP_CSUM_OFFSET = 16
UDP_CSUM_OFFSET = 6

_HDR = struct.Struct("<BBHHHH")

PLAIN_VNET_HDR = bytes(VNET_HDR_LEN)


class GsoType(IntEnum):
    NONE = 0
    TCPV4 = 1
    UDP = 3  # UFO: IP fragmentation offload of UDP, gone from modern kernels
    TCPV6 = 4
    UDP_L4 = 5  # USO: one UDP datagram per segment (kernel 6.2+ for TUN)


class VnetHeaderError(ValueError):
    """A virtio_net_hdr that cannot be honoured (short, unknown GSO type, offsets outside the packet)."""


@dataclass(frozen=True, slots=True)
class VnetHeader:
    flags: int = 0
    gso_type: GsoType = GsoType.NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    ecn: bool = False

    @property
    def needs_csum(self) -> bool:
        return bool(self.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM)

    @property
    def is_gso(self) -> bool:
        return self.gso_type != GsoType.NONE

    def pack(self) -> bytes:
        return _HDR.pack(
            self.flags,
            int(self.gso_type) | (GSO_ECN_BIT if self.ecn else 0),
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
        )

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> VnetHeader:
        if len(data) < VNET_HDR_LEN:
            raise VnetHeaderError(f"virtio_net_hdr needs {VNET_HDR_LEN} bytes, got {len(data)}")
        flags, raw_type, hdr_len, gso_size, csum_start, csum_offset = _HDR.unpack_from(data)
        try:
            gso_type = GsoType(raw_type & ~GSO_ECN_BIT)
        except ValueError:
            raise VnetHeaderError(f"unknown GSO type {raw_type:#x}") from None
        return cls(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, bool(raw_type & GSO_ECN_BIT))


def pack_gso_header(gso_type: GsoType, hdr_len: int, gso_size: int, csum_start: int, csum_offset: int) -> bytes:
    """A header for a super-packet whose L4 checksum field holds only the pseudo-header sum."""
    return _HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, int(gso_type), hdr_len, gso_size, csum_start, csum_offset)
