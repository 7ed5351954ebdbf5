from __future__ import annotations

import pytest

from esplanade.dataplane.userspace.vnet_header import (
    PLAIN_VNET_HDR,
    VNET_HDR_LEN,
    GsoType,
    VnetHeader,
    VnetHeaderError,
    pack_gso_header,
)


def test_roundtrip_and_layout() -> None:
    header = VnetHeader(
        flags=1, gso_type=GsoType.TCPV6, hdr_len=72, gso_size=1428, csum_start=40, csum_offset=16, ecn=True
    )
    packed = header.pack()
    assert len(packed) == VNET_HDR_LEN
    assert packed == bytes([1, 0x84]) + (72).to_bytes(2, "little") + (1428).to_bytes(2, "little") + (40).to_bytes(
        2, "little"
    ) + (16).to_bytes(2, "little")
    assert VnetHeader.unpack(packed) == header
    assert VnetHeader.unpack(PLAIN_VNET_HDR) == VnetHeader()
    assert pack_gso_header(GsoType.UDP_L4, 28, 64, 20, 6) == VnetHeader(1, GsoType.UDP_L4, 28, 64, 20, 6).pack()


def test_bad_headers_are_typed_errors() -> None:
    with pytest.raises(VnetHeaderError):
        VnetHeader.unpack(b"\x00" * 5)
    with pytest.raises(VnetHeaderError):
        VnetHeader.unpack(bytes([0, 9]) + bytes(8))
