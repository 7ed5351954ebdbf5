"""Connection actions, dataplane hooks, INITIAL_CONTACT, and certificate edge cases, in memory."""

from __future__ import annotations

import pytest

from esplanade.keyexchange.ikev2.constants import NotifyType
from esplanade.keyexchange.ikev2.events import (
    ChildSaDeleted,
    ChildSaEstablished,
    ChildSaRekeyed,
    IkeSaDeleted,
    IkeSaEstablished,
    NegotiationFailed,
)
from tests.keyexchange import pki
from tests.keyexchange.peers import assert_children_paired, established, live_children, pair


def test_records_validate_and_carry_limits() -> None:
    _net, a, b, _ike, _child = established(
        a_over={"child_rekey_bytes": 1000, "child_life_bytes": 2000, "child_esp_proposals": ["aes256-sha512"]},
        b_over={"child_esp_proposals": ["aes256-sha512"]},
    )
    rec = a.of(ChildSaEstablished)[0].record
    rec.validate()
    b.of(ChildSaEstablished)[0].record.validate()
    assert rec.inbound.lifetime.soft_bytes == 1000 and rec.inbound.lifetime.hard_bytes == 2000
    assert rec.outbound.integ is not None and rec.outbound.integ.name == "sha512"
    assert "encr_key" not in repr(rec) and rec.outbound.encr_key.hex() not in repr(rec)


def test_start_action_start() -> None:
    net, a, b = pair(a_over={"child_start_action": "start"})
    started = a.engine.start_configured(net.now)
    net.run()
    assert len(started) == 1 and a.of(ChildSaEstablished)
    assert b.engine.start_configured(net.now) == []


def test_dpd_action_restart() -> None:
    net, a, _b, _ike, _child = established(a_over={"dpd_delay": "10s", "child_dpd_action": "restart"})
    dead = True
    net.drop = lambda d: dead
    net.advance(10 + 4 + 7.2 + 12.96 + 23.33 + 41.99 + 80)
    assert any("dead peer" in e.reason for e in a.of(IkeSaDeleted))
    dead = False
    net.advance(90)  # the restarted IKE_SA_INIT is still being retransmitted: it gets through now
    assert len(a.of(IkeSaEstablished)) == 2  # renegotiated once the peer answers again
    assert len([sa for sa in a.engine.sas.values()]) == 1


def test_close_action_start() -> None:
    net, a, b, _ike, _child = established(a_over={"child_close_action": "start"})
    b.engine.delete_ike(next(iter(b.engine.sas)), net.now)
    net.run()
    assert len(a.of(IkeSaEstablished)) == 2
    assert_children_paired(a, b)


def test_dataplane_soft_and_hard_expiry() -> None:
    net, a, b, _ike, child = established()
    a.engine.child_expired(child, hard=False, now=net.now)
    net.run()
    assert a.of(ChildSaRekeyed)
    new = a.of(ChildSaRekeyed)[0].new_child_id
    a.engine.child_expired(new, hard=True, now=net.now)
    net.run()
    assert not live_children(a) and not live_children(b)


def test_traffic_seen_suppresses_dpd() -> None:
    net, a, _b, ike, child = established(a_over={"dpd_delay": "30s"})
    for _ in range(5):
        net.advance(20)
        a.engine.child_traffic_seen(child, net.now)
    assert a.engine.sas[ike].counters.get("dpd_sent") is None


def test_initial_contact_replaces_stale_sa() -> None:
    net, a, b, ike, _child = established()
    stale = next(iter(b.engine.sas))
    # a "reboots": forgets everything and connects again with INITIAL_CONTACT
    a.engine.sas[ike].destroy("reboot")
    a.engine._forget(a.engine.sas[ike])
    a.engine.initiate("ab", net.now)
    net.run()
    assert any(e.ike_sa == stale and "INITIAL_CONTACT" in e.reason for e in b.of(IkeSaDeleted))
    assert len(b.engine.sas) == 1


def _cert_pair(ca_kind: str, kind: str, *, inter: bool = False, a_id: str = "a.test") -> tuple:
    root = pki.make_ca(ca_kind)
    issuer = pki.make_ca(ca_kind, "Intermediate CA") if inter else root
    if inter:
        # re-issue the intermediate under the root
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes

        issuer_cert = (
            x509.CertificateBuilder()
            .subject_name(issuer.cert.subject)
            .issuer_name(root.cert.subject)
            .public_key(issuer.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(issuer.cert.not_valid_before_utc)
            .not_valid_after(issuer.cert.not_valid_after_utc)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(issuer.key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(root.key.public_key()),  # type: ignore[arg-type]
                critical=False,
            )
            .sign(root.key, hashes.SHA256())
        )
        issuer = pki.Issued(issuer_cert, issuer.key)
    ea = pki.issue(issuer, "a.test", kind)
    eb = pki.issue(issuer, "b.test", kind)
    chain_a = [ea.cert, issuer.cert] if inter else [ea.cert]
    chain_b = [eb.cert, issuer.cert] if inter else [eb.cert]
    return pair(
        a_over={
            "local": {"auth": "pubkey", "id": a_id, "certs": chain_a, "private_key": ea.key},
            "remote": {"auth": "pubkey", "id": "b.test"},
            "cacerts": [root.cert],
        },
        b_over={
            "local": {"auth": "pubkey", "id": "b.test", "certs": chain_b, "private_key": eb.key},
            "remote": {"auth": "pubkey", "id": "%any"},
            "cacerts": [root.cert],
        },
    )


@pytest.mark.parametrize(("kind", "inter"), [("ecdsa", True), ("rsa", False), ("ecdsa384", False)])
def test_certificate_chains(kind: str, inter: bool) -> None:
    net, a, b = _cert_pair("ecdsa" if kind != "rsa" else "rsa", kind, inter=inter)
    a.engine.initiate("ab", net.now)
    net.run()
    assert a.of(ChildSaEstablished) and b.of(ChildSaEstablished), (a.events, b.events)
    assert b.of(IkeSaEstablished)[0].remote_id == "a.test"


def test_certificate_must_contain_the_identity() -> None:
    with pytest.raises(ValueError, match="not in the certificate"):
        _cert_pair("ecdsa", "ecdsa", a_id="c.test")


def test_untrusted_certificate_fails_authentication() -> None:
    net, a, b = _cert_pair("ecdsa", "ecdsa")
    other = pki.make_ca("ecdsa", "Other CA")
    cfg = b.engine.configs["ab"]
    import dataclasses

    b.engine.configs["ab"] = dataclasses.replace(cfg, cacerts=(other.cert,))
    a.engine.initiate("ab", net.now)
    net.run()
    f = b.of(NegotiationFailed)
    assert f and f[0].notify == NotifyType.AUTHENTICATION_FAILED and "chain" in f[0].reason
    assert not a.of(ChildSaEstablished)


@pytest.mark.parametrize("kind", ["rsa", "ecdsa", "ecdsa384"])
@pytest.mark.parametrize("peer_hashes", [(), (2, 3, 4)])
def test_signature_methods(kind: str, peer_hashes: tuple[int, ...]) -> None:
    from esplanade.keyexchange.ikev2.auth.signature import SignatureError, sign, verify

    key = pki.new_key(kind)
    method, data = sign(key, b"octets", peer_hashes)
    if peer_hashes:
        assert method == 14
    else:
        assert method == (1 if kind == "rsa" else {"ecdsa": 9, "ecdsa384": 10}[kind])
    verify(key.public_key(), method, data, b"octets")
    with pytest.raises(SignatureError):
        verify(key.public_key(), method, data, b"other octets")
    if kind == "rsa":
        m, d = sign(key, b"octets", (2,), pss=True)
        verify(key.public_key(), m, d, b"octets")


def test_children_survive_ike_rekey_then_delete_cleanly() -> None:
    net, a, b, ike, _child = established()
    a.engine.create_child(ike, "net", net.now)
    net.run()
    a.engine.rekey_ike(ike, net.now)
    net.run()
    assert_children_paired(a, b, 2)
    new = next(iter(a.engine.sas))
    a.engine.delete_ike(new, net.now)
    net.run()
    assert len(a.of(ChildSaDeleted)) == 2 and len(b.of(ChildSaDeleted)) == 2


def test_initiator_rejecting_responder_auth_tells_the_responder() -> None:
    """§2.21.2: the initiator reports AUTHENTICATION_FAILED in a separate INFORMATIONAL; both sides drop the SA."""
    import dataclasses

    net, a, b = _cert_pair("ecdsa", "ecdsa")
    other = pki.make_ca("ecdsa", "Other CA")
    a.engine.configs["ab"] = dataclasses.replace(a.engine.configs["ab"], cacerts=(other.cert,))
    a.engine.initiate("ab", net.now)
    net.run()
    assert a.of(NegotiationFailed)[0].notify == NotifyType.AUTHENTICATION_FAILED
    fail_b = b.of(NegotiationFailed)
    assert fail_b and fail_b[0].notify == NotifyType.AUTHENTICATION_FAILED
    assert not a.engine.sas and not b.engine.sas
