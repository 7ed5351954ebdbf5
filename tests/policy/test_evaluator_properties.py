"""The fast paths agree with the brute-force reference on random models and packets.

For each random model the checks are dense: every identity against every packet class of
the tiny address space (`all_flows`), at instants chosen near the model's time-window edges.
Compared: the evaluator's decision (verdict, rule, resource, reason), the dataplane filter's
verdict, the traffic selectors (exactly the packets some rule allows, ignoring time), the
compiled document's round trip, and incremental compilation against compiling from scratch.
"""

from __future__ import annotations

import ipaddress

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esplanade.policy.compiled import CompiledPolicy
from esplanade.policy.compiler import PolicyCompiler
from esplanade.policy.evaluator import CheckContext
from esplanade.policy.model import Conditions, Model, Rule, TimeWindow
from tests.policy.reference_evaluator import in_window, reference_check
from tests.policy.strategies import (
    IDENTITIES,
    all_flows,
    contexts,
    contexts_near_windows,
    models,
    resolutions,
    time_windows,
)

PROPERTY_SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FLOWS = all_flows()


def _compiler(model: Model, resolved: dict[str, list[str]]) -> PolicyCompiler:
    compiler = PolicyCompiler(resolver=lambda name: resolved.get(name, []))
    compiler.load(model)
    return compiler


def _parsed(resolved: dict[str, list[str]]) -> dict[str, list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    return {name: [ipaddress.ip_address(a) for a in addrs] for name, addrs in resolved.items()}


@PROPERTY_SETTINGS
@given(st.data(), models(), resolutions())
def test_evaluator_filter_and_selectors_agree_with_reference(
    data: st.DataObject, model: Model, resolved: dict[str, list[str]]
) -> None:
    compiler = _compiler(model, resolved)
    addresses = _parsed(resolved)
    for _ in range(2):
        context = data.draw(contexts_near_windows(model))
        for identity in IDENTITIES:
            compiled = compiler.compiled(identity)
            if compiled is not None:
                compiled = CompiledPolicy.from_document(compiled.to_document())  # the store round trip
                packet_filter = compiled.packet_filter(context.facts)
                selectors = compiled.selectors(context.facts, limit=10_000)
                coarse = compiled.selectors(context.facts, limit=2)
                routes = compiled.routes(context.facts, limit=1)
            for flow in FLOWS:
                expected = reference_check(model, addresses, identity, flow, context)
                assert compiler.check(identity, flow, context) == expected, (identity, str(flow))
                if compiled is None:
                    continue
                dst, proto, port = flow.dst, flow.protocol, flow.dst_port
                assert packet_filter.allows(dst.version, int(dst), proto, port, context.now) == expected.allowed
                # Selectors: exactly the packets some rule allows at some time, for this connection.
                untimed = reference_check(model, addresses, identity, flow, context, ignore_time=True)
                assert any(ts.matches(dst, proto, port) for ts in selectors) == untimed.allowed, str(flow)
                if untimed.allowed:  # coarsened selectors and routes still cover it
                    assert any(ts.matches(dst, proto, port) for ts in coarse)
                    assert any(dst in net for net in routes)


@PROPERTY_SETTINGS
@given(models(), models(), resolutions(), contexts())
def test_incremental_update_equals_full_compile(
    before: Model, after: Model, resolved: dict[str, list[str]], context: CheckContext
) -> None:
    incremental = _compiler(before, resolved)
    old_documents = incremental.documents()
    result = incremental.update(after)
    fresh = _compiler(after, resolved)
    new_documents = fresh.documents()
    assert incremental.documents() == new_documents
    # The result names exactly the identities whose document changed, with the new document.
    expected_changes = {
        i for i in old_documents.keys() | new_documents.keys() if old_documents.get(i) != new_documents.get(i)
    }
    assert set(result.changed) == expected_changes
    for identity in expected_changes:
        assert result.changed[identity] == new_documents.get(identity)
    for identity in IDENTITIES:
        for flow in FLOWS[::7]:
            assert incremental.check(identity, flow, context) == fresh.check(identity, flow, context)


@st.composite
def _window_and_instant(draw: st.DrawFn) -> tuple[TimeWindow, float]:
    window = draw(time_windows())
    model = Model.of([Rule("r", ("g",), ("x",), Conditions(time_window=window))])
    return window, draw(contexts_near_windows(model)).now


@settings(max_examples=1000, deadline=None)
@given(_window_and_instant())
def test_time_window_agrees_with_spelled_out_minutes(case: tuple[TimeWindow, float]) -> None:
    window, now = case
    assert window.contains(now) == in_window(window, now)
