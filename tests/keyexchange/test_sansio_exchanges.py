"""Two Esplanade peers in memory: every exchange, with a fake clock and no sockets."""

from __future__ import annotations

import ipaddress

import pytest

from esplanade.keyexchange.config import ConnectionConfig, PoolConfig
from esplanade.keyexchange.ikev2.constants import ExchangeType, NotifyType
from esplanade.keyexchange.ikev2.events import (
    ChildSaDeleted,
    ChildSaEstablished,
    ChildSaRekeyed,
    IkeSaDeleted,
    IkeSaEstablished,
    IkeSaRekeyed,
    InstallInboundSa,
    NegotiationFailed,
)
from esplanade.keyexchange.ikev2.ike_sa import IkeState
from esplanade.keyexchange.ikev2.message import parse_header
from tests.keyexchange.memnet import MemNet
from tests.keyexchange.peers import assert_children_paired, conn, established, live_children, pair


def test_establish_and_keys_agree() -> None:
    _net, a, b, ike, _ = established()
    assert_children_paired(a, b)
    sa_a, sa_b = a.engine.sas[ike], next(iter(b.engine.sas.values()))
    assert sa_a.keys == sa_b.keys
    assert a.of(IkeSaEstablished)[0].remote_id == "b.test"


@pytest.mark.parametrize("pfs", [False, True])
def test_create_child(pfs: bool) -> None:
    esp = ["aes256gcm16-ecp256"] if pfs else ["aes256gcm16"]
    net, a, b, ike, _ = established(a_over={"child_esp_proposals": esp}, b_over={"child_esp_proposals": esp})
    a.engine.create_child(ike, "net", net.now)
    net.run()
    assert len(a.of(ChildSaEstablished)) == 2 and len(b.of(ChildSaEstablished)) == 2
    assert_children_paired(a, b, 2)


@pytest.mark.parametrize("side", ["initiator", "responder"])
def test_child_rekey_make_before_break(side: str) -> None:
    net, a, b, _ike, _child = established()
    x, _y = (a, b) if side == "initiator" else (b, a)
    sa = next(iter(x.engine.sas.values()))
    x.engine.rekey_child(sa.id, next(iter(sa.children)), net.now)
    net.run()
    for n in (a, b):
        ev = n.of(ChildSaRekeyed)
        assert len(ev) == 1
        # the new SA was announced before the old one was deleted
        assert n.events.index(ev[0]) < n.events.index(n.of(ChildSaDeleted)[0])
    assert_children_paired(a, b)


@pytest.mark.parametrize("side", ["initiator", "responder"])
def test_ike_rekey(side: str) -> None:
    net, a, b, _ike, _child = established()
    x = a if side == "initiator" else b
    x.engine.rekey_ike(next(iter(x.engine.sas)), net.now)
    net.run()
    for n in (a, b):
        assert n.of(IkeSaRekeyed) and n.of(IkeSaDeleted)
        assert len(n.engine.sas) == 1
        assert next(iter(n.engine.sas.values())).state == IkeState.ESTABLISHED
    assert_children_paired(a, b)
    # the new IKE SA carries further exchanges
    new = next(iter(a.engine.sas))
    a.engine.rekey_child(new, next(iter(a.engine.sas[new].children)), net.now)
    net.run()
    assert_children_paired(a, b)


def test_simultaneous_child_rekey() -> None:
    """§2.8.1: both rekey the same Child SA; the SA with the lowest nonce is deleted by its creator."""
    net, a, b, ike, child = established()
    sb = next(iter(b.engine.sas.values()))
    a.engine.rekey_child(ike, child, net.now)
    b.engine.rekey_child(sb.id, next(iter(sb.children)), net.now)
    net.run()
    assert_children_paired(a, b)
    won = a.engine.sas[ike].counters.get("child_rekey_collisions_won", 0) + sb.counters.get(
        "child_rekey_collisions_won", 0
    )
    lost = a.engine.sas[ike].counters.get("child_rekey_collisions_lost", 0) + sb.counters.get(
        "child_rekey_collisions_lost", 0
    )
    assert (won, lost) == (1, 1)


def test_simultaneous_ike_rekey() -> None:
    """§2.8.2: both rekey the IKE SA; one new IKE SA survives with the Child SA."""
    net, a, b, ike, _child = established()
    a.engine.rekey_ike(ike, net.now)
    b.engine.rekey_ike(next(iter(b.engine.sas)), net.now)
    net.run()
    net.advance(15)
    assert len(a.engine.sas) == 1 and len(b.engine.sas) == 1, (a.engine.sas, b.engine.sas)
    sa_a, sa_b = next(iter(a.engine.sas.values())), next(iter(b.engine.sas.values()))
    assert (sa_a.spi_i, sa_a.spi_r) == (sa_b.spi_i, sa_b.spi_r)
    assert sa_a.keys == sa_b.keys
    assert_children_paired(a, b)


def test_child_request_during_ike_rekey_gets_temporary_failure() -> None:
    """§2.25.2: a CREATE_CHILD_SA arriving while we rekey the IKE SA is refused with TEMPORARY_FAILURE."""
    net, a, b, ike, _child = established()
    sb = next(iter(b.engine.sas.values()))
    a.engine.rekey_ike(ike, net.now)  # request in flight, not delivered yet
    net.collect(a)
    b.engine.rekey_child(sb.id, next(iter(sb.children)), net.now)
    net.collect(b)
    net.run()
    assert a.engine.counters == a.engine.counters
    refused = sum(sa.counters.get("refused_temporary_failure", 0) for sa in a.engine.sas.values())
    retried = [e for e in b.of(ChildSaRekeyed)]
    assert refused == 1 or retried  # refused, then retried later over the new IKE SA
    net.advance(10)
    assert_children_paired(a, b)


def test_rekey_of_unknown_child_gets_child_sa_not_found() -> None:
    net, a, b, ike, child = established()
    sb = next(iter(b.engine.sas.values()))
    c_b = next(iter(sb.children.values()))
    # b forgets the child without telling a (e.g. it expired there)
    sb.remove_child(c_b, "test")
    a.engine.rekey_child(ike, child, net.now)
    net.run()
    assert not live_children(a)  # a drops it on CHILD_SA_NOT_FOUND
    assert any(e.child_id == child for e in a.of(ChildSaDeleted))


def test_deletes() -> None:
    net, a, b, ike, child = established()
    a.engine.delete_child(ike, child, net.now)
    net.run()
    assert a.of(ChildSaDeleted) and b.of(ChildSaDeleted)
    assert not live_children(a) and not live_children(b)
    b.engine.delete_ike(next(iter(b.engine.sas)), net.now)
    net.run()
    assert a.of(IkeSaDeleted) and b.of(IkeSaDeleted)
    assert not a.engine.sas and not b.engine.sas


def test_dpd_round_trip_and_dead_peer() -> None:
    net, a, _b, ike, child = established(a_over={"dpd_delay": "30s"})
    net.advance(31)
    assert a.engine.sas[ike].counters.get("dpd_sent") == 1
    assert a.engine.sas[ike].state == IkeState.ESTABLISHED
    net.drop = lambda d: True  # b dies
    net.advance(31 + 4 + 7.2 + 12.96 + 23.33 + 41.99 + 80)
    ev = a.of(IkeSaDeleted)
    assert ev and "dead peer" in ev[0].reason
    assert any(e.child_id == child for e in a.of(ChildSaDeleted))


def test_retransmission_backoff_schedule() -> None:
    net, a, _b = pair()
    sent: list[float] = []

    def drop(d: object) -> bool:
        sent.append(net.now)
        return True

    net.drop = drop
    a.engine.initiate("ab", net.now)
    net.advance(400)
    start = sent[0]
    deltas = [round(t - start, 2) for t in sent]
    assert deltas == [0, 4.0, 11.2, 24.16, 47.49, 89.48]
    fail = a.of(NegotiationFailed)
    assert fail and "retransmission" in fail[0].reason


def test_lost_request_and_lost_response() -> None:
    net, a, b = pair()
    dropped: set[tuple[int, bool]] = set()

    def drop_once(d: object) -> bool:
        h = parse_header(d.data)  # type: ignore[attr-defined]
        key = (h.exchange, h.is_response)
        if key in ((ExchangeType.IKE_AUTH, False), (ExchangeType.IKE_AUTH, True)) and key not in dropped:
            dropped.add(key)
            return True
        return False

    net.drop = drop_once
    a.engine.initiate("ab", net.now)
    net.advance(20)
    assert len(dropped) == 2
    sb = next(iter(b.engine.sas.values()))
    assert sb.counters.get("retransmitted_requests") == 1  # the second copy was answered from the cache
    assert len(b.of(ChildSaEstablished)) == 1 and len(a.of(ChildSaEstablished)) == 1
    assert_children_paired(a, b)


def test_duplicate_request_answered_from_cache() -> None:
    net, a, b, ike, _child = established()
    a.engine.dpd(ike, net.now)
    net.collect(a)
    dup = list(net.in_flight)
    net.run()
    sb = next(iter(b.engine.sas.values()))
    before = len(net.log)
    for d, _ in dup:
        b.engine.receive_datagram(d.wire_bytes(), d.remote, d.local, net.now)
    net.collect(b)
    assert sb.counters.get("retransmitted_requests") == 1
    assert len(net.log) == before + 1
    # same message ID, different bytes: not a retransmission, no reflection of the cached response
    d = dup[0][0]
    forged = d.data[:-1] + bytes((d.data[-1] ^ 1,))
    b.engine.receive_datagram(forged, d.remote, d.local, net.now)
    net.collect(b)
    assert sb.counters.get("dropped_not_a_retransmission") == 1
    assert len(net.log) == before + 1


def test_invalid_ke_payload_retry() -> None:
    net, a, _b = pair(
        a_over={"proposals": ["aes256gcm16-prfsha256-ecp256-x25519"]},
        b_over={"proposals": ["aes256gcm16-prfsha256-x25519"]},
    )
    ike = a.engine.initiate("ab", net.now)
    net.run()
    assert a.of(IkeSaEstablished)
    assert "curve25519" in a.of(IkeSaEstablished)[0].suite
    assert a.engine.sas[ike].counters.get("invalid_ke_retries") == 1


def test_cookie_challenge() -> None:
    net, a, b = pair()
    b.engine._cookie_required = lambda ip: True  # type: ignore[method-assign]
    ike = a.engine.initiate("ab", net.now)
    net.run()
    assert a.of(ChildSaEstablished)
    assert a.engine.sas[ike].counters.get("cookie_retries") == 1
    assert b.engine.counters.get("cookies_sent") == 1 and b.engine.counters.get("cookies_valid") == 1


def test_cookie_threshold_counts_half_open() -> None:
    net, a, b = pair(cookie_threshold=2, cookie_threshold_ip=0)
    net.drop = lambda d: parse_header(d.data).exchange == ExchangeType.IKE_AUTH  # type: ignore[attr-defined]
    for _ in range(3):
        a.engine.initiate("ab", net.now)
    net.run()
    # the third initiator was challenged, answered the COOKIE and got its half-open SA
    assert b.engine.counters.get("cookies_sent") == 1 and b.engine.counters.get("cookies_valid") == 1
    assert b.engine.half_open_count() == 3


def test_fragmentation_small_mtu() -> None:
    from tests.keyexchange import pki

    ca = pki.make_ca("rsa")
    ea, eb = pki.issue(ca, "a.test", "rsa"), pki.issue(ca, "b.test", "rsa")

    def over(mine: pki.Issued) -> dict:
        return {
            "local": {"auth": "pubkey", "id": mine.cert.subject.rfc4514_string().replace(",", ", ") and "a.test"},
            "fragment_size": 576,
            "cacerts": [ca.cert],
        }

    net, a, b = pair(
        a_over={
            "local": {"auth": "pubkey", "id": "a.test", "certs": [ea.cert], "private_key": ea.key},
            "remote": {"auth": "pubkey", "id": "b.test"},
            "cacerts": [ca.cert],
            "fragment_size": 576,
        },
        b_over={
            "local": {"auth": "pubkey", "id": "b.test", "certs": [eb.cert], "private_key": eb.key},
            "remote": {"auth": "pubkey", "id": "a.test"},
            "cacerts": [ca.cert],
            "fragment_size": 576,
        },
    )
    a.engine.initiate("ab", net.now)
    net.run()
    assert a.of(ChildSaEstablished) and b.of(ChildSaEstablished)
    auth = [d for d in net.log if parse_header(d.data).exchange == ExchangeType.IKE_AUTH]
    assert len(auth) > 4 and all(len(d.data) <= 576 - 28 for d in auth)


def test_certificate_revoked_by_crl() -> None:
    from tests.keyexchange import pki

    ca = pki.make_ca("ecdsa")
    ea, eb = pki.issue(ca, "a.test"), pki.issue(ca, "b.test")
    net, a, b = pair(
        a_over={
            "local": {"auth": "pubkey", "id": "a.test", "certs": [ea.cert], "private_key": ea.key},
            "remote": {"auth": "pubkey", "id": "b.test"},
            "cacerts": [ca.cert],
        },
        b_over={
            "local": {"auth": "pubkey", "id": "b.test", "certs": [eb.cert], "private_key": eb.key},
            "remote": {"auth": "pubkey", "id": "a.test"},
            "cacerts": [ca.cert],
            "crls": [pki.crl(ca, [ea.cert])],
        },
    )
    a.engine.initiate("ab", net.now)
    net.run()
    fail = b.of(NegotiationFailed)
    assert fail and fail[0].notify == NotifyType.AUTHENTICATION_FAILED and "revoked" in fail[0].reason
    assert a.of(NegotiationFailed)[0].notify == NotifyType.AUTHENTICATION_FAILED
    assert not b.engine.sas and not a.engine.sas


def test_reauth_make_before_break() -> None:
    net, a, b, ike, child = established()
    a.engine.reauth(ike, net.now)
    net.run()
    est = a.of(IkeSaEstablished)
    assert len(est) == 2 and est[1].reauth_of == ike
    assert any(e.ike_sa == ike for e in a.of(IkeSaDeleted))
    # the new child came up before the old IKE SA (and its child) went away
    new_child = next(e for e in a.of(ChildSaEstablished) if e.ike_sa == est[1].ike_sa)
    old_gone = next(e for e in a.of(ChildSaDeleted) if e.child_id == child)
    assert a.events.index(new_child) < a.events.index(old_gone)
    assert len(a.engine.sas) == 1 and len(b.engine.sas) == 1
    assert_children_paired(a, b)


def test_ts_narrowing() -> None:
    _net, a, _b, _ike, _child = established(
        a_over={"child_remote_ts": "10.0.0.0/8", "child_local_ts": "10.1.0.0/16,192.168.5.0/24"},
        b_over={"child_local_ts": "10.2.0.0/16", "child_remote_ts": "10.1.0.0/16"},
    )
    rec = a.of(ChildSaEstablished)[0].record
    assert [str(t) for t in rec.outbound.remote_ts] == ["10.2.0.0/16"]
    assert [str(t) for t in rec.outbound.local_ts] == ["10.1.0.0/16"]


def test_ts_unacceptable() -> None:
    net, a, b = pair(a_over={"child_remote_ts": "172.16.0.0/12"})
    a.engine.initiate("ab", net.now)
    net.run()
    assert a.of(IkeSaEstablished)  # the IKE SA stands, the child does not
    f = a.of(NegotiationFailed)
    assert f and f[0].notify == NotifyType.TS_UNACCEPTABLE
    assert b.of(NegotiationFailed)[0].notify == NotifyType.TS_UNACCEPTABLE


def test_cp_virtual_ip_and_split_routes() -> None:
    pool = PoolConfig(
        "rw",
        ipaddress.ip_network("10.99.0.0/24"),
        dns=(ipaddress.ip_address("10.99.0.53"),),
        subnets=(ipaddress.ip_network("10.2.0.0/16"), ipaddress.ip_network("10.3.0.0/16")),
    )
    net, a, b = pair(
        a_over={"vips": ["0.0.0.0"], "child_remote_ts": "10.2.0.0/16"},
        b_over={"pools": ["rw"], "child_remote_ts": "10.99.0.0/24"},
        pools={"rw": pool},
    )
    a.engine.initiate("ab", net.now)
    net.run()
    est = a.of(IkeSaEstablished)[0]
    assert est.virtual_ips == ("10.99.0.1",)
    assert est.dns == ("10.99.0.53",)
    assert est.split_subnets == ("10.2.0.0/16", "10.3.0.0/16")
    assert b.of(IkeSaEstablished)[0].virtual_ips == ("10.99.0.1",)
    rec = a.of(ChildSaEstablished)[0].record
    assert [str(t) for t in rec.outbound.local_ts] == ["10.99.0.1/32"]


def test_mlkem_via_ike_intermediate() -> None:
    prop = ["aes256gcm16-prfsha256-ecp256-ke1_mlkem768"]
    net, a, b, ike, _child = established(a_over={"proposals": prop}, b_over={"proposals": prop})
    assert "ke1_ml_kem_768" in a.of(IkeSaEstablished)[0].suite
    sa_a, sa_b = a.engine.sas[ike], next(iter(b.engine.sas.values()))
    assert len(sa_a.shared_secrets) == 2 and sa_a.shared_secrets == sa_b.shared_secrets
    assert sa_a.keys == sa_b.keys and sa_a.int_auth_i and sa_a.int_auth_i == sa_b.int_auth_i
    exchanges = [parse_header(d.data).exchange for d in net.log]
    assert ExchangeType.IKE_INTERMEDIATE in exchanges
    assert_children_paired(a, b)


def test_lifetimes_with_jitter() -> None:
    net, a, b, ike, child = established(
        a_over={"child_rekey_time": "100s", "child_life_time": "130s", "rekey_time": "1000s"},
        b_over={"child_rekey_time": "100s", "child_life_time": "130s", "rekey_time": "1000s"},
    )
    ca = a.engine.sas[ike].children[child]
    assert ca.rekey_at is not None and net.now + 70 <= ca.rekey_at <= net.now + 100
    cb = next(iter(next(iter(b.engine.sas.values())).children.values()))
    assert cb.rekey_at != ca.rekey_at  # the peers do not rekey in lockstep
    sa = a.engine.sas[ike]
    assert sa.rekey_at is not None and net.now + 900 <= sa.rekey_at <= net.now + 1000
    net.advance(1100)
    assert a.of(ChildSaRekeyed) and (a.of(IkeSaRekeyed) or b.of(IkeSaRekeyed))
    assert len(live_children(a)) == 1
    assert_children_paired(a, b)


def test_responder_holds_response_until_inbound_sa_installed() -> None:
    net, a, b = pair()
    b.auto_ack = False
    a.engine.initiate("ab", net.now)
    net.run()
    assert b.held_installs and not a.of(IkeSaEstablished)
    ev = b.held_installs.pop()
    assert isinstance(ev, InstallInboundSa) and ev.sa.spi
    b.engine.inbound_sa_installed(ev.ike_sa, ev.child_id, net.now)
    net.run()
    assert a.of(ChildSaEstablished)
    assert a.of(ChildSaEstablished)[0].record.outbound.spi == ev.sa.spi


def test_unauthenticated_message_changes_nothing() -> None:
    net, _a, b, _ike, _child = established()
    sb = next(iter(b.engine.sas.values()))
    snapshot = (sb.state, sb.next_peer_id, sb.next_request_id, dict(sb.children), sb.remote)
    # a forged INFORMATIONAL "Delete IKE" with the right SPIs and message ID but a bad ICV
    from esplanade.ipsec.transforms import ENCR_AES_GCM_16_256
    from esplanade.keyexchange.ikev2.crypto.sk import SkCipher
    from esplanade.keyexchange.ikev2.message import Message, encode_encrypted
    from esplanade.keyexchange.ikev2.payloads import DeletePayload

    forged = Message(sb.spi_i, sb.spi_r, ExchangeType.INFORMATIONAL, sb.next_peer_id, True, False, [DeletePayload(1)])
    raws, _ = encode_encrypted(forged, SkCipher(ENCR_AES_GCM_16_256, bytes(36), None, b""))
    b.engine.receive_datagram(raws[0], (b.ip, 500), ("203.0.113.9", 4500), net.now)
    # a forged IKE_SA_INIT response and garbage
    b.engine.receive_datagram(b"\x00" * 40, (b.ip, 500), ("203.0.113.9", 500), net.now)
    net.collect(b)
    assert (sb.state, sb.next_peer_id, sb.next_request_id, dict(sb.children), sb.remote) == snapshot
    assert sb.counters.get("icv_failures") == 1
    assert not b.of(IkeSaDeleted)


def test_nat_traversal_float_keepalive_and_mapping_change() -> None:
    """§2.23: NAT-D detects the NAT, IKE floats to 4500, keepalives flow, a new mapping is followed."""
    net, a, b = pair(b_over={"remote_addrs": []})  # a road warrior: any address
    net.add_nat(a.ip, "203.0.113.1", 31000)
    ike = a.engine.initiate("ab", net.now)
    net.run()
    ea, eb = a.of(IkeSaEstablished)[0], b.of(IkeSaEstablished)[0]
    assert ea.nat_local and not ea.nat_remote and eb.nat_remote and not eb.nat_local
    sa_a, sa_b = a.engine.sas[ike], next(iter(b.engine.sas.values()))
    assert sa_a.local[1] == 4500 and sa_a.remote == (b.ip, 4500)
    assert sa_b.remote == ("203.0.113.1", 31001)
    rec = b.of(ChildSaEstablished)[0].record
    assert rec.outbound.encap is not None and rec.outbound.encap.dst_port == 31001
    auth = [d for d, _ in net.received if d.non_esp_marker]
    assert auth and all(d.wire_bytes()[:4] == b"\0\0\0\0" for d in auth)
    net.advance(21)
    assert any(d.data == b"\xff" and not d.non_esp_marker for d in net.log)
    # the NAT box reboots: new public port; the next authenticated message moves b's peer endpoint
    net.add_nat(a.ip, "203.0.113.1", 32000)
    a.engine.dpd(ike, net.now)
    net.run()
    assert sa_b.remote == ("203.0.113.1", 32001)
    assert sa_b.counters.get("nat_mapping_changes") == 1
    moved = b.of(ChildSaEstablished)[-1].record
    assert moved.outbound.encap is not None and moved.outbound.encap.dst_port == 32001


def test_forced_encapsulation_without_nat() -> None:
    net, a, b = pair(a_over={"encap": True})
    ike = a.engine.initiate("ab", net.now)
    net.run()
    assert b.of(IkeSaEstablished)[0].nat_remote  # a faked its NAT-D source hash
    assert a.engine.sas[ike].local[1] == 4500
    assert a.of(ChildSaEstablished)[0].record.outbound.encap is not None


def test_ike_rekey_with_additional_ke_uses_followup() -> None:
    """RFC 9370 §2.2.4: an IKE rekey with ke1_mlkem768 runs IKE_FOLLOWUP_KE; both secrets feed SKEYSEED."""
    prop = ["aes256gcm16-prfsha256-ecp256-ke1_mlkem768"]
    net, a, b, ike, _child = established(a_over={"proposals": prop}, b_over={"proposals": prop})
    a.engine.rekey_ike(ike, net.now)
    net.run()
    assert a.of(IkeSaRekeyed) and b.of(IkeSaRekeyed)
    sa_a, sa_b = next(iter(a.engine.sas.values())), next(iter(b.engine.sas.values()))
    assert sa_a.id != ike and sa_a.keys == sa_b.keys
    assert len(sa_a.shared_secrets) == 2 and sa_a.shared_secrets == sa_b.shared_secrets
    assert ExchangeType.IKE_FOLLOWUP_KE in [parse_header(d.data).exchange for d in net.log]
    assert_children_paired(a, b)


def test_child_with_additional_ke_uses_followup() -> None:
    esp = ["aes256gcm16-ecp256-ke1_mlkem768"]
    net, a, b, ike, child = established(a_over={"child_esp_proposals": esp}, b_over={"child_esp_proposals": esp})
    a.engine.rekey_child(ike, child, net.now)
    net.run()
    assert a.of(ChildSaRekeyed) and b.of(ChildSaRekeyed)
    followups = {
        (h.message_id, h.is_response)
        for h in (parse_header(d.data) for d in net.log)
        if h.exchange == ExchangeType.IKE_FOLLOWUP_KE
    }
    assert len(followups) == 2  # one exchange: request (fragmented: ML-KEM key) and response
    assert_children_paired(a, b)


def test_followup_with_unknown_link_gets_state_not_found() -> None:
    from esplanade.keyexchange.ikev2.tasks.ike_followup_ke import FollowupKe

    net, a, _b, ike, _child = established()
    sa = a.engine.sas[ike]

    class Owner:
        shared: list[bytes] = []
        link = b"\x01" * 8
        remaining = [36]
        failed: list[int] = []

        def followup_done(self, ike: object, now: float, task: object) -> None:
            raise AssertionError("must not complete")

        def followup_failed(self, ike: object, notify: int, reason: str, now: float) -> None:
            self.failed.append(notify)

    owner = Owner()
    sa.queue_task(FollowupKe(owner, 36, True))  # type: ignore[arg-type]
    a.engine._run(sa, net.now)
    net.run()
    assert owner.failed == [NotifyType.STATE_NOT_FOUND]


def test_ipv6_peers_and_selectors() -> None:
    net = MemNet()
    from esplanade.keyexchange.config import ConnectionConfig
    from esplanade.keyexchange.ikev2.dispatcher import IkeDispatcher
    from tests.keyexchange.peers import conn

    def cfg(side: str) -> ConnectionConfig:
        d = conn(side)
        d["local_addrs"], d["remote_addrs"] = (["2001:db8::1"], ["2001:db8::2"])[:: 1 if side == "a" else -1]
        d["children"]["net"]["local_ts"] = "fd00:1::/64" if side == "a" else "fd00:2::/64"
        d["children"]["net"]["remote_ts"] = "fd00:2::/64" if side == "a" else "fd00:1::/64"
        return ConnectionConfig.from_dict("ab", d)

    a = net.add("a", "2001:db8::1", IkeDispatcher([cfg("a")], now=net.now))
    b = net.add("b", "2001:db8::2", IkeDispatcher([cfg("b")], now=net.now))
    a.engine.initiate("ab", net.now)
    net.run()
    rec = a.of(ChildSaEstablished)[0].record
    rec.validate()
    assert rec.outbound.dst == "2001:db8::2" and str(rec.outbound.remote_ts[0]) == "fd00:2::/64"
    assert_children_paired(a, b)


def test_timer_heap_stays_bounded() -> None:
    net, a, b = pair(require_install_ack=False)
    for _ in range(60):
        ike = a.engine.initiate("ab", net.now)
        net.run()
        a.engine.delete_ike(ike, net.now)
        net.run()
    assert not a.engine.sas and not b.engine.sas
    assert len(b.engine._timer_heap) <= 64 and len(a.engine._timer_heap) <= 64
    assert b.engine.half_open_count() == 0


def test_lost_fragment_is_recovered_by_retransmission() -> None:
    """RFC 7383: a lost fragment makes the whole message retransmit; reassembly completes then."""
    from esplanade.keyexchange.ikev2.payloads import decode_chain

    esp = ["aes256gcm16-ecp256-ke1_mlkem768"]  # the ML-KEM key forces fragmentation of the rekey
    net, a, b, ike, child = established(a_over={"child_esp_proposals": esp}, b_over={"child_esp_proposals": esp})
    dropped: list[int] = []

    def drop_second_fragment(d: object) -> bool:
        h = parse_header(d.data)  # type: ignore[attr-defined]
        if h.exchange != ExchangeType.IKE_FOLLOWUP_KE or h.is_response or dropped:
            return False
        payloads, _ = decode_chain(d.data[28:], h.first_payload, outer=True)  # type: ignore[attr-defined]
        if payloads and getattr(payloads[-1], "number", 0) == 2:
            dropped.append(1)
            return True
        return False

    net.drop = drop_second_fragment
    a.engine.rekey_child(ike, child, net.now)
    net.advance(10)
    assert dropped and a.engine.sas[ike].counters.get("retransmits", 0) >= 1
    assert a.of(ChildSaRekeyed) and b.of(ChildSaRekeyed)
    assert_children_paired(a, b)


def test_acceptable_ke_of_the_initiator_is_taken_without_retry() -> None:
    """The responder prefers ecp256 but accepts x25519: the initiator's x25519 KE is used as sent."""
    net, a, _b = pair(
        a_over={"proposals": ["aes256gcm16-prfsha256-x25519-ecp256"]},
        b_over={"proposals": ["aes256gcm16-prfsha256-ecp256-x25519"]},
    )
    ike = a.engine.initiate("ab", net.now)
    net.run()
    assert "curve25519" in a.of(IkeSaEstablished)[0].suite
    assert a.engine.sas[ike].counters.get("invalid_ke_retries") is None


def test_a_child_rekey_is_checked_against_the_rekeyed_childs_config_only() -> None:
    """RFC 7296 §2.8: a rekey replaces an SA like for like. A child config listed before the
    rekeyed one whose selectors also cover the request (here: one that only takes AES-128)
    must not lend the new SA its proposals: the rekey keeps the rekeyed child's AES-256."""
    both = ["aes256gcm16", "aes128gcm16"]
    net, a, b, _ike, _child = established(a_over={"child_esp_proposals": both})
    sa_b = next(iter(b.engine.sas.values()))
    assert next(iter(sa_b.children.values())).suite.encr.key_bits == 256
    wide = ConnectionConfig.from_dict(
        "ab",
        {
            **conn("b"),
            "children": {
                "wide": {"local_ts": "10.0.0.0/8", "remote_ts": "10.0.0.0/8", "esp_proposals": ["aes128gcm16"]},
                **conn("b")["children"],
            },
        },
    )
    sa_b.config = wide  # e.g. a connection reloaded with a new first child, then reauthenticated
    sa_a = next(iter(a.engine.sas.values()))
    a.engine.rekey_child(sa_a.id, next(iter(sa_a.children)), net.now)
    net.run()
    (rekeyed,) = b.of(ChildSaRekeyed)
    new_child = sa_b.children[rekeyed.new_child_id]
    assert new_child.name == "net" and new_child.suite.encr.key_bits == 256
    assert_children_paired(a, b)
