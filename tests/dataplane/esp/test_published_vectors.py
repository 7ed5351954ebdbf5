"""Published ESP test packets, byte for byte.

Sources (bytes as transcribed in OpenDataPlane's test/validation/api/ipsec/test_vectors.h,
which reproduces them; the GCM ciphertexts and tags can only match if every byte is right):
- draft-mcgrew-gcm-test-01, test cases 2, 3, 4 and 12 (AES-GCM-16, RFC 4106). Case 12 is a
  dummy packet (next header 59) at sequence number 0xffffffff. The draft gives ESP payloads
  only; cases 2-4 protect a whole IPv4 packet (tunnel mode, next header 4).
  Case 15 is AES-GMAC (RFC 4543), a transform we do not implement.
- RFC 7634 appendix A: the ChaCha20-Poly1305 ESP example, whole outer IPv4 packet.
- RFC 3602 §4 cases 5-8: AES-CBC ESP without integrity (5, 6 transport; 7, 8 tunnel).
"""

from __future__ import annotations

import pytest

from esplanade.dataplane.esp.cipher_suites import esp_cipher_for
from esplanade.dataplane.esp.esp_codec import PADDING, build_esp_packet
from esplanade.dataplane.esp.ip_headers import ipv4_header, rebuild_transport_packet, transport_insertion_point
from esplanade.ipsec.transforms import (
    ENCR_AES_CBC_128,
    ENCR_AES_GCM_16_128,
    ENCR_AES_GCM_16_256,
    ENCR_CHACHA20_POLY1305,
)


def h(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


# (name, algorithm, key || salt, SPI, seq, IV, plaintext IP packet (None: dummy), next header, ESP payload)
GCM_CASES = [
    (
        "mcgrew-2",
        ENCR_AES_GCM_16_128,
        h("feffe9928665731c6d6a8f9467308308 cafebabe"),
        0x0000A5F8,
        0x0000000A,
        h("facedbaddecaf888"),
        h(
            """45000 03e698f 00008011 4dccc0a8 0102c0a8 0101
            0a980035 002a2343 b2d00100 00010000 00000000 03736970 09637962 65726369 7479 0264 6b000001 0001"""
        ),
        4,
        h(
            """0000a5f8 0000000a facedbaddecaf888
            deb22cd9b07c72c16e3a65beeb8df304 a5a5897d33ae530f1ba76d5d114d2a5c
            3de81827c10e9a4f51330d0eec416642 cfbb85a5b47e48a4ec3b9ba95d918bd4
            26f8391b9927d0fcc984561bbbce9fc0"""
        ),
    ),
    (
        "mcgrew-3",
        ENCR_AES_GCM_16_256,
        h("abbccddef00112233445566778899aab abbccddef00112233445566778899aab 11223344"),
        0x4A2CBFE3,
        2,
        h("0102030405060708"),
        h(
            """45000030 69a64000 80062690 c0a80102 9389155e
            0a9e008b 2dc57ee0 00000000 70024000 20bf0000 020405b4 01010402"""
        ),
        4,
        h(
            """4a2cbfe3 00000002 0102030405060708
            ff425c9b724599df7a3bcd510194e00d 6a78107f1b0b1cbf06efae9d65a5d763
            748a637985771d347f0545659f14e99d ef842d8b42f564f52dfdd6eef4f92ead
            bac23990"""
        ),
    ),
    (
        "mcgrew-4",
        ENCR_AES_GCM_16_128,
        h("00000000000000000000000000000000 00000000"),
        0x00000000,
        1,
        h("0000000000000000"),
        h(
            """4500003c 99c50000 8001cb7a 40679318 01010101
            0800075c 02004400 61626364 65666768 696a6b6c 6d6e6f70 71727374 75767761 62636465 66676869"""
        ),
        4,
        h(
            """00000000 00000001 0000000000000000
            4688daf2f973a392732909c331d56d60 f694abaa414b5e7ff5fdcdfff5e9a284
            456476492719ffb64de7d9dca1e1d894 bc3bd57873ed4d181d19d4d5c8c18af6
            fe1d7372228a69f40deb373ddc01676b"""
        ),
    ),
    (
        "mcgrew-12-dummy",
        ENCR_AES_GCM_16_128,
        h("7d773d00c144c525ac619d18c84a3f47 d9664267"),
        0x335467AE,
        0xFFFFFFFF,
        h("43457e9182443bc6"),
        b"",
        59,
        h("335467ae ffffffff 43457e9182443bc6 437f86517ea595d2ca004c33388c46770c590ad6"),
    ),
]


@pytest.mark.parametrize("case", GCM_CASES, ids=[c[0] for c in GCM_CASES])
def test_draft_mcgrew_gcm_test_01(case: tuple) -> None:  # type: ignore[type-arg]
    _, alg, keymat, spi, seq, iv, plaintext, nh, expected = case
    cipher = esp_cipher_for(alg, keymat, None, b"")
    assert build_esp_packet(cipher, spi, seq, iv, plaintext, nh) == expected
    # and back: the trailer is exactly the minimal RFC 4303 padding
    opened = cipher.open(expected, None)
    assert opened is not None
    padlen = opened[-2]
    assert opened[-1] == nh
    assert opened[: len(opened) - 2 - padlen] == plaintext
    assert opened[len(opened) - 2 - padlen : -2] == PADDING[:padlen]
    tampered = bytearray(expected)
    tampered[-1] ^= 1
    assert cipher.open(bytes(tampered), None) is None


RFC7634_INNER = h(
    """45000054 a6f20000 4001e778 c6336405 c0000205
    08005b7a 3a080000 553bec10 00073627
    08090a0b0c0d0e0f 1011121314151617 18191a1b1c1d1e1f 2021222324252627 28292a2b2c2d2e2f 3031323334353637"""
)
RFC7634_PACKET = h(
    """4500008c 23450000 4032de5b cb007199 cb007105
    01020304 00000005 1011121314151617
    24039428b97f417e 3c13753a4f05087b 67c352e6a7fab1b9 82d466ef407ae5c6
    14ee8099d52844eb 61aa95dfab4c02f7 2aa71e7c4c4f64c9 befe2facc638e8f3
    cbec163fac469b50 2773f6fb94e664da 9165b82829f641e0 76aaa8266b7fb0f7
    b11b369907e1ad43"""
)


def test_rfc7634_appendix_a_esp_example() -> None:
    keymat = bytes(range(0x80, 0xA0)) + h("a0a1a2a3")
    cipher = esp_cipher_for(ENCR_CHACHA20_POLY1305, keymat, None, b"")
    esp = build_esp_packet(cipher, 0x01020304, 5, h("1011121314151617"), RFC7634_INNER, 4)
    outer = ipv4_header(h("cb007199"), h("cb007105"), 50, len(esp), ident=0x2345)
    assert outer + esp == RFC7634_PACKET
    assert cipher.open(RFC7634_PACKET[20:], None) is not None


RFC3602_CASES = [
    (
        "case-5-transport",
        h("90d382b410eeba7ad938c46cec1a82bf"),
        0x4321,
        1,
        h("e96e8c08ab465763fd098d45dd3ff893"),
        h(
            """45000054 08f20000 4001f9fe c0a87b03 c0a87b64
            08000ebd a70a0000 8e9c083d b95b0700
            08090a0b0c0d0e0f 1011121314151617 18191a1b1c1d1e1f 2021222324252627 28292a2b2c2d2e2f 3031323334353637"""
        ),
        None,
        h(
            """4500007c 08f20000 4032f9a5 c0a87b03 c0a87b64
            00004321 00000001 e96e8c08ab465763fd098d45dd3ff893
            f663c25d325c18c6a9453e194e120849 a4870b66cc6b9965330013b4898dc856
            a4699e523a55db080b59ec3a8e4b7e52 775b07d1db34ed9c538ab50c551b874a
            a269add047ad2d5913ac19b7cfbad4a6"""
        ),
    ),
    (
        "case-6-transport",
        h("90d382b410eeba7ad938c46cec1a82bf"),
        0x4321,
        8,
        h("69d08df7d203329db093fc4924e5bd80"),
        h(
            """45000030 08fe0000 4001fa16 c0a87b03 c0a87b64
            0800b5e8 a80a0500 a69c083d 0b660e00 77777777 77777777 77777777"""
        ),
        None,
        h(
            """4500004c 08fe0000 4032f9c9 c0a87b03 c0a87b64
            00004321 00000008 69d08df7d203329db093fc4924e5bd80
            f5199588 1ec4e0c4 488987ce 742e8109 689bb379 d2d750c0 d915dca3 46a89f75"""
        ),
    ),
    (
        "case-7-tunnel",
        h("0123456789abcdef0123456789abcdef"),
        0x8765,
        2,
        h("f4e765244f6407adf13dc1380f673f37"),
        h(
            """45000054 09040000 4001f988 c0a87b03 c0a87bc8
            08009f76 a90a0100 b49c083d 02a20400
            08090a0b0c0d0e0f 1011121314151617 18191a1b1c1d1e1f 2021222324252627 28292a2b2c2d2e2f 3031323334353637"""
        ),
        0x0905,
        h(
            """4500008c 09050000 4032f91e c0a87b03 c0a87bc8
            00008765 00000002 f4e765244f6407adf13dc1380f673f37
            773b5241a4c449225e4f3ce5ed611b0c 237ca96cf74a93013c1b0ea1a0cf70f8
            e4ecaec78ac53aad7a0f022b859243c6 47752e94a859352b8a4d4d2decd136e5
            c177f132ad3fbfb2201ac9904c74ee0a 109e0ca1e4dfe9d5a100b842f1c22f0d"""
        ),
    ),
    (
        "case-8-tunnel",
        h("0123456789abcdef0123456789abcdef"),
        0x8765,
        5,
        h("85d47224b5f3dd5d2101d4ea8dffab22"),
        h(
            """45000044 090c0000 4001f990 c0a87b03 c0a87bc8
            0800d63c aa0a0200 c69c083d a3de0300
            ffffffffffffffff ffffffffffffffff ffffffffffffffff ffffffffffffffff"""
        ),
        0x090D,
        h(
            """4500007c 090d0000 4032f926 c0a87b03 c0a87bc8
            00008765 00000005 85d47224b5f3dd5d2101d4ea8dffab22
            15b92683819596a8047232cc00f7048f e45318e11f8a0f62ede3c3fc61203bb5
            0f980a08c9843fd3a1b06d5c07ff9639 b7eb7dfb3512e5de435e7207ed971ef3
            d2726d9b5ef6affc6d17a0decbb13892"""
        ),
    ),
]


@pytest.mark.parametrize("case", RFC3602_CASES, ids=[c[0] for c in RFC3602_CASES])
def test_rfc3602_aes_cbc_esp_packets(case: tuple) -> None:  # type: ignore[type-arg]
    _, key, spi, seq, iv, inner, outer_ident, expected = case
    cipher = esp_cipher_for(ENCR_AES_CBC_128, key, None, b"", allow_unauthenticated=True)
    if outer_ident is None:  # transport: the inner header becomes the outer one
        pos = transport_insertion_point(inner)
        assert pos is not None
        esp = build_esp_packet(cipher, spi, seq, iv, inner[pos.header_end :], pos.protocol)
        packet = rebuild_transport_packet(inner[: pos.header_end], pos.next_header_offset, 50, esp)
    else:
        esp = build_esp_packet(cipher, spi, seq, iv, inner, 4)
        packet = ipv4_header(inner[12:16], inner[16:20], 50, len(esp), ident=outer_ident) + esp
    assert packet == expected
    # The same SA object decrypts what it produced and a second, independent packet stream.
    decrypter = esp_cipher_for(ENCR_AES_CBC_128, key, None, b"", allow_unauthenticated=True)
    for _ in range(2):
        opened = decrypter.open(expected[20:], None)
        assert opened is not None and opened[-1] == (4 if outer_ident else 1)
