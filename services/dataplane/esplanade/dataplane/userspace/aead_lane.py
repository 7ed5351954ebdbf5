"""The fast lane of the crypto room: what the batch loops need to inline the common case.

The common case is an AEAD SA (AES-GCM-16, ChaCha20-Poly1305) in tunnel mode with 32-bit
sequence numbers, no TFC padding and selectors that constrain addresses only. For it,
`EspTransform` seals and opens inline in its batch loops, on the same SA state as the
engine (`next_seq`/`seq_mark`, `replay`, counters, lifetime marks), without the per-packet
function calls of `esp_codec.encrypt_esp` / `decrypt_esp`; about half the Python cost per
packet. Every other case, and every packet that is not plainly in order (sequence number
not above the window top, a lifetime mark reached, odd lengths), takes the engine's general
path, which makes the same decisions. `tests/dataplane/userspace/test_esp_transform.py`
checks both paths give identical bytes, drops and state.

This is also the seam for the compiled batch loop: it reads and writes exactly these fields.
"""

from __future__ import annotations

from collections.abc import Callable

from esplanade.dataplane.esp.cipher_suites import Aead
from esplanade.dataplane.esp.esp_codec import PADDING
from esplanade.dataplane.esp.ip_headers import MAX_IP_LENGTH
from esplanade.dataplane.esp.sa_state import InboundSa, OutboundSa

ESP_FIXED = 8 + 8 + 16 + 2  # SPI/seq, IV, ICV, pad length/next header
UDP_HEADER = 8
# Padding, pad length and next header for the 4-byte alignment of AEAD transforms, by
# (pad length, next header 4 or 41).
TRAILERS = {(pad, nh): PADDING[:pad] + bytes((pad, nh)) for pad in range(4) for nh in (4, 41)}

Ranges = tuple[tuple[int, int], ...]


class SealLane:
    __slots__ = ("encrypt", "limit", "salt", "spi")

    def __init__(self, encrypt: Callable[[bytes, bytes, bytes], bytes], salt: bytes, spi: bytes, limit: int) -> None:
        self.encrypt = encrypt
        self.salt = salt
        self.spi = spi
        self.limit = limit  # the largest inner packet the lane seals (bigger ones: engine path)


class OpenLane:
    __slots__ = ("check", "decrypt", "local4", "local6", "remote4", "remote6", "salt")

    def __init__(self, decrypt: Callable[[bytes, bytes, bytes], bytes], salt: bytes, sa: InboundSa) -> None:
        self.decrypt = decrypt
        self.salt = salt
        selectors = sa.selectors
        self.check = not selectors.match_all
        self.local4: Ranges = selectors.local_ranges[4]
        self.local6: Ranges = selectors.local_ranges[6]
        self.remote4: Ranges = selectors.remote_ranges[4]
        self.remote6: Ranges = selectors.remote_ranges[6]


def seal_lane_for(sa: OutboundSa) -> SealLane | None:
    cipher = sa.cipher
    if not isinstance(cipher, Aead) or not sa.tunnel or sa.esn or sa.tfc_pad_to:
        return None
    fixed = sa.outer_header_bytes if len(sa.src) == 4 else 0
    udp = UDP_HEADER if sa.encap is not None else 0
    limit = MAX_IP_LENGTH - fixed - udp - ESP_FIXED - 3
    return SealLane(cipher.primitive.encrypt, cipher.salt, sa.spi_bytes, limit)


def open_lane_for(sa: InboundSa) -> OpenLane | None:
    cipher = sa.cipher
    if not isinstance(cipher, Aead) or not sa.tunnel or sa.esn:
        return None
    if not (sa.selectors.match_all or sa.selectors.address_only):
        return None
    return OpenLane(cipher.primitive.decrypt, cipher.salt, sa)
