"""The obviously-correct evaluator: every rule, every resource, every condition, in order.

Slow on purpose and written without the fast path's structures (no spans, no segments, no
indexes), so the property tests compare two independent readings of the policy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from ipaddress import IPv6Address
from zoneinfo import ZoneInfo

from esplanade.policy.evaluator import Action, CheckContext, Decision, FiveTuple
from esplanade.policy.model import Conditions, IPAddress, Model, Protocol, Resource, TimeWindow

Resolutions = Mapping[str, Sequence[IPAddress]]


def window_minutes(window: TimeWindow) -> set[tuple[int, int]]:
    """Every (weekday, minute of day) the window covers, spelled out."""
    out: set[tuple[int, int]] = set()
    for day in window.days:
        if window.start < window.end:
            out |= {(day, m) for m in range(window.start, window.end)}
        else:
            out |= {(day, m) for m in range(window.start, 24 * 60)}
            out |= {((day + 1) % 7, m) for m in range(window.end)}
    return out


def in_window(window: TimeWindow, now: float) -> bool:
    local = datetime.fromtimestamp(now, ZoneInfo(window.timezone))
    return (local.weekday(), local.hour * 60 + local.minute) in window_minutes(window)


def failure(conditions: Conditions, context: CheckContext, ignore_time: bool) -> str | None:
    if conditions.time_window is not None and not ignore_time and not in_window(conditions.time_window, context.now):
        return "outside its time window"
    if conditions.source_networks:
        if context.source is None:
            return "the client's source address is unknown"
        source = context.source
        if isinstance(source, IPv6Address) and source.ipv4_mapped is not None:
            source = source.ipv4_mapped
        if not any(source in net for net in conditions.source_networks):
            return f"source address {source} is outside its source networks"
    for tag in conditions.posture:
        if tag not in context.posture:
            return f"posture tag '{tag}' is missing"
    return None


def matches(resource: Resource, resolutions: Resolutions, flow: FiveTuple) -> bool:
    net = resource.destination.network
    if net is not None:
        if flow.dst not in net:
            return False
    elif resource.destination.dns_name is None or flow.dst not in resolutions.get(resource.destination.dns_name, ()):
        return False
    port = flow.dst_port
    if resource.protocol is Protocol.ANY:
        return True
    if resource.protocol is Protocol.TCP or resource.protocol is Protocol.UDP:
        number = 6 if resource.protocol is Protocol.TCP else 17
        return flow.protocol == number and (not resource.ports or any(p.start <= port <= p.end for p in resource.ports))
    icmp = 1 if flow.dst.version == 4 else 58
    if flow.protocol != icmp:
        return False
    return not resource.icmp_types or any(
        m.type == port >> 8 and (m.code is None or m.code == port & 0xFF) for m in resource.icmp_types
    )


def reference_check(
    model: Model,
    resolutions: Resolutions,
    identity_id: str,
    flow: FiveTuple,
    context: CheckContext,
    *,
    ignore_time: bool = False,
) -> Decision:
    identity = model.identities.get(identity_id)
    if identity is None:
        return Decision(Action.DENY, "default-deny", f"unknown identity '{identity_id}'")
    groups = {g for g in identity.groups if g in model.groups}
    first_failure: Decision | None = None
    for rule_id in sorted(model.rules):
        rule = model.rules[rule_id]
        if not groups.intersection(rule.groups):
            continue
        for resource_id in rule.resources:
            resource = model.resources.get(resource_id)
            if resource is None or not matches(resource, resolutions, flow):
                continue
            why = failure(rule.conditions, context, ignore_time)
            if why is None:
                return Decision(Action.ALLOW, rule_id, f"rule '{rule_id}' grants resource '{resource_id}'", resource_id)
            if first_failure is None:
                reason = f"rule '{rule_id}' grants resource '{resource_id}' but {why}"
                first_failure = Decision(Action.DENY, "default-deny", reason, resource_id)
    return first_failure or Decision(Action.DENY, "default-deny", "no rule grants this flow")
