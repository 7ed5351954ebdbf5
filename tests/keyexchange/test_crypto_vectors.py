"""Key exchange known answers (RFC 5903 §8, RFC 7748 §6.1), peer value validation, key derivation.

Vector bytes were looked up in public test suites that quote the RFCs (several agree).
"""

from __future__ import annotations

import pytest

from esplanade.ipsec.transforms import ENCR_AES_CBC_256, ENCR_AES_GCM_16_256, INTEG_HMAC_SHA2_256_128, PrfId
from esplanade.keyexchange.ikev2.crypto.keyexchange import (
    MODP_2048_P,
    Curve25519,
    Ecp256,
    Ecp384,
    Ecp521,
    MlKem768,
    Modp2048,
)
from esplanade.keyexchange.ikev2.crypto.keymat import (
    child_keymat,
    derive_ike_keys,
    skeyseed_additional,
    skeyseed_initial,
)
from esplanade.keyexchange.ikev2.crypto.prf import PRFS
from esplanade.keyexchange.ikev2.crypto.sk import SkCipher
from esplanade.keyexchange.ikev2.errors import CryptoError, IntegrityCheckFailed

H = bytes.fromhex

RFC5903 = {
    Ecp256: dict(
        i="C88F01F510D9AC3F70A292DAA2316DE544E9AAB8AFE84049C62A9C57862D1433",
        gi="DAD0B65394221CF9B051E1FECA5787D098DFE637FC90B9EF945D0C3772581180"
        "5271A0461CDB8252D61F1C456FA3E59AB1F45B33ACCF5F58389E0577B8990BB3",
        r="C6EF9C5D78AE012A011164ACB397CE2088685D8F06BF9BE0B283AB46476BEE53",
        gr="D12DFB5289C8D4F81208B70270398C342296970A0BCCB74C736FC7554494BF63"
        "56FBF3CA366CC23E8157854C13C58D6AAC23F046ADA30F8353E74F33039872AB",
        girx="D6840F6B42F6EDAFD13116E0E12565202FEF8E9ECE7DCE03812464D04B9442DE",
    ),
    Ecp384: dict(
        i="099F3C7034D4A2C699884D73A375A67F7624EF7C6B3C0F160647B67414DCE655E35B538041E649EE3FAEF896783AB194",
        gi="667842D7D180AC2CDE6F74F37551F55755C7645C20EF73E31634FE72B4C55EE6DE3AC808ACB4BDB4C88732AEE95F41AA"
        "9482ED1FC0EEB9CAFC4984625CCFC23F65032149E0E144ADA024181535A0F38EEB9FCFF3C2C947DAE69B4C634573A81C",
        r="41CB0779B4BDB85D47846725FBEC3C9430FAB46CC8DC5060855CC9BDA0AA2942E0308312916B8ED2960E4BD55A7448FC",
        gr="E558DBEF53EECDE3D3FCCFC1AEA08A89A987475D12FD950D83CFA41732BC509D0D1AC43A0336DEF96FDA41D0774A3571"
        "DCFBEC7AACF3196472169E838430367F66EEBE3C6E70C416DD5F0C68759DD1FFF83FA40142209DFF5EAAD96DB9E6386C",
        girx="11187331C279962D93D604243FD592CB9D0A926F422E47187521287E7156C5C4D603135569B9E9D09CF5D4A270F59746",
    ),
    Ecp521: dict(
        i="0037ADE9319A89F4DABDB3EF411AACCCA5123C61ACAB57B5393DCE47608172A095AA85A30FE1C2952C6771D937BA9777"
        "F5957B2639BAB072462F68C27A57382D4A52",
        gi="",
        r="0145BA99A847AF43793FDD0E872E7CDFA16BE30FDC780F97BCCC3F078380201E9C677D600B343757A3BDBF2A3163E4C2"
        "F869CCA7458AA4A4EFFC311F5CB151685EB9",
        gr="",
        girx="01144C7D79AE6956BC8EDB8E7C787C4521CB086FA64407F97894E5E6B2D79B04D1427E73CA4BAA240A34786859810C06"
        "B3C715A3A8CC3151F2BEE417996D19F3DDEA",
    ),
}


@pytest.mark.parametrize("cls", [Ecp256, Ecp384, Ecp521])
def test_rfc5903_ecp(cls: type) -> None:
    v = RFC5903[cls]
    i = cls(int(v["i"], 16))
    r = cls(int(v["r"], 16))
    if v["gi"]:
        assert i.public_value() == H(v["gi"]) and r.public_value() == H(v["gr"])
    assert len(i.public_value()) == 2 * cls.coord_len  # x || y, no point-format byte (RFC 5903 §7)
    i.process_peer(r.public_value())
    r.process_peer(i.public_value())
    assert i.shared_secret == r.shared_secret == H(v["girx"])


def test_rfc7748_x25519() -> None:
    a = Curve25519(H("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"))
    b = Curve25519(H("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb"))
    assert a.public_value() == H("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    assert b.public_value() == H("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    a.process_peer(b.public_value())
    assert a.shared_secret == H("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")


def test_peer_values_are_validated() -> None:
    e = Ecp256()
    bad = bytearray(Ecp256().public_value())
    bad[-1] ^= 1
    with pytest.raises(CryptoError, match="not a point"):
        e.process_peer(bytes(bad))
    with pytest.raises(CryptoError):
        e.process_peer(bytes(65))
    m = Modp2048()
    for y in (0, 1, MODP_2048_P - 1, MODP_2048_P):
        with pytest.raises(CryptoError):
            m.process_peer(y.to_bytes(256, "big"))
    with pytest.raises(CryptoError):
        Curve25519().process_peer(bytes(32))  # low-order point -> all-zero secret
    with pytest.raises(CryptoError):
        MlKem768(initiator=False).process_peer(bytes(100))


def test_modp_and_mlkem_agree() -> None:
    a, b = Modp2048(), Modp2048()
    a.process_peer(b.public_value())
    b.process_peer(a.public_value())
    assert a.shared_secret == b.shared_secret and len(a.shared_secret) == 256
    i, r = MlKem768(True), MlKem768(False)
    r.process_peer(i.public_value())
    i.process_peer(r.public_value())
    assert i.shared_secret == r.shared_secret and len(r.public_value()) == 1088


def test_skeyseed_depends_on_both_shared_secrets() -> None:
    """RFC 9370: with ECP256 + ML-KEM-768, changing either secret changes the final SKEYSEED."""
    prf = PRFS[PrfId.HMAC_SHA2_256]
    ni, nr, spi_i, spi_r = b"n" * 32, b"m" * 32, b"i" * 8, b"r" * 8

    def final(ecdh: bytes, kem: bytes) -> bytes:
        k0 = derive_ike_keys(prf, ENCR_AES_GCM_16_256, None, skeyseed_initial(prf, ni, nr, ecdh), ni, nr, spi_i, spi_r)
        return skeyseed_additional(prf, k0.sk_d, kem, ni, nr)

    base = final(b"A" * 32, b"B" * 32)
    assert final(b"X" * 32, b"B" * 32) != base
    assert final(b"A" * 32, b"Y" * 32) != base
    assert final(b"A" * 32, b"B" * 32) == base


def test_prf_plus_structure() -> None:
    import hmac

    prf = PRFS[PrfId.HMAC_SHA2_256]
    k, s = b"key", b"seed"
    t1 = hmac.digest(k, s + b"\x01", "sha256")
    t2 = hmac.digest(k, t1 + s + b"\x02", "sha256")
    assert prf.plus(k, s, 64) == t1 + t2
    assert prf.plus(k, s, 40) == (t1 + t2)[:40]


def test_child_keymat_order() -> None:
    prf = PRFS[PrfId.HMAC_SHA2_256]
    km = prf.plus(b"d" * 32, b"N" * 32 + b"M" * 32, 2 * (32 + 32))
    ck = child_keymat(prf, b"d" * 32, b"N" * 32, b"M" * 32, ENCR_AES_CBC_256, INTEG_HMAC_SHA2_256_128)
    # §2.17: encryption then integrity, initiator->responder first
    assert ck.encr_i == km[:32] and ck.integ_i == km[32:64] and ck.encr_r == km[64:96] and ck.integ_r == km[96:]
    assert ck.encr_i.hex() not in repr(ck) and "encr_i" not in repr(ck)


@pytest.mark.parametrize("encr", [ENCR_AES_GCM_16_256, ENCR_AES_CBC_256])
def test_sk_cipher_roundtrip_and_tamper(encr: object) -> None:
    from esplanade.ipsec.transforms import EncrAlgorithm

    assert isinstance(encr, EncrAlgorithm)
    integ = None if encr.aead else INTEG_HMAC_SHA2_256_128
    c = SkCipher(encr, bytes(range(encr.keymat_bytes)), integ, b"k" * 32 if integ else b"")
    hdr = b"H" * 32
    body = c.seal(hdr, b"hello payloads")
    assert len(body) == c.sealed_len(14)
    assert c.open(hdr, body) == b"hello payloads"
    with pytest.raises(IntegrityCheckFailed):
        c.open(b"X" + hdr[1:], body)
    with pytest.raises(IntegrityCheckFailed):
        c.open(hdr, body[:-1] + bytes((body[-1] ^ 1,)))
