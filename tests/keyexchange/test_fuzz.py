"""Bounded fuzzing: no malformed datagram makes an exception escape or a state change."""

from __future__ import annotations

import contextlib
import random
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esplanade.ipsec.transforms import ProtocolId
from esplanade.keyexchange.ikev2.constants import ExchangeType
from esplanade.keyexchange.ikev2.errors import ParseError
from esplanade.keyexchange.ikev2.ike_sa import IkeSa
from esplanade.keyexchange.ikev2.message import Message, decode_message
from esplanade.keyexchange.ikev2.payloads import (
    AuthPayload,
    CpAttribute,
    CpPayload,
    DeletePayload,
    IdiPayload,
    KePayload,
    NoncePayload,
    NotifyPayload,
    Payload,
    Proposal,
    SaPayload,
    TsiPayload,
    TsrPayload,
    UnknownPayload,
    decode_chain,
)
from esplanade.keyexchange.ikev2.tasks.base import Task
from esplanade.keyexchange.ikev2.tasks.child_negotiation import offered_proposals
from tests.keyexchange.peers import pair

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _header(spi_i: bytes, spi_r: bytes, nxt: int, exch: int, flags: int, mid: int, body: bytes) -> bytes:
    return struct.pack("!8s8sBBBBII", spi_i, spi_r, nxt, 0x20, exch, flags, mid, 28 + len(body)) + body


@SETTINGS
@given(st.binary(max_size=600), st.integers(0, 255))
def test_decode_chain_only_raises_parse_errors(data: bytes, first: int) -> None:
    with contextlib.suppress(ParseError):
        decode_chain(data, first, outer=True)


@SETTINGS
@given(
    st.integers(0, 255),
    st.sampled_from([34, 35, 36, 37, 43]),
    st.sampled_from([0, 8, 0x20, 0x28]),
    st.binary(max_size=400),
)
def test_decode_message_only_raises_parse_errors(nxt: int, exch: int, flags: int, body: bytes) -> None:
    with contextlib.suppress(ParseError):
        decode_message(_header(b"\x01" * 8, b"\x00" * 8, nxt, exch, flags, 0, body))


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    st.binary(max_size=300),
    st.integers(0, 255),
    st.sampled_from([34, 35, 36, 37]),
    st.sampled_from([0, 8, 0x20, 0x28]),
    st.integers(0, 3),
)
def test_dispatcher_survives_garbage_for_an_established_sa(
    body: bytes, nxt: int, exch: int, flags: int, mid: int
) -> None:
    net, _a, b = _established()
    sb = next(iter(b.engine.sas.values()))
    before = (sb.state, sb.next_peer_id, sb.next_request_id, set(sb.children), sb.remote, sb.keys)
    for spi_i, spi_r in ((sb.spi_i, sb.spi_r), (sb.spi_i, b"\x00" * 8), (b"\x07" * 8, sb.spi_r)):
        data = _header(spi_i, spi_r, nxt, exch, flags, mid, body)
        for local in ((b.ip, 500), (b.ip, 4500)):
            wire = (b"\x00" * 4 + data) if local[1] == 4500 else data
            b.engine.receive_datagram(wire, local, ("198.51.100.7", 4500), net.now)
            b.engine.receive_datagram(wire[: len(wire) // 2], local, ("198.51.100.7", 4500), net.now)
    b.engine.datagrams_to_send()
    assert (sb.state, sb.next_peer_id, sb.next_request_id, set(sb.children), sb.remote, sb.keys) == before
    assert b.engine.counters.get("dropped_internal_errors", 0) == 0


_CACHE: dict[str, object] = {}


def _established():  # type: ignore[no-untyped-def]
    if "pair" not in _CACHE:
        net, a, b = pair()
        a.engine.initiate("ab", net.now)
        net.run()
        _CACHE["pair"] = (net, a, b)
    return _CACHE["pair"]


class _Probe(Task):
    """A request of our choosing from an established peer: it passes the SK checks, so the
    exchange tasks behind them see it (the garbage above rarely gets that far)."""

    name = "probe"

    def __init__(self, exchange: ExchangeType, payloads: list[Payload]) -> None:
        super().__init__()
        self.exchange = exchange  # type: ignore[misc]
        self.payloads = payloads

    def build_request(self, ike: IkeSa) -> list[Payload] | None:
        return self.payloads

    def process_response(self, ike: IkeSa, msg: Message, now: float) -> bool:
        return False


def _odd_payloads(rng: random.Random, sa: IkeSa) -> list[Payload]:
    """Decodable payloads in odd numbers, orders and values (SPI sizes, protocols, groups)."""
    child = sa.config.children[0]
    out: list[Payload] = []
    for _ in range(rng.randint(0, 7)):
        kind = rng.randrange(9)
        if kind == 0:
            if rng.random() < 0.5:
                props = offered_proposals(child, rng.getrandbits(32), with_ke=rng.random() < 0.5)
            else:
                props = [
                    s.to_proposal(i + 1, rng.choice([b"", rng.randbytes(8)])) for i, s in enumerate(sa.config.proposals)
                ]
            props = [
                Proposal(
                    p.number,
                    rng.choice([p.protocol, 1, 2, 3, 7]),
                    rng.choice([p.spi, b"", rng.randbytes(4), rng.randbytes(8)]),
                    p.transforms if rng.random() < 0.8 else p.transforms[: rng.randint(0, len(p.transforms))],
                )
                for p in props
            ]
            out.append(SaPayload(tuple(props)))
        elif kind == 1:
            out.append(KePayload(rng.choice([19, 31, 14, 0, 35, 9999]), rng.randbytes(rng.choice([0, 32, 65, 256]))))
        elif kind == 2:
            out.append(NoncePayload(rng.randbytes(32)))
        elif kind == 3:
            ntype = rng.choice([16393, 16441, 16391, 16384, 16390, 14, 7, 34, 43, 17, 24, 1, 5, 44, 16406, 16430])
            spi = rng.choice([b"", rng.randbytes(4), rng.randbytes(8)])
            out.append(
                NotifyPayload(ntype, rng.randbytes(rng.choice([0, 1, 2, 4, 8])), rng.choice([0, 1, 2, 3, 9]), spi)
            )
        elif kind == 4:
            spis = tuple(rng.randbytes(4) for _ in range(rng.randint(0, 3)))
            if sa.children and rng.random() < 0.5:
                spis += (struct.pack("!I", rng.choice(list(sa.children.values())).spi_in),)
            out.append(
                DeletePayload(ProtocolId.IKE) if rng.random() < 0.15 else DeletePayload(rng.choice([2, 3]), spis)
            )
        elif kind == 5:
            out.append(TsiPayload(child.local_ts))
        elif kind == 6:
            out.append(TsrPayload(child.remote_ts if rng.random() < 0.8 else child.local_ts))
        elif kind == 7:
            attrs = tuple(
                CpAttribute(rng.choice([1, 3, 8, 13, 16, 99]), rng.randbytes(rng.choice([0, 4, 16, 17])))
                for _ in range(rng.randint(0, 3))
            )
            out.append(CpPayload(rng.choice([1, 2, 3, 4]), attrs))
        else:
            out.append(rng.choice([IdiPayload(2, b"x"), AuthPayload(2, rng.randbytes(32)), UnknownPayload(200, b"zz")]))
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1))
def test_authenticated_requests_of_odd_payloads_never_raise(seed: int) -> None:
    """Protected requests (they pass the SK checks) of decodable payloads in odd numbers,
    orders and values: every task answers or drops them, no exception escapes the core."""
    rng = random.Random(seed)
    net, a, b = pair()
    a.engine.initiate("ab", net.now)
    net.run()
    exchanges = [ExchangeType.CREATE_CHILD_SA, ExchangeType.INFORMATIONAL, ExchangeType.IKE_FOLLOWUP_KE]
    for _ in range(6):
        sa = next((s for s in a.engine.sas.values() if s.established and s.outstanding is None), None)
        if sa is None or not b.engine.sas:
            break
        sa.queue.appendleft(_Probe(rng.choice(exchanges), _odd_payloads(rng, sa)))
        a.engine._run(sa, net.now)
        net.advance(rng.choice([0, 1, 5]))
    assert a.engine.counters.get("dropped_internal_errors", 0) == 0
    assert b.engine.counters.get("dropped_internal_errors", 0) == 0
