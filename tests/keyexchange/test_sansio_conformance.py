"""RFC 7296 corner cases that interop runs do not reach: two Esplanade peers in memory."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from esplanade.keyexchange.config import ConnectionConfig
from esplanade.keyexchange.ikev2.child_sa import ChildState
from esplanade.keyexchange.ikev2.constants import ExchangeType, NotifyType
from esplanade.keyexchange.ikev2.errors import NegotiationError
from esplanade.keyexchange.ikev2.events import (
    ChildSaDeleted,
    ChildSaEstablished,
    ChildSaRekeyed,
    IkeSaDeleted,
    IkeSaRekeyed,
    NegotiationFailed,
)
from esplanade.keyexchange.ikev2.ike_sa import IkeSa, IkeState
from esplanade.keyexchange.ikev2.message import Message, decode_message, encode_plain, parse_header
from esplanade.keyexchange.ikev2.payloads import NotifyPayload, Payload, UnknownPayload
from esplanade.keyexchange.ikev2.tasks import child_create, child_negotiation, child_rekey, ike_rekey
from esplanade.keyexchange.ikev2.tasks.ike_dpd import IkeDpd
from tests.keyexchange.memnet import MemNet, Node
from tests.keyexchange.peers import A_IP, B_IP, assert_children_paired, conn, established, live_children, pair


def requests_from(net: MemNet, ip: str, exchange: int) -> int:
    return sum(
        1
        for d in net.log
        if d.local[0] == ip and not parse_header(d.data).is_response and parse_header(d.data).exchange == exchange
    )


def test_ike_rekey_while_creating_a_child_gets_temporary_failure_and_both_complete() -> None:
    """§2.25.1: a request to rekey the IKE SA while we are creating a Child SA is answered
    TEMPORARY_FAILURE. Before, b answered it, the children moved to the new IKE SA, and b's own
    CREATE_CHILD_SA (refused by a with TEMPORARY_FAILURE, §2.25.2) was queued on the old, rekeyed
    IKE SA where it never ran: the requested Child SA was silently lost."""
    net, a, b, ike, _child = established()
    sa_b = next(iter(b.engine.sas.values()))
    a.engine.rekey_ike(ike, net.now)
    net.collect(a)
    b.engine.create_child(sa_b.id, "net", net.now)
    net.collect(b)
    net.advance(30)
    assert a.of(IkeSaRekeyed) and b.of(IkeSaRekeyed)
    assert len(a.engine.sas) == 1 and len(b.engine.sas) == 1
    ca, cb = live_children(a), live_children(b)
    assert len(ca) == 2 and len(cb) == 2, (ca, cb)
    assert {(c.spi_in, c.spi_out) for c in ca} == {(c.spi_out, c.spi_in) for c in cb}


def test_ike_rekey_while_deleting_a_child_gets_temporary_failure() -> None:
    """§2.25.1: the same while we are closing a Child SA. Before, the children moved to the new
    IKE SA first, so the DELETE's response (on the old IKE SA) found no Child SA to remove and
    b kept one in DELETING that a had already deleted."""
    net, a, b, ike, _child = established()
    sa_b = next(iter(b.engine.sas.values()))
    a.engine.rekey_ike(ike, net.now)
    net.collect(a)
    b.engine.delete_child(sa_b.id, next(iter(sa_b.children)), net.now)
    net.collect(b)
    net.advance(30)
    assert len(a.engine.sas) == 1 and len(b.engine.sas) == 1
    assert not live_children(a) and not live_children(b), (live_children(a), live_children(b))
    assert a.of(IkeSaRekeyed) and b.of(IkeSaRekeyed)


def _answer_invalid_ke(monkeypatch: pytest.MonkeyPatch, task: type, group: int) -> None:
    """The responder (never the IKE SA's initiator here) demands `group` with INVALID_KE_PAYLOAD."""
    original = task.process_request

    def process_request(self: object, ike: IkeSa, msg: Message, now: float) -> list[Payload] | None:
        if ike.initiator:
            return original(self, ike, msg, now)  # type: ignore[no-any-return]
        return [NotifyPayload(NotifyType.INVALID_KE_PAYLOAD, struct.pack("!H", group))]

    monkeypatch.setattr(task, "process_request", process_request)


@pytest.mark.parametrize("group", [14, 0x7777])  # known but not offered; unknown to us
def test_child_invalid_ke_for_a_group_we_did_not_offer_fails_the_child_only(
    monkeypatch: pytest.MonkeyPatch, group: int
) -> None:
    """§1.3 / §2.7: the initiator retries with the group of INVALID_KE_PAYLOAD only if it offered
    it. Before, it sent a KE of any group the responder named (one it never proposed), and an
    unknown number raised out of the core (`dropped_internal_errors`), losing the exchange."""
    esp = ["aes256gcm16-ecp256"]
    net, a, _b, ike, _child = established(a_over={"child_esp_proposals": esp}, b_over={"child_esp_proposals": esp})
    _answer_invalid_ke(monkeypatch, child_create.ChildCreate, group)
    before = requests_from(net, A_IP, ExchangeType.CREATE_CHILD_SA)
    a.engine.create_child(ike, "net", net.now)
    net.advance(5)
    assert a.engine.counters.get("dropped_internal_errors") is None
    assert requests_from(net, A_IP, ExchangeType.CREATE_CHILD_SA) == before + 1
    failed = [e for e in a.of(NegotiationFailed) if e.exchange == "child_create"]
    assert failed and failed[0].notify == NotifyType.INVALID_KE_PAYLOAD
    assert a.engine.sas[ike].state == IkeState.ESTABLISHED and len(live_children(a)) == 1


@pytest.mark.parametrize("group", [14, 0x7777])
def test_ike_rekey_invalid_ke_for_a_group_we_did_not_offer_aborts_the_rekey(
    monkeypatch: pytest.MonkeyPatch, group: int
) -> None:
    """The same for an IKE SA rekey: no retry with a group we did not propose, no exception;
    the rekey is abandoned and the IKE SA stays established."""
    net, a, _b, ike, _child = established()
    _answer_invalid_ke(monkeypatch, ike_rekey.IkeRekey, group)
    before = requests_from(net, A_IP, ExchangeType.CREATE_CHILD_SA)
    a.engine.rekey_ike(ike, net.now)
    net.advance(5)
    assert a.engine.counters.get("dropped_internal_errors") is None
    assert requests_from(net, A_IP, ExchangeType.CREATE_CHILD_SA) == before + 1
    failed = [e for e in a.of(NegotiationFailed) if e.exchange == "ike_rekey"]
    assert failed and failed[0].notify == NotifyType.INVALID_KE_PAYLOAD
    assert a.engine.sas[ike].state == IkeState.ESTABLISHED


def test_child_rekey_retries_with_the_group_of_invalid_ke() -> None:
    """§1.3.3 / §2.7: a Child SA rekey answered INVALID_KE_PAYLOAD (for a group we offered) is
    retried with that group. Before, the retry found its own Child SA in REKEYING, `can_start`
    refused it and it was dropped: the Child SA stayed in REKEYING for good (never rekeyed again,
    and an IKE rekey waiting for `rekeying_children` to empty re-queued itself endlessly)."""
    net, a, b, ike, child = established(
        a_over={"child_esp_proposals": ["aes256gcm16-x25519-ecp256"]},
        b_over={"child_esp_proposals": ["aes256gcm16-ecp256"]},
    )
    a.engine.rekey_child(ike, child, net.now)
    net.advance(5)
    assert requests_from(net, A_IP, ExchangeType.CREATE_CHILD_SA) == 2  # the first one got INVALID_KE
    assert a.of(ChildSaRekeyed) and b.of(ChildSaRekeyed)
    assert not a.engine.sas[ike].rekeying_children
    ca, cb = live_children(a), live_children(b)
    assert len(ca) == 1 and len(cb) == 1 and ca[0].spi_in == cb[0].spi_out and ca[0].id != child
    a.engine.rekey_ike(ike, net.now)  # would spin forever while a rekey of a child hung
    net.advance(15)
    assert len(live_children(a)) == 1 and a.of(IkeSaRekeyed)


def test_ike_rekey_retries_with_the_group_of_invalid_ke() -> None:
    """§1.3.2 / §2.7: the same for an IKE SA rekey. Before, the retry found the IKE SA in
    REKEYING and was dropped: the IKE SA stayed in REKEYING (every later CREATE_CHILD_SA of the
    peer refused with TEMPORARY_FAILURE, no Child SA rekeyed) until its hard lifetime."""
    net, a, b, ike, _child = established(
        a_over={"proposals": ["aes256gcm16-prfsha256-x25519-ecp256"]},
        b_over={"proposals": ["aes256gcm16-prfsha256-x25519-ecp256"]},
    )
    sa_b = next(iter(b.engine.sas.values()))
    sa_b.config = ConnectionConfig.from_dict("ab", conn("b", proposals=["aes256gcm16-prfsha256-ecp256"]))
    a.engine.rekey_ike(ike, net.now)
    net.advance(15)
    assert requests_from(net, A_IP, ExchangeType.CREATE_CHILD_SA) == 2  # the first one got INVALID_KE
    assert a.of(IkeSaRekeyed) and b.of(IkeSaRekeyed)
    assert len(a.engine.sas) == 1 and len(b.engine.sas) == 1
    new_a = next(iter(a.engine.sas.values()))
    assert new_a.state == IkeState.ESTABLISHED and "ecp" in new_a.suite.describe().lower()
    assert len(live_children(a)) == 1 and len(live_children(b)) == 1


class CriticalUnknownPayload(UnknownPayload):
    """A payload type nobody knows, sent with the critical bit (§2.5)."""

    critical = True


class RecordingDpd(IkeDpd):
    """An INFORMATIONAL request of our choosing that keeps the response's payloads."""

    def __init__(self, payloads: list[Payload]) -> None:
        super().__init__()
        self.payloads = payloads
        self.response: list[Payload] = []

    def build_request(self, ike: IkeSa) -> list[Payload] | None:
        return self.payloads

    def process_response(self, ike: IkeSa, msg: Message, now: float) -> bool:
        self.response = list(msg.payloads)
        return False


def test_unsupported_critical_payload_in_a_request_is_named_in_the_notify() -> None:
    """§2.5 / §3.10.1: the response to a request with an unknown critical payload carries
    UNSUPPORTED_CRITICAL_PAYLOAD whose Notification Data is the one-octet payload type.
    Before, the notify went out without data."""
    net, a, b, ike, _child = established()
    sa_a = a.engine.sas[ike]
    task = RecordingDpd([CriticalUnknownPayload(200, b"what")])
    sa_a.queue_task(task)
    a.engine._run(sa_a, net.now)
    net.run()
    assert task.response == [NotifyPayload(NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD, bytes((200,)))]
    sa_b = next(iter(b.engine.sas.values()))
    assert sa_b.state == IkeState.ESTABLISHED and sa_b.counters.get("invalid_syntax") == 1
    # the window moved on: the next request is answered as usual
    task = RecordingDpd([UnknownPayload(201, b"skipped")])  # not critical: ignored (§2.5)
    sa_a.queue_task(task)
    a.engine._run(sa_a, net.now)
    net.run()
    assert task.response == [] and sa_a.outstanding is None


def _first_init_request(net: MemNet, a: Node) -> bytes:
    a.engine.initiate("ab", net.now)
    net.collect(a)
    (datagram, _sender), *_ = net.in_flight
    net.in_flight.clear()
    assert parse_header(datagram.data).exchange == ExchangeType.IKE_SA_INIT
    return datagram.data


def test_unsupported_critical_payload_in_ike_sa_init_is_answered_without_state() -> None:
    """§2.5: an IKE_SA_INIT request with an unknown critical payload MUST be rejected and the
    response MUST carry UNSUPPORTED_CRITICAL_PAYLOAD (the payload type as data); the responder
    keeps no state for it. Before, the request was dropped unanswered."""
    net, a, b = pair()
    request = decode_message(_first_init_request(net, a))
    request.payloads.append(CriticalUnknownPayload(200, b"what"))
    b.engine.receive_datagram(encode_plain(request), (B_IP, 500), (A_IP, 500), net.now)
    (reply,) = b.engine.datagrams_to_send()
    answer = decode_message(reply.data)
    assert answer.response and not answer.from_initiator and answer.exchange == ExchangeType.IKE_SA_INIT
    assert (answer.spi_i, answer.spi_r, answer.message_id) == (request.spi_i, bytes(8), 0)
    assert answer.payloads == [NotifyPayload(NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD, bytes((200,)))]
    assert not b.engine.sas and b.engine.half_open_count() == 0
    # the initiator takes it as a refusal
    net.in_flight.append((reply, B_IP))
    net.run()
    failed = a.of(NegotiationFailed)
    assert failed and failed[0].notify == NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD


def test_ike_sa_init_of_a_higher_major_version_gets_invalid_major_version() -> None:
    """§2.5 / §1.5: a request of a higher major version is dropped and SHOULD be answered with an
    unprotected INVALID_MAJOR_VERSION, a response with the request's SPIs, Message ID and
    exchange type and our version (2.0) in the header. Before, it was dropped unanswered."""
    net, a, b = pair()
    v2 = _first_init_request(net, a)
    v3 = v2[:17] + b"\x30" + v2[18:]
    b.engine.receive_datagram(v3, (B_IP, 500), (A_IP, 500), net.now)
    (reply,) = b.engine.datagrams_to_send()
    hdr = parse_header(reply.data)
    assert hdr.version == 0x20 and hdr.is_response and not hdr.from_initiator
    assert (hdr.spi_i, hdr.spi_r, hdr.message_id, hdr.exchange) == (v2[:8], bytes(8), 0, ExchangeType.IKE_SA_INIT)
    assert decode_message(reply.data).payloads == [NotifyPayload(NotifyType.INVALID_MAJOR_VERSION)]
    assert not b.engine.sas
    # never answered: a response of a higher version (no loops), an IKEv1 message (major 1)
    response_v3 = v3[:19] + bytes((v3[19] | 0x20,)) + v3[20:]
    v1 = v2[:17] + b"\x10" + v2[18:]
    for data in (response_v3, v1):
        b.engine.receive_datagram(data, (B_IP, 500), (A_IP, 500), net.now)
        assert b.engine.datagrams_to_send() == []
    # a side that only initiates answers nothing
    net2, a2, _b2 = pair(responder=False)
    a2.engine.receive_datagram(v3, (A_IP, 500), (B_IP, 500), net2.now)
    assert a2.engine.datagrams_to_send() == []


def _reject_next_child_response(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The initiator finds the next Child SA the responder chose unacceptable (as if it picked
    a proposal we never offered); the responder has created and installed it by then."""
    original = child_negotiation.initiator_verify
    rejected: list[int] = []

    def initiator_verify(*args: Any, **kw: Any) -> Any:
        if not rejected:
            rejected.append(1)
            raise NegotiationError(NotifyType.NO_PROPOSAL_CHOSEN, "responder chose a proposal we did not offer")
        return original(*args, **kw)

    monkeypatch.setattr(child_negotiation, "initiator_verify", initiator_verify)
    return rejected


def test_a_child_rekey_response_we_reject_deletes_the_sa_the_responder_created(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CREATE_CHILD_SA response the initiator rejects still created (and installed) a Child SA
    at the responder: the initiator deletes it (as strongSwan's child_create does), and the
    responder's rekeyed Child SA, no longer replaced, is back in service. Before, the responder
    kept the new SA (its traffic went to an SA the initiator does not have) and its old one in
    REKEYED, so every later rekey of the initiator got TEMPORARY_FAILURE, retried every few
    seconds until the hard lifetime."""
    net, a, b, ike, child = established()
    rejected = _reject_next_child_response(monkeypatch)
    a.engine.rekey_child(ike, child, net.now)
    net.advance(5)
    assert rejected
    assert [(c.id, c.state) for c in live_children(a)] == [(child, ChildState.INSTALLED)]
    (only,) = live_children(b)
    assert only.spi_out == live_children(a)[0].spi_in and only.state == ChildState.INSTALLED
    net.advance(60)  # the initiator's retry (30 s after the failure) goes through
    assert requests_from(net, A_IP, ExchangeType.CREATE_CHILD_SA) <= 3
    assert a.of(ChildSaRekeyed) and b.of(ChildSaRekeyed)
    ca, cb = live_children(a), live_children(b)
    assert len(ca) == 1 and len(cb) == 1 and ca[0].spi_in == cb[0].spi_out and ca[0].id != child


def test_a_new_child_response_we_reject_deletes_the_sa_the_responder_created(monkeypatch: pytest.MonkeyPatch) -> None:
    net, a, b, ike, _child = established()
    _reject_next_child_response(monkeypatch)
    a.engine.create_child(ike, "net", net.now)
    net.advance(5)
    assert len(live_children(a)) == 1 and len(live_children(b)) == 1
    assert live_children(a)[0].spi_in == live_children(b)[0].spi_out


def test_an_ike_auth_child_we_reject_is_deleted_at_the_responder(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same for the Child SA of IKE_AUTH: the IKE SA stays up (§2.21.2 semantics), the
    Child SA the responder created is deleted."""
    net, a, b = pair()
    _reject_next_child_response(monkeypatch)
    ike = a.engine.initiate("ab", net.now)
    net.advance(5)
    assert a.engine.sas[ike].state == IkeState.ESTABLISHED
    assert next(iter(b.engine.sas.values())).state == IkeState.ESTABLISHED
    assert not live_children(a) and not live_children(b), live_children(b)


@pytest.mark.timeout(20)
def test_a_child_whose_config_is_gone_is_not_rekeyed_and_the_ike_sa_still_rekeys() -> None:
    """A Child SA whose child config is gone (state restored under a newer connection config) has
    nothing to build a rekey from. Before, ChildRekey marked it REKEYING, then build_request
    raised KeyError out of the core; the Child SA stayed in REKEYING, and the next IKE rekey,
    waiting for `rekeying_children` to empty, re-queued itself in run_queue forever (a hang)."""
    net, a, _b, ike, child = established()
    sa_a = a.engine.sas[ike]
    sa_a.config = ConnectionConfig.from_dict("ab", {**conn("a"), "children": {"other": conn("a")["children"]["net"]}})
    a.engine.rekey_child(ike, child, net.now)
    assert sa_a.children[child].state == ChildState.INSTALLED and not sa_a.rekeying_children
    assert sa_a.counters.get("rekeys_without_child_config") == 1
    a.engine.rekey_ike(ike, net.now)
    net.advance(15)
    assert a.of(IkeSaRekeyed) and len(live_children(a)) == 1


@pytest.mark.timeout(20)
def test_a_task_that_cannot_start_does_not_spin_the_queue() -> None:
    """An IKE rekey waits for a Child SA rekey to finish by queueing itself again; should that
    wait never end (here a stale entry), run_queue must return, not spin forever."""
    net, a, _b, ike, _child = established()
    sa_a = a.engine.sas[ike]
    sa_a.rekeying_children["stale"] = ike_rekey.IkeRekey()
    a.engine.rekey_ike(ike, net.now)  # returns: the rekey waits
    assert sa_a.state == IkeState.ESTABLISHED and sa_a.outstanding is None
    del sa_a.rekeying_children["stale"]
    a.engine.dpd(ike, net.now)  # the next run of the queue starts the waiting rekey first
    net.advance(15)
    assert a.of(IkeSaRekeyed)


def test_a_child_rekey_due_during_our_ike_rekey_runs_on_the_new_ike_sa() -> None:
    """A Child SA rekey that falls due while our IKE rekey is in flight waits in the queue; the
    Child SAs then move to the new IKE SA (§2.18) and so must the queued exchanges about them.
    Before, the task stayed on the old, rekeyed IKE SA where it could never start, and as its
    Child SA's rekey timer had been consumed, the Child SA was never rekeyed: it ran into its
    hard lifetime and was deleted with no replacement."""
    net, a, b, ike, child = established(
        a_over={"child_rekey_time": "100s", "child_life_time": "130s", "rekey_time": "1000s"},
        b_over={"child_rekey_time": "1000s", "child_life_time": "1300s", "rekey_time": "10000s"},
    )
    sa_a = a.engine.sas[ike]
    sa_a.children[child].rekey_at = net.now + 2  # falls due while the IKE rekey is retransmitted
    lost: list[int] = []

    def lose_first_ike_rekey(d: Any) -> bool:
        h = parse_header(d.data)
        if h.exchange == ExchangeType.CREATE_CHILD_SA and not h.is_response and not lost:
            lost.append(1)
            return True
        return False

    net.drop = lose_first_ike_rekey
    a.engine.rekey_ike(ike, net.now)
    net.advance(10)
    assert lost and sa_a.counters.get("retransmits") == 1
    assert a.of(IkeSaRekeyed) and a.of(ChildSaRekeyed) and b.of(ChildSaRekeyed)
    net.advance(200)  # well past the old Child SA's hard lifetime
    ca, cb = live_children(a), live_children(b)
    assert len(ca) == 1 and len(cb) == 1 and ca[0].spi_in == cb[0].spi_out
    assert not [e for e in a.events if isinstance(e, ChildSaDeleted) and "hard lifetime" in e.reason]


def test_an_ike_sa_at_its_hard_lifetime_tells_the_peer() -> None:
    """An IKE SA that reaches its hard lifetime (its rekeys failed) is deleted with a DELETE to
    the peer (§1.4.1; strongSwan does the same), without waiting for the answer: the lifetime is
    hard. Before, it vanished silently and the peer kept the IKE SA and its Child SAs, sending
    into SAs we no longer had, until its DPD or its own lifetime noticed."""
    net, a, b, _ike, _child = established(a_over={"rekey_time": "100s", "over_time": "20s", "rand_time": "10s"})
    sa_b = next(iter(b.engine.sas.values()))
    sa_b.config = ConnectionConfig.from_dict("ab", conn("b", proposals=["aes128gcm16-prfsha256-modp2048"]))
    net.advance(130)  # the IKE rekeys are refused (NO_PROPOSAL_CHOSEN); the hard lifetime is 120 s
    failed = [e for e in a.of(NegotiationFailed) if e.exchange == "ike_rekey"]
    assert failed and failed[0].notify == NotifyType.NO_PROPOSAL_CHOSEN
    assert [e.reason for e in a.of(IkeSaDeleted)] == ["IKE SA hard lifetime expired"]
    assert not a.engine.sas
    assert [e.reason for e in b.of(IkeSaDeleted)] == ["deleted by peer"]
    assert not b.engine.sas and not live_children(b)


def test_a_create_child_sa_while_we_delete_the_ike_sa_gets_temporary_failure() -> None:
    """§2.25.2: a request to create or rekey a Child SA (or the IKE SA) that arrives while we
    are closing the IKE SA SHOULD get TEMPORARY_FAILURE. The dispatch meant to (Refuse in
    DELETING) but the state table let no CREATE_CHILD_SA through in DELETING: the request was
    dropped unanswered (`requests_in_wrong_state`) and the peer's message ID window stalled."""
    net, a, b, ike, _child = established()
    sa_a = a.engine.sas[ike]
    sa_b = next(iter(b.engine.sas.values()))
    a.engine.delete_ike(ike, net.now)
    assert sa_a.state == IkeState.DELETING
    net.collect(a)
    net.in_flight.clear()  # a's DELETE is lost: a stays in DELETING for the moment
    b.engine.create_child(sa_b.id, "net", net.now)
    net.run()
    assert sa_a.counters.get("refused_temporary_failure") == 1
    assert sa_a.counters.get("requests_in_wrong_state") is None
    assert sa_a.next_peer_id == sa_b.next_request_id
    net.advance(60)  # a's retransmitted DELETE closes both
    assert not a.engine.sas and not b.engine.sas


def test_a_new_child_refused_with_temporary_failure_is_retried_later_not_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """§2.25: after TEMPORARY_FAILURE the initiator retries later. Before, a new Child SA was
    re-queued at once: against a peer that keeps refusing for a while (closing or rekeying its
    IKE SA) the two ping-ponged requests at network speed (here the network never settled)."""
    net, a, _b, ike, _child = established()
    original = child_create.ChildCreate.process_request
    refusing = [True]

    def process_request(self: Any, sa: IkeSa, msg: Message, now: float) -> list[Payload] | None:
        if refusing[0] and not sa.initiator and not isinstance(self, child_rekey.ChildRekey):
            return [NotifyPayload(NotifyType.TEMPORARY_FAILURE)]
        return original(self, sa, msg, now)

    monkeypatch.setattr(child_create.ChildCreate, "process_request", process_request)
    before = requests_from(net, A_IP, ExchangeType.CREATE_CHILD_SA)
    a.engine.create_child(ike, "net", net.now)
    net.advance(20)
    tries = requests_from(net, A_IP, ExchangeType.CREATE_CHILD_SA) - before
    assert 2 <= tries <= 21, tries  # one every 1-5 s
    refusing[0] = False
    net.advance(6)
    assert len(live_children(a)) == 2


@pytest.mark.parametrize("rekeyed_by", ["us", "peer"])
def test_an_ike_rekey_waits_for_the_delete_of_a_rekeyed_child_held_for_its_install_ack(rekeyed_by: str) -> None:
    """With ack_initiator_installs the DELETE of a rekeyed Child SA waits for the dataplane's
    ack of the new one: the Child SA rekey is not over until then (§2.25.1: no IKE rekey
    meanwhile, ours waits, the peer's gets TEMPORARY_FAILURE). Before, the IKE rekey ran, the
    Child SAs moved to the new IKE SA and the pending DELETE stayed with the old one, which was
    gone when the ack (or its timeout) came: the old Child SA, keys and all, stayed installed on
    both sides until its hard lifetime."""
    net, a, b, ike, child = established(ack_initiator_installs=True)
    a.engine.rekey_child(ike, child, net.now)
    net.run()
    sa_a = a.engine.sas[ike]
    ((new_child, _),) = sa_a.deletes_after_install.items()
    if rekeyed_by == "us":
        a.engine.rekey_ike(ike, net.now)
    else:
        b.engine.rekey_ike(next(iter(b.engine.sas)), net.now)
    net.run()
    assert not a.of(IkeSaRekeyed)
    a.engine.inbound_sa_installed(ike, new_child, net.now)
    net.advance(15)
    assert a.of(IkeSaRekeyed) and b.of(IkeSaRekeyed)
    ca, cb = live_children(a), live_children(b)
    assert [c.id for c in ca] == [new_child] and len(cb) == 1 and ca[0].spi_in == cb[0].spi_out


def test_an_internal_error_in_one_sas_timer_drops_that_sa_only() -> None:
    """A bug in one IKE SA's timer must not stop the timers of every other SA (the UDP shell
    re-arms from the dispatcher's next deadline): the SA goes, counted, and the rest run on."""
    net, a, _b = pair()
    first = a.engine.initiate("ab", net.now)
    net.run()
    second = a.engine.initiate("ab", net.now)
    net.run()
    broken, healthy = a.engine.sas[first], a.engine.sas[second]

    def fails(now: float) -> None:
        raise RuntimeError("a bug")

    broken.handle_timer = fails  # type: ignore[method-assign]
    a.engine.rekey_ike(second, net.now)  # gives the healthy SA work its timers must carry
    net.advance(3600)
    net.run()
    assert a.engine.counters.get("timer_internal_errors") == 1
    assert first not in a.engine.sas
    assert any(isinstance(e, IkeSaDeleted) and e.ike_sa == first for e in a.events)
    assert healthy.state in (IkeState.ESTABLISHED, IkeState.REKEYED, IkeState.DELETED)
    assert any(sa.state == IkeState.ESTABLISHED for sa in a.engine.sas.values())


def test_our_ike_rekey_waits_while_we_hold_a_response_for_its_install_ack() -> None:
    """A response held for the dataplane's ack belongs to this IKE SA's window: rekeying the
    IKE SA meanwhile would move the Child SAs to the new IKE SA and leave the response (and the
    peer's retransmissions) to the old one. Our IKE rekey waits until the response is sent,
    without relying on the peer to refuse it (§2.25.1 only says it SHOULD)."""
    net, a, b, ike, _child = established()
    b.auto_ack = False
    a.engine.create_child(ike, "net", net.now)
    net.run()
    (held,) = b.held_installs
    sa_b = b.engine.sas[held.ike_sa]
    assert sa_b.held is not None
    b.engine.rekey_ike(held.ike_sa, net.now)
    net.run()
    assert requests_from(net, B_IP, ExchangeType.CREATE_CHILD_SA) == 0  # not even asked
    assert not b.of(IkeSaRekeyed) and sa_b.state == IkeState.ESTABLISHED
    b.engine.inbound_sa_installed(held.ike_sa, held.child_id, net.now)
    net.advance(15)
    assert len(a.of(ChildSaEstablished)) == 2 and len(b.of(ChildSaEstablished)) == 2
    assert a.of(IkeSaRekeyed) and b.of(IkeSaRekeyed)
    assert_children_paired(a, b, 2)
