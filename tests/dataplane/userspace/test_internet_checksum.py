"""RFC 1071 sums against a word-by-word reference, RFC 1624 updates against recomputation."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from esplanade.dataplane.userspace.internet_checksum import (
    IPPROTO_UDP,
    checksum,
    incremental_update,
    l4_checksum,
    ones_sum,
    verifies,
)


def reference_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return total


@settings(max_examples=300)
@given(st.binary(min_size=0, max_size=200))
def test_sum_matches_reference_modulo_negative_zero(data: bytes) -> None:
    assert ones_sum(data) == reference_sum(data) % 0xFFFF


@settings(max_examples=300)
@given(st.binary(min_size=2, max_size=200).map(lambda b: b if len(b) % 2 == 0 else b + b"\x01"))
def test_a_packet_with_its_checksum_verifies(data: bytes) -> None:
    body = bytearray(data)
    body[0:2] = b"\x00\x00"
    body[0:2] = checksum(body).to_bytes(2, "big")
    assert verifies(body)
    body[-1] ^= 0x01
    assert not verifies(body)


def test_rfc1071_example() -> None:
    # RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum to ddf2
    assert ones_sum(bytes.fromhex("0001f203f4f5f6f7")) == 0xDDF2
    assert checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D


@settings(max_examples=300)
@given(st.binary(min_size=8, max_size=64).filter(lambda b: len(b) % 2 == 0), st.integers(0, 3), st.integers(0, 0xFFFF))
def test_incremental_update_equals_recomputation(data: bytes, word: int, new: int) -> None:
    body = bytearray(data)
    body[0:2] = b"\x00\x00"
    index = 2 + 2 * word
    if index + 2 > len(body):
        return
    old_checksum = checksum(body)
    old = int.from_bytes(body[index : index + 2], "big")
    body[index : index + 2] = new.to_bytes(2, "big")
    updated = incremental_update(old_checksum, old, new)
    body[0:2] = updated.to_bytes(2, "big")
    assert verifies(body)


def test_udp_zero_checksum_is_sent_as_ffff() -> None:
    src, dst = bytes(4), bytes(4)
    # a segment whose sum with the pseudo-header is 0xFFFF -> checksum 0 -> transmitted as 0xFFFF
    segment = bytearray(8)
    pseudo = (IPPROTO_UDP + 8) % 0xFFFF
    segment[4:6] = (8).to_bytes(2, "big")
    segment[0:2] = (0xFFFF - pseudo - 8).to_bytes(2, "big")
    assert l4_checksum(src, dst, IPPROTO_UDP, bytes(segment)) == 0xFFFF
