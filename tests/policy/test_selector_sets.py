"""Selectors from spans: exact and merged; coarsened within a limit; routes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from esplanade.ipsec.selectors import TrafficSelector
from esplanade.policy.selector_sets import coarsen, routes, selector_of, selector_text, selectors_from_spans, span_of
from esplanade.policy.spans import Span


def ts(*texts: str) -> list[TrafficSelector]:
    return [TrafficSelector.parse(t) for t in texts]


def merged(*texts: str) -> list[str]:
    return [str(s) for s in selectors_from_spans(span_of(t) for t in ts(*texts))]


def test_neighbours_with_the_same_ports_join() -> None:
    assert merged("10.0.0.0/25[tcp/443]", "10.0.0.128/25[tcp/443]") == ["10.0.0.0/24[tcp/443]"]
    assert merged("10.0.0.1[tcp/443]", "10.0.0.2[tcp/443]") == ["10.0.0.1-10.0.0.2[tcp/443]"]
    assert merged("10.0.0.1[tcp/80-90]", "10.0.0.1[tcp/91-100]", "10.0.0.1[tcp/95-99]") == ["10.0.0.1/32[tcp/80-100]"]


def test_overlaps_are_cut_into_segments() -> None:
    assert merged("10.0.0.0/24[tcp/443]", "10.0.0.128/25[tcp/22]") == [
        "10.0.0.0/25[tcp/443]",
        "10.0.0.128/25[tcp/22]",
        "10.0.0.128/25[tcp/443]",
    ]


def test_any_protocol_swallows_what_it_covers() -> None:
    assert merged("10.0.0.0/24", "10.0.0.5[tcp/443]", "10.0.1.5[udp/53]") == ["10.0.0.0/24", "10.0.1.5/32[udp/53]"]
    assert merged("fd00::/64", "fd00::1[tcp/1]", "10.0.0.1[tcp/1]") == ["10.0.0.1/32[tcp/1]", "fd00::/64"]


def test_coarsen_drops_ports_then_protocols_then_gaps() -> None:
    exact = ts("10.0.0.1[tcp/22]", "10.0.0.1[tcp/443]", "10.0.0.2[udp/53]", "10.0.0.9[tcp/1]", "fd00::1[tcp/1]")
    assert coarsen(exact, 5) == exact
    assert [str(s) for s in coarsen(exact, 4)] == [  # ports dropped: "[tcp/]" is tcp, any port
        "10.0.0.1/32[tcp/]",
        "10.0.0.2/32[udp/]",
        "10.0.0.9/32[tcp/]",
        "fd00::1/128[tcp/]",
    ]
    assert [str(s) for s in coarsen(exact, 3)] == ["10.0.0.1-10.0.0.2", "10.0.0.9/32", "fd00::1/128"]
    two = coarsen(exact, 2)
    assert [str(s) for s in two] == ["10.0.0.1-10.0.0.9", "fd00::1/128"]
    assert coarsen(exact, 0) == two  # at least one per IP version


def test_routes_are_cidrs_and_fit_the_limit() -> None:
    sel = ts("10.0.0.1-10.0.0.6[tcp/443]", "10.0.0.7[udp/53]", "10.0.2.0/24", "fd00::/64[tcp/22]")
    assert [str(n) for n in routes(sel)] == ["10.0.0.1/32", "10.0.0.2/31", "10.0.0.4/30", "10.0.2.0/24", "fd00::/64"]
    assert [str(n) for n in routes(sel, limit=3)] == ["10.0.0.0/29", "10.0.2.0/24", "fd00::/64"]
    assert [str(n) for n in routes(sel, limit=2)] == ["10.0.0.0/22", "fd00::/64"]
    assert [str(n) for n in routes(sel, limit=1)] == ["10.0.0.0/22", "fd00::/64"]  # one per IP version at least


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from([4, 6]),
    st.integers(0, 2**128 - 1),
    st.integers(0, 2**20),
    st.sampled_from([0, 1, 6, 17, 47, 58, 132]),
    st.integers(0, 65535),
    st.integers(0, 65535),
    st.booleans(),
)
def test_selector_text_is_the_selectors_own_text(
    version: int, start: int, length: int, proto: int, p1: int, p2: int, any_port: bool
) -> None:
    bits = 32 if version == 4 else 128
    lo = start % (1 << bits)
    hi = min(lo + length, (1 << bits) - 1)
    plo, phi = (0, 65535) if any_port or proto == 0 else (min(p1, p2), max(p1, p2))
    span = Span(version, lo, hi, proto, plo, phi)
    assert selector_text(span) == str(selector_of(span))
    assert span_of(TrafficSelector.parse(selector_text(span))) == span
