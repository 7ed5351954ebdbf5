"""The Internet checksum (RFC 1071) and its incremental update (RFC 1624).

The one's-complement sum of 16-bit words equals the big-endian integer of the data modulo
0xFFFF (because 0x10000 = 1 mod 0xFFFF), which CPython computes far faster than a loop over
words. The only subtlety is zero: a sum over data that is not all zero is "negative zero"
(0xFFFF) in one's-complement arithmetic, never 0x0000.
"""

from __future__ import annotations

_FOLD = 0xFFFF


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """The 16-bit one's-complement sum of `data` (odd lengths are padded with a zero byte)."""
    n = int.from_bytes(data, "big")
    if len(data) & 1:
        n <<= 8
    s = n % _FOLD
    if s == 0 and n != 0:
        return _FOLD
    return s


def fold(total: int) -> int:
    """Reduce a sum of several `ones_sum` results (or raw words) to 16 bits."""
    s = total % _FOLD
    if s == 0 and total != 0:
        return _FOLD
    return s


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The Internet checksum of `data`, with `initial` (e.g. a pseudo-header sum) added in."""
    return ~fold(ones_sum(data) + initial) & 0xFFFF


def pseudo_header_sum(src: bytes, dst: bytes, protocol: int, length: int) -> int:
    """One's-complement sum of the TCP/UDP pseudo-header (RFC 768, RFC 8200 §8.1)."""
    return ones_sum(src) + ones_sum(dst) + protocol + (length >> 16) + (length & 0xFFFF)


def update_checksum(old_checksum: int, old_data: bytes, new_data: bytes) -> int:
    """RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'), for replacing even-length `old_data` by `new_data`."""
    # ~m summed over the words of m is -sum(m) in one's complement: add its complement mod 0xFFFF.
    total = (~old_checksum & 0xFFFF) + (_FOLD - ones_sum(old_data)) + ones_sum(new_data)
    return ~fold(total) & 0xFFFF
