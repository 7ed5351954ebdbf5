"""SecurityAssociation -> kernel SA: algorithms, KEYMAT layout, replay, lifetimes, refusals."""

from __future__ import annotations

import dataclasses

import pytest

from esplanade.dataplane.backend import InvalidArgument, Unsupported
from esplanade.dataplane.kernel.xfrm_messages import XFRM_INF, XfrmMode, XfrmMsgType, XfrmStateFlag
from esplanade.dataplane.kernel.xfrm_sa import XfrmEncap, XfrmSa, xfrm_sa_from_association
from esplanade.dataplane.kernel.xfrm_selector import XfrmSelector
from esplanade.dataplane.kernel.xfrm_socket import NetlinkHeader, decode_message
from esplanade.ipsec.sa import Lifetime, TfcPolicy
from esplanade.ipsec.transforms import Direction, Mode
from tests.dataplane.kernel.child_sa_builders import TRANSFORMS, TRANSFORMS_BY_LABEL, Peer, security_association

A, B = Peer("192.0.2.1", "10.1.0.1"), Peer("192.0.2.2", "10.2.0.1")
GCM = TRANSFORMS_BY_LABEL["aes128gcm16"]


def sa_for(label: str = "aes128gcm16", direction: Direction = Direction.OUT, **options: object) -> XfrmSa:
    src, dst = (A, B) if direction == Direction.OUT else (B, A)
    association = security_association(0x1234, direction, src, dst, TRANSFORMS_BY_LABEL[label], **options)  # type: ignore[arg-type]
    return xfrm_sa_from_association(association, reqid=5)


EXPECTED_ALGORITHMS = {
    # label: (aead, crypt, auth) as (kernel name, key bytes, bits)
    "aes128gcm16": (("rfc4106(gcm(aes))", 20, 128), None, None),
    "aes256gcm16": (("rfc4106(gcm(aes))", 36, 128), None, None),
    "chacha20poly1305": (("rfc7539esp(chacha20,poly1305)", 36, 128), None, None),
    "aes128-sha256": (None, ("cbc(aes)", 16, 0), ("hmac(sha256)", 32, 128)),
    "aes256-sha384": (None, ("cbc(aes)", 32, 0), ("hmac(sha384)", 48, 192)),
    "aes256-sha512": (None, ("cbc(aes)", 32, 0), ("hmac(sha512)", 64, 256)),
    "null-sha256": (None, ("ecb(cipher_null)", 0, 0), ("hmac(sha256)", 32, 128)),
    "ah-sha256": (None, None, ("hmac(sha256)", 32, 128)),
    "ah-sha384": (None, None, ("hmac(sha384)", 48, 192)),
    "ah-sha512": (None, None, ("hmac(sha512)", 64, 256)),
}


@pytest.mark.parametrize("transform", TRANSFORMS, ids=lambda t: t.label)
def test_each_transform_maps_to_kernel_algorithms_with_the_keymat_layout(transform: object) -> None:
    label = transform.label  # type: ignore[attr-defined]
    sa = sa_for(label)
    shapes = tuple((a.name, len(a.key), a.bits) if a else None for a in (sa.aead, sa.crypt, sa.auth))
    assert shapes == EXPECTED_ALGORITHMS[label]
    association = security_association(0x1234, Direction.OUT, A, B, TRANSFORMS_BY_LABEL[label])
    if sa.aead:  # cipher key || salt, exactly the KEYMAT the userspace engine takes
        assert sa.aead.key == association.encr_key
    if sa.crypt:
        assert sa.crypt.key == association.encr_key
    if sa.auth:
        assert sa.auth.key == association.integ_key


def test_message_round_trip_preserves_everything() -> None:
    sa = sa_for(
        "aes256-sha384",
        encap=True,
        mark=0x10,
        if_id=3,
        lifetime=Lifetime(soft_bytes=10, hard_bytes=20, soft_packets=1, hard_packets=2, soft_seconds=5, hard_seconds=9),
        replay_window=256,
    )
    msg = sa.to_message()
    msg["header"] = {"type": XfrmMsgType.NEWSA, "flags": 0, "sequence_number": 1, "pid": 0}
    msg.encode()
    data = bytes(msg.data)
    decoded = decode_message(NetlinkHeader(len(data), XfrmMsgType.NEWSA, 0, 1, 0), data)
    assert XfrmSa.from_message(decoded) == sa


def test_tunnel_and_transport_selectors() -> None:
    tunnel = sa_for(mode=Mode.TUNNEL)
    assert tunnel.mode == XfrmMode.TUNNEL
    assert tunnel.selector == XfrmSelector.unspecified() and tunnel.flags & XfrmStateFlag.AF_UNSPEC
    outbound = sa_for(mode=Mode.TRANSPORT)
    assert outbound.mode == XfrmMode.TRANSPORT and not outbound.flags
    assert (outbound.selector.saddr, outbound.selector.daddr) == (A.outer, B.outer)
    inbound = sa_for(mode=Mode.TRANSPORT, direction=Direction.IN)
    assert (inbound.selector.saddr, inbound.selector.daddr) == (B.outer, A.outer)
    assert inbound.selector.prefixlen_s == inbound.selector.prefixlen_d == 32


@pytest.mark.parametrize(
    ("esn", "window", "direction", "expected_window", "uses_esn_attr"),
    [
        (True, 64, Direction.IN, 64, True),
        (False, 32, Direction.IN, 32, False),
        (False, 0, Direction.IN, 0, False),
        (False, 128, Direction.IN, 128, True),
        (True, 0, Direction.OUT, 32, True),  # the kernel wants a window with ESN, even outbound
        (True, 4096, Direction.IN, 4096, True),
    ],
)
def test_replay_window_and_esn(
    esn: bool, window: int, direction: Direction, expected_window: int, uses_esn_attr: bool
) -> None:
    sa = sa_for(esn=esn, replay_window=window, direction=direction)
    assert (sa.esn, sa.replay_window, sa.uses_replay_esn) == (esn, expected_window, uses_esn_attr)
    msg = sa.to_message()
    assert msg["replay_window"] == (0 if uses_esn_attr else expected_window)
    assert bool(msg["flags"] & XfrmStateFlag.ESN) == esn


def test_replay_window_beyond_the_kernel_limit_is_unsupported() -> None:
    with pytest.raises(Unsupported, match="exceeds the kernel's maximum of 4096"):
        sa_for(replay_window=8192, direction=Direction.IN)
    with pytest.raises(Unsupported, match="anti-replay"):
        sa_for(esn=True, replay_window=0, direction=Direction.IN)


def test_lifetimes_count_from_creation() -> None:
    lifetime = Lifetime(soft_seconds=3000, hard_seconds=3600, soft_bytes=0, hard_packets=100)
    association = security_association(0x1234, Direction.OUT, A, B, GCM, lifetime=lifetime)
    fresh = xfrm_sa_from_association(association, reqid=1)
    assert (fresh.lifetime.soft_add_seconds, fresh.lifetime.hard_add_seconds) == (3000, 3600)
    assert fresh.lifetime.soft_bytes == XFRM_INF and fresh.lifetime.hard_packets == 100
    late = xfrm_sa_from_association(association, reqid=1, elapsed=3200.5)
    assert (late.lifetime.soft_add_seconds, late.lifetime.hard_add_seconds) == (1, 400)
    with pytest.raises(InvalidArgument, match="ran out"):
        xfrm_sa_from_association(association, reqid=1, elapsed=3600)


def test_encapsulation_mark_if_id_and_tfc() -> None:
    sa = sa_for(encap=True, mark=7, if_id=9)
    assert sa.encap == XfrmEncap(4500, 4500) and sa.mark == (7, 0xFFFFFFFF) and sa.if_id == 9
    padded = dataclasses.replace(security_association(0x1234, Direction.OUT, A, B, GCM), tfc=TfcPolicy(pad_to=1000))
    assert xfrm_sa_from_association(padded, reqid=1).tfcpad == 1000
    dummies = dataclasses.replace(padded, tfc=TfcPolicy(dummy_interval_ms=100))
    with pytest.raises(Unsupported, match="dummy"):
        xfrm_sa_from_association(dummies, reqid=1)


def test_invalid_associations_are_refused_before_the_kernel_sees_them() -> None:
    good = security_association(0x1234, Direction.OUT, A, B, GCM)
    for bad, why in [
        (dataclasses.replace(good, spi=5), "reserved"),
        (dataclasses.replace(good, encr_key=b"short"), "key material"),
        (dataclasses.replace(good, dst="2001:db8::2"), "differ in family"),
        (dataclasses.replace(good, src="not-an-address"), "does not appear to be an IPv4 or IPv6 address"),
    ]:
        with pytest.raises(InvalidArgument, match=why):
            xfrm_sa_from_association(bad, reqid=1)


def test_keys_never_appear_in_reprs_or_errors() -> None:
    sa = sa_for("aes256-sha512")
    assert sa.crypt is not None and sa.auth is not None
    for key in (sa.crypt.key, sa.auth.key):
        assert key.hex() not in repr(sa) and repr(key) not in repr(sa)
    bad = dataclasses.replace(security_association(0x1234, Direction.OUT, A, B, GCM), encr_key=b"x" * 5)
    with pytest.raises(InvalidArgument) as refused:
        xfrm_sa_from_association(bad, reqid=1)
    assert "xxxxx" not in str(refused.value)


def test_ah_over_ipv4_pads_its_icv_to_32_bits() -> None:
    """RFC 4302 §3.3.3.2.1: IPv4 AH aligns to 32 bits (ALIGN4), as strongSwan programs it;
    Linux's default 64-bit alignment would make every AH packet fail at the peer."""
    for mode in (Mode.TUNNEL, Mode.TRANSPORT):
        assert sa_for("ah-sha256", mode=mode).flags & XfrmStateFlag.ALIGN4
    assert not sa_for("aes128-sha256").flags & XfrmStateFlag.ALIGN4
    v6 = security_association(
        0x1234,
        Direction.OUT,
        Peer("2001:db8::1", "fd00::1"),
        Peer("2001:db8::2", "fd00::2"),
        TRANSFORMS_BY_LABEL["ah-sha256"],
    )
    assert not xfrm_sa_from_association(v6, reqid=5).flags & XfrmStateFlag.ALIGN4
