"""The compiled loop's own AES-GCM (csrc/espfast_aesgcm.c: VAES + VPCLMULQDQ) and the OpenSSL
path it replaces, through `_espfast.aead_seal` / `aead_open` (the ef_aead_seal / ef_aead_open
entry points ef_esp_seal and ef_esp_open use) and through whole ESP packets.

Oracles: the GCM specification's test cases (McGrew & Viega, "The Galois/Counter Mode of
Operation", test cases 1-4 and 13-16: 128- and 256-bit keys, 96-bit IVs), `cryptography`'s
AESGCM (OpenSSL), and RFC 4106 / RFC 4303 packets built by hand here. The conftest runs every
test once per implementation (`aesgcm_implementation`: 'vaes' or 'openssl')."""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP
from scapy.packet import Raw

from esplanade.dataplane.esp.counters import DropReason
from esplanade.dataplane.fastpath import CompiledEspBatch
from tests.dataplane.compiled_module import requires_compiled
from tests.dataplane.esp.suites import SUITES, sa_pair
from tests.dataplane.fastpath.twins import compiled_module, inbound, outbound, reservation

pytestmark = requires_compiled

KIND_AES_GCM = 1
KIND_CHACHA = 2
NAMES = {"vaes": "vaes-avx2", "openssl": "openssl"}

K3 = "feffe9928665731c6d6a8f9467308308"
P3 = (
    "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
    "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255"
)
IV3 = "cafebabefacedbaddecaf888"
A4 = "feedfacedeadbeeffeedfacedeadbeefabaddad2"
C3 = (
    "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e"
    "21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091473f5985"
)
C15 = (
    "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
    "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662898015ad"
)
# (case, key, plaintext, IV, AAD, ciphertext, tag), hex
SPEC_CASES = [
    ("1", "00" * 16, "", "00" * 12, "", "", "58e2fccefa7e3061367f1d57a4e7455a"),
    ("2", "00" * 16, "00" * 16, "00" * 12, "", "0388dace60b6a392f328c2b971b2fe78", "ab6e47d42cec13bdf53a67b21257bddf"),
    ("3", K3, P3, IV3, "", C3, "4d5c2af327cd64a62cf35abd2ba6fab4"),
    ("4", K3, P3[:120], IV3, A4, C3[:120], "5bc94fbc3221a5db94fae95ae7121a47"),
    ("13", "00" * 32, "", "00" * 12, "", "", "530f8afbc74536b9a963b4f1c4cb738b"),
    ("14", "00" * 32, "00" * 16, "00" * 12, "", "cea7403d4d606b6e074ec5d3baf39d18", "d0d1c8a799996bf0265b98b5d48ab919"),
    ("15", K3 * 2, P3, IV3, "", C15, "b094dac5d93471bdec1a502270e3cc6c"),
    ("16", K3 * 2, P3[:120], IV3, A4, C15[:120], "76fc6ece0f4e1768cddf8853bb2d551b"),
]


def expected_name(implementation: str, key_len: int) -> str:
    return "openssl" if implementation == "openssl" or key_len == 24 else NAMES[implementation]


def seal(key: bytes, nonce: bytes, aad: bytes, body: bytes, trailer: bytes = b"", in_place: bool = False) -> Any:
    return compiled_module().aead_seal(KIND_AES_GCM, key, nonce[:4], nonce[4:], aad, body, trailer, in_place)


def open_(key: bytes, nonce: bytes, aad: bytes, ct: bytes, tag: bytes, in_place: bool = False) -> Any:
    return compiled_module().aead_open(KIND_AES_GCM, key, nonce[:4], nonce[4:], aad, ct, tag, in_place)


@pytest.mark.parametrize(("case", "key", "pt", "iv", "aad", "ct", "tag"), SPEC_CASES, ids=[c[0] for c in SPEC_CASES])
def test_gcm_spec_test_cases(
    aesgcm_implementation: str, case: str, key: str, pt: str, iv: str, aad: str, ct: str, tag: str
) -> None:
    k, p, n, a, c, t = (bytes.fromhex(x) for x in (key, pt, iv, aad, ct, tag))
    for cut in sorted({0, len(p) // 2, len(p) - 1 if p else 0, len(p)}):
        for in_place in (False, True):
            name, out = seal(k, n, a, p[:cut], p[cut:], in_place)
            assert name == expected_name(aesgcm_implementation, len(k))
            assert bytes(out) == c + t, (case, cut, in_place)
    for in_place in (False, True):
        name, plain, _ = open_(k, n, a, c, t, in_place)
        assert name == expected_name(aesgcm_implementation, len(k))
        assert plain is not None and bytes(plain) == p
        assert open_(k, n, a + b"\x00", c, t, in_place)[1] is None
        assert open_(k, n, a, c, bytes([t[0] ^ 0x80]) + t[1:], in_place)[1] is None


def flip(data: bytes, bit: int) -> bytes:
    b = bytearray(data)
    b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


@pytest.mark.parametrize("key_len", [16, 32])
def test_every_length_against_cryptography(aesgcm_implementation: str, key_len: int) -> None:
    """Plaintexts of 0..2100 bytes (every partial-block and 128-byte-chunk boundary), AAD 8 or 12
    bytes as ESP uses it, a random body/trailer cut, in place and not; then one bit flipped in
    the ciphertext, the tag or the AAD must fail the open and give no plaintext."""
    rng = random.Random(key_len)
    key = rng.randbytes(key_len)
    oracle = AESGCM(key)
    name = expected_name(aesgcm_implementation, key_len)
    for length in range(2101):
        nonce = rng.randbytes(12)
        aad = rng.randbytes(rng.choice((8, 12)))
        pt = rng.randbytes(length)
        cut = rng.randint(0, length)
        want = oracle.encrypt(nonce, pt, aad)
        for in_place in (False, True):
            got_name, got = seal(key, nonce, aad, pt[:cut], pt[cut:], in_place)
            assert got_name == name
            assert bytes(got) == want, (length, cut, in_place)
            ct, tag = want[:-16], want[-16:]
            assert bytes(open_(key, nonce, aad, ct, tag, in_place)[1]) == pt, (length, in_place)
            if length:
                assert open_(key, nonce, aad, flip(ct, rng.randrange(8 * length)), tag, in_place)[1] is None
            assert open_(key, nonce, aad, ct, flip(tag, rng.randrange(128)), in_place)[1] is None
            assert open_(key, nonce, flip(aad, rng.randrange(8 * len(aad))), ct, tag, in_place)[1] is None


@pytest.mark.parametrize("key_len", [16, 32])
def test_long_messages_carry_the_counter_across_its_bytes(aesgcm_implementation: str, key_len: int) -> None:
    """Past 254 blocks (4,064 bytes: data starts at counter 2) the 32-bit counter's low byte
    carries into the next one: lengths either side of that carry, a 9000-byte jumbo frame and
    a 65,519-byte payload, against cryptography."""
    rng = random.Random(100 + key_len)
    key = rng.randbytes(key_len)
    oracle = AESGCM(key)
    for length in (4031, 4032, 4048, 4063, 4064, 4065, 4080, 4096, 9000, 65_519):
        nonce, aad, pt = rng.randbytes(12), rng.randbytes(8), rng.randbytes(length)
        cut = rng.randint(0, length)
        want = oracle.encrypt(nonce, pt, aad)
        for in_place in (False, True):
            assert bytes(seal(key, nonce, aad, pt[:cut], pt[cut:], in_place)[1]) == want, (length, in_place)
            assert bytes(open_(key, nonce, aad, want[:-16], want[-16:], in_place)[1]) == pt, (length, in_place)
        assert open_(key, nonce, aad, flip(want[:-16], rng.randrange(8 * length)), want[-16:])[1] is None


@pytest.mark.parametrize("key_len", [16, 32])
def test_long_aad_against_cryptography(aesgcm_implementation: str, key_len: int) -> None:
    """AAD of 128 bytes and more goes through GHASH's eight- and sixteen-block paths (ESP's is
    8 or 12 bytes; the seal and open take any)."""
    rng = random.Random(200 + key_len)
    key = rng.randbytes(key_len)
    oracle = AESGCM(key)
    for aad_len in (127, 128, 129, 255, 256, 257, 300, 600):
        nonce, aad, pt = rng.randbytes(12), rng.randbytes(aad_len), rng.randbytes(rng.randint(0, 700))
        want = oracle.encrypt(nonce, pt, aad)
        assert bytes(seal(key, nonce, aad, pt)[1]) == want, aad_len
        assert bytes(open_(key, nonce, aad, want[:-16], want[-16:])[1]) == pt, aad_len
        assert open_(key, nonce, flip(aad, rng.randrange(8 * aad_len)), want[:-16], want[-16:])[1] is None


@given(
    key=st.binary(min_size=16, max_size=16) | st.binary(min_size=32, max_size=32),
    nonce=st.binary(min_size=12, max_size=12),
    aad=st.binary(max_size=80),
    body=st.binary(max_size=700),
    trailer=st.binary(max_size=300),
    in_place=st.booleans(),
)
@settings(max_examples=300, deadline=None)
def test_arbitrary_messages_against_cryptography(
    aesgcm_implementation: str, key: bytes, nonce: bytes, aad: bytes, body: bytes, trailer: bytes, in_place: bool
) -> None:
    want = AESGCM(key).encrypt(nonce, body + trailer, aad)
    name, got = seal(key, nonce, aad, body, trailer, in_place)
    assert name == expected_name(aesgcm_implementation, len(key))
    assert bytes(got) == want
    plain = open_(key, nonce, aad, want[:-16], want[-16:], in_place)[1]
    assert plain is not None and bytes(plain) == body + trailer
    assert open_(key, nonce, aad, want[:-16], flip(want[-16:], len(body) % 128), in_place)[1] is None


@pytest.mark.parametrize("key_len", [16, 24, 32])
def test_a_failed_open_leaves_no_plaintext_in_its_output(aesgcm_implementation: str, key_len: int) -> None:
    """On an ICV failure neither path may leave unauthenticated plaintext where the caller would
    find it: the VAES open wipes the chunks its fused pass decrypted before it knew the tag, the
    EVP open (AES-192 always; all keys when forced) wipes what EVP wrote. Random plaintext, so no
    16-byte block of it can appear in the output by chance; in place and not, lengths around
    the 256-byte chunks and the partial last block."""
    rng = random.Random(300 + key_len)
    key = rng.randbytes(key_len)
    oracle = AESGCM(key)
    for length in (1, 15, 16, 17, 255, 256, 257, 1400, 4100):
        nonce, aad, pt = rng.randbytes(12), rng.randbytes(8), rng.randbytes(length)
        want = oracle.encrypt(nonce, pt, aad)
        ct, tag = want[:-16], want[-16:]
        for in_place in (False, True):
            for forged in ((ct, flip(tag, rng.randrange(128))), (flip(ct, rng.randrange(8 * length)), tag)):
                _, plain, output = open_(key, nonce, aad, *forged, in_place)
                assert plain is None
                assert len(output) == length
                for start in range(0, length, 16):
                    block = pt[start : start + 16]
                    assert bytes(output[start : start + len(block)]) != block, (length, in_place, start)


def test_aes192_and_chacha_stay_on_openssl(aesgcm_implementation: str) -> None:
    key24, nonce, aad, pt = bytes(range(24)), bytes(12), bytes(8), bytes(100)
    name, out = seal(key24, nonce, aad, pt)
    assert name == "openssl" and bytes(out) == AESGCM(key24).encrypt(nonce, pt, aad)
    name, _ = compiled_module().aead_seal(KIND_CHACHA, bytes(32), bytes(4), bytes(8), aad, pt)
    assert name == "openssl"


def test_bad_parameters_are_value_errors() -> None:
    m = compiled_module()
    with pytest.raises(ValueError):
        m.aead_seal(KIND_AES_GCM, bytes(17), bytes(4), bytes(8), b"", b"")
    with pytest.raises(ValueError):
        m.aead_seal(KIND_AES_GCM, bytes(16), bytes(4), bytes(7), b"", b"")
    with pytest.raises(ValueError):
        m.aead_open(KIND_AES_GCM, bytes(16), bytes(4), bytes(8), b"", b"", bytes(15))
    with pytest.raises(ValueError):
        m.aesgcm_policy("fastest")


# -- whole ESP packets (RFC 4106 in RFC 4303) ----------------------------------------------------
def esp_keys(suite_name: str) -> tuple[bytes, bytes, bytes]:
    """(keymat, AES key, salt): RFC 4106 §8.1, the salt is the keying material's last 4 bytes."""
    n = SUITES[suite_name].encr_key_bytes
    keymat = bytes((0x42 + 7 * i) % 256 for i in range(n))
    return keymat, keymat[:-4], keymat[-4:]


def esp_aad(spi: int, seq: int, esn: bool) -> bytes:
    """RFC 4106 §5: SPI || 32-bit sequence, or SPI || 64-bit extended sequence."""
    return struct.pack("!IQ", spi, seq) if esn else struct.pack("!II", spi, seq & 0xFFFFFFFF)


def inner_packet(size: int) -> bytes:
    """An IPv4/UDP packet of `size` bytes (>= 28)."""
    payload = (bytes(range(256)) * 6)[: size - 28]
    return bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=4000, dport=53) / Raw(payload))


@pytest.mark.parametrize("suite_name", ["aes128gcm16", "aes256gcm16"])
@pytest.mark.parametrize("esn", [False, True], ids=["noesn", "esn"])
def test_esp_packets_match_rfc4106_by_hand(aesgcm_implementation: str, suite_name: str, esn: bool) -> None:
    suite = SUITES[suite_name]
    keymat, key, salt = esp_keys(suite_name)
    out_a, in_a = sa_pair(suite, encr_key=keymat, integ_key=b"", esn=esn)
    start = (5 << 32) + 0xFFFFFFF0 if esn else 0xFFFFFF00
    core = CompiledEspBatch(compiled_module())
    sender = outbound(out_a, next_seq=start, reserved_upto=start + 100, reservation=reservation(1 << 20))
    assert core.install_outbound(sender, out_a) == 0
    assert core._slots[0].aead_implementation == expected_name(aesgcm_implementation, len(key))
    sizes = [28, 29, 30, 31, 100, 1000, 1380, 1400, 1452]
    sealed = core.encrypt([inner_packet(s) for s in sizes], now=0.0).to_list()
    for i, (size, esp) in enumerate(zip(sizes, sealed, strict=True)):
        esp = bytes(esp)
        seq = start + i
        spi, seq_lo = struct.unpack("!II", esp[:8])
        assert (spi, seq_lo) == (out_a.spi, seq & 0xFFFFFFFF)
        assert esp[8:16] == struct.pack("!Q", seq)  # the explicit IV is the sequence number
        plain = AESGCM(key).decrypt(salt + esp[8:16], esp[16:], esp_aad(spi, seq, esn))
        padlen = -(size + 2) % 4
        assert plain == inner_packet(size) + bytes(range(1, padlen + 1)) + bytes((padlen, 4))

    # the other way: packets sealed by hand, opened by the compiled inbound SA
    in_core = CompiledEspBatch(compiled_module())
    in_core.install_inbound(inbound(in_a), in_a)
    packets = []
    for i, size in enumerate(sizes):
        seq = (start if esn else 1) + i
        padlen = -(size + 2) % 4
        plain = inner_packet(size) + bytes(range(1, padlen + 1)) + bytes((padlen, 4))
        iv = os.urandom(8)
        ct = AESGCM(key).encrypt(salt + iv, plain, esp_aad(in_a.spi, seq, esn))
        packets.append(struct.pack("!II", in_a.spi, seq & 0xFFFFFFFF) + iv + ct)
    if esn:  # the window must already be near `start` for the high half to be inferred
        in_core = CompiledEspBatch(compiled_module())
        sa = inbound(in_a)
        sa.replay.top = start - 1
        in_core.install_inbound(sa, in_a)
    opened = in_core.decrypt(packets, now=0.0).to_list()
    assert [bytes(p) for p in opened] == [inner_packet(s) for s in sizes]
    # a flipped bit anywhere after the header is an ICV failure, never a packet
    forged = [p[:20] + bytes([p[20] ^ 1]) + p[21:] for p in packets]
    fresh = CompiledEspBatch(compiled_module())
    sa = inbound(in_a)
    if esn:
        sa.replay.top = start - 1
    fresh.install_inbound(sa, in_a)
    assert fresh.decrypt(forged, now=0.0).to_list() == []
    assert sa.counters.drops[DropReason.ICV_FAILURE] == len(sizes)
    assert sa.replay.top == (start - 1 if esn else 0)  # forged packets never move the window


def test_environment_variable_forces_openssl() -> None:
    script = (
        "from esplanade.dataplane.fastpath.hot_path import load_compiled\n"
        "m = load_compiled()[0]\n"
        "print(m.aesgcm_policy(), m.aead_seal(1, bytes(16), bytes(4), bytes(8), bytes(8), bytes(64))[0])\n"
    )
    env = {**os.environ, "ESPLANADE_ESP_AESGCM": "openssl"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["openssl", "openssl"]
    env.pop("ESPLANADE_ESP_AESGCM")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    accelerated = compiled_module().aesgcm_accelerated()
    assert done.stdout.split() == ["auto", accelerated or "openssl"]
