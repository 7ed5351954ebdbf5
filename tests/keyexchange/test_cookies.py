"""Stateless COOKIEs (RFC 7296 §2.6) with secret rotation."""

from __future__ import annotations

from esplanade.keyexchange.ikev2.cookies import ROTATE_AFTER, CookieJar


def test_cookie_binds_nonce_address_and_spi() -> None:
    jar = CookieJar(0.0)
    c = jar.make(b"n" * 32, "192.0.2.1", b"s" * 8, 1.0)
    assert jar.check(c, b"n" * 32, "192.0.2.1", b"s" * 8, 2.0)
    assert not jar.check(c, b"m" * 32, "192.0.2.1", b"s" * 8, 2.0)
    assert not jar.check(c, b"n" * 32, "192.0.2.2", b"s" * 8, 2.0)
    assert not jar.check(c, b"n" * 32, "192.0.2.1", b"t" * 8, 2.0)
    assert not jar.check(c[:-1], b"n" * 32, "192.0.2.1", b"s" * 8, 2.0)


def test_rotation_keeps_the_previous_secret_only() -> None:
    jar = CookieJar(0.0)
    c0 = jar.make(b"n" * 32, "192.0.2.1", b"s" * 8, 0.0)
    t1 = ROTATE_AFTER + 1
    assert jar.check(c0, b"n" * 32, "192.0.2.1", b"s" * 8, t1)  # previous secret still accepted
    c1 = jar.make(b"n" * 32, "192.0.2.1", b"s" * 8, t1)
    assert c1[:4] != c0[:4]  # a new secret version
    t2 = t1 + ROTATE_AFTER + 1
    assert jar.check(c1, b"n" * 32, "192.0.2.1", b"s" * 8, t2)
    assert not jar.check(c0, b"n" * 32, "192.0.2.1", b"s" * 8, t2)  # two rotations old
