"""Bounded fuzzing: no malformed datagram makes an exception escape or a state change."""

from __future__ import annotations

import contextlib
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esplanade.keyexchange.ikev2.errors import ParseError
from esplanade.keyexchange.ikev2.message import decode_message
from esplanade.keyexchange.ikev2.payloads import decode_chain
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
