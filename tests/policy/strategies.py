"""Hypothesis strategies: small random models and packets in a tiny address space.

The space is small on purpose (16 IPv4 and 16 IPv6 addresses, a handful of ports, two DNS
names) so that random rules overlap and random packets hit them.
"""

from __future__ import annotations

import ipaddress
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from hypothesis import strategies as st

from esplanade.policy.evaluator import CheckContext, FiveTuple
from esplanade.policy.model import (
    Conditions,
    Destination,
    Group,
    IcmpMatch,
    Identity,
    Model,
    PortRange,
    Protocol,
    Resource,
    Rule,
    Site,
    TimeWindow,
)

V4_BASE = int(ipaddress.IPv4Address("10.0.0.0"))
V6_BASE = int(ipaddress.IPv6Address("fd00::"))
DNS_NAMES = ("a.example.com", "b.example.com", "c.example.com")
ZONES = ("UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe")
PORTS = (0, 1, 22, 53, 80, 443, 8080, 65534, 65535)
GROUPS = ("g1", "g2", "g3", "g4")
IDENTITIES = ("i1", "i2", "i3", "i4", "i5")
SOURCES = [ipaddress.ip_address(f"192.0.2.{i}") for i in range(8)] + [
    ipaddress.ip_address("2001:db8::1"),
    ipaddress.ip_address("::ffff:192.0.2.1"),  # an IPv4 client through a dual-stack socket
]
POSTURE = ("managed", "patched")
# 2024-2025, plus the instants around DST changes where local time jumps
DST_EDGES = [
    datetime(2024, 3, 31, 1, 0, tzinfo=ZoneInfo("UTC")).timestamp(),
    datetime(2024, 10, 27, 1, 0, tzinfo=ZoneInfo("UTC")).timestamp(),
    datetime(2024, 3, 10, 7, 0, tzinfo=ZoneInfo("UTC")).timestamp(),
    datetime(2024, 11, 3, 6, 0, tzinfo=ZoneInfo("UTC")).timestamp(),
    datetime(2024, 4, 6, 15, 0, tzinfo=ZoneInfo("UTC")).timestamp(),
]


@st.composite
def networks(draw: st.DrawFn) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if draw(st.integers(0, 11)) == 0:  # the whole address space: it covers the flows outside the tiny space too
        return draw(st.sampled_from([ipaddress.IPv4Network("0.0.0.0/0"), ipaddress.IPv6Network("::/0")]))
    if draw(st.booleans()):
        prefix = draw(st.integers(28, 32))
        offset = draw(st.integers(0, 15)) >> (32 - prefix) << (32 - prefix)
        return ipaddress.IPv4Network((V4_BASE + offset, prefix))
    prefix = draw(st.integers(124, 128))
    offset = draw(st.integers(0, 15)) >> (128 - prefix) << (128 - prefix)
    return ipaddress.IPv6Network((V6_BASE + offset, prefix))


def port_ranges() -> st.SearchStrategy[PortRange]:
    return st.tuples(st.sampled_from(PORTS), st.sampled_from(PORTS)).map(lambda t: PortRange(min(t), max(t)))


@st.composite
def resources(draw: st.DrawFn, resource_id: str) -> Resource:
    if draw(st.integers(0, 4)) == 0:
        destination = Destination(dns_name=draw(st.sampled_from(DNS_NAMES)))
    else:
        destination = Destination(network=draw(networks()))
    protocol = draw(st.sampled_from(list(Protocol)))
    ports: tuple[PortRange, ...] = ()
    icmp: tuple[IcmpMatch, ...] = ()
    if protocol in (Protocol.TCP, Protocol.UDP):
        ports = tuple(draw(st.lists(port_ranges(), max_size=3)))
    elif protocol is Protocol.ICMP:
        codes = st.one_of(st.none(), st.sampled_from((0, 1)))
        icmp = tuple(draw(st.lists(st.builds(IcmpMatch, st.sampled_from((0, 3, 8, 128)), codes), max_size=2)))
    return Resource(resource_id, destination, "s1", protocol, ports, icmp)


@st.composite
def time_windows(draw: st.DrawFn) -> TimeWindow:
    days = tuple(sorted(draw(st.sets(st.integers(0, 6), min_size=1))))
    start = draw(st.sampled_from((0, 30, 60, 120, 150, 180, 600, 1410)))
    end = draw(st.sampled_from((0, 60, 90, 180, 210, 720, 1439, 1440)).filter(lambda e: e != start))
    return TimeWindow(days, start, end, draw(st.sampled_from(ZONES)))


@st.composite
def conditions(draw: st.DrawFn) -> Conditions:
    if draw(st.booleans()):
        return Conditions()
    window = draw(time_windows()) if draw(st.booleans()) else None
    sources: tuple[ipaddress.IPv4Network, ...] = ()
    if draw(st.integers(0, 2)) == 0:
        candidates = [ipaddress.IPv4Network("192.0.2.0/30"), ipaddress.IPv4Network("192.0.2.4/32")]
        sources = tuple(draw(st.lists(st.sampled_from(candidates), min_size=1, max_size=2, unique=True)))
    posture: tuple[str, ...] = ()
    if draw(st.integers(0, 2)) == 0:
        posture = tuple(draw(st.lists(st.sampled_from(POSTURE), min_size=1, max_size=2, unique=True)))
    return Conditions(window, sources, posture)


@st.composite
def models(draw: st.DrawFn) -> Model:
    groups = draw(st.lists(st.sampled_from(GROUPS), unique=True, min_size=2, max_size=4))
    resource_list = [draw(resources(f"res{i}")) for i in range(draw(st.integers(0, 6)))]
    rule_list = []
    for i in range(draw(st.integers(0, 8))):
        rule_groups = tuple(draw(st.lists(st.sampled_from(GROUPS), unique=True, min_size=1, max_size=2)))
        # a reference may dangle: the compiler must grant nothing for it
        names = [r.id for r in resource_list] + ["missing"]
        rule_resources = tuple(draw(st.lists(st.sampled_from(names), unique=True, min_size=1, max_size=3)))
        rule_list.append(Rule(f"r{draw(st.integers(0, 99)):02d}x{i}", rule_groups, rule_resources, draw(conditions())))
    identity_list = [
        Identity(identity_id, groups=tuple(draw(st.lists(st.sampled_from(GROUPS), unique=True, max_size=3))))
        for identity_id in IDENTITIES[: draw(st.integers(1, len(IDENTITIES)))]
    ]
    return Model.of([Site("s1"), *(Group(g) for g in groups), *identity_list, *resource_list, *rule_list])


@st.composite
def resolutions(draw: st.DrawFn) -> dict[str, list[str]]:
    out = {}
    for name in DNS_NAMES[:2]:  # the third name never resolves
        count = draw(st.integers(0, 3))
        out[name] = [
            str(ipaddress.ip_address(V4_BASE + draw(st.integers(0, 15))))
            if draw(st.booleans())
            else str(ipaddress.ip_address(V6_BASE + draw(st.integers(0, 15))))
            for _ in range(count)
        ]
    return out


@st.composite
def flows(draw: st.DrawFn) -> FiveTuple:
    if draw(st.booleans()):
        dst: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(V4_BASE + draw(st.integers(0, 17)))
        src: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address("100.64.0.2")
    else:
        dst = ipaddress.IPv6Address(V6_BASE + draw(st.integers(0, 17)))
        src = ipaddress.IPv6Address("fd99::2")
    kind = draw(st.sampled_from(("tcp", "udp", "icmp", "gre")))
    if kind == "icmp":
        return FiveTuple.icmp(src, dst, draw(st.sampled_from((0, 3, 8, 11, 128))), draw(st.sampled_from((0, 1, 2))))
    if kind == "gre":
        return FiveTuple(src, dst, 47)
    port = draw(st.one_of(st.sampled_from(PORTS), st.integers(0, 65535)))
    return FiveTuple(src, dst, 6 if kind == "tcp" else 17, 40000, port)


@st.composite
def contexts(draw: st.DrawFn) -> CheckContext:
    if draw(st.booleans()):
        now = draw(st.sampled_from(DST_EDGES)) + draw(st.integers(-2 * 3600, 2 * 3600))
    else:
        now = draw(st.integers(1_704_067_200, 1_767_225_599))  # 2024-01-01 .. 2025-12-31 UTC
    source = draw(st.sampled_from(SOURCES)) if draw(st.integers(0, 5)) else None
    posture = frozenset(draw(st.sets(st.sampled_from(POSTURE))))
    return CheckContext(float(now), source, posture)


def all_flows() -> list[FiveTuple]:
    """Every interesting packet of the tiny space: each address (and two outside), each port class."""
    out: list[FiveTuple] = []
    dsts: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [
        *(ipaddress.IPv4Address(V4_BASE + i) for i in range(18)),
        *(ipaddress.IPv6Address(V6_BASE + i) for i in range(18)),
    ]
    for dst in dsts:
        src = ipaddress.ip_address("100.64.0.2" if dst.version == 4 else "fd99::2")
        for port in PORTS:
            out.append(FiveTuple(src, dst, 6, 40000, port))
            out.append(FiveTuple(src, dst, 17, 40000, port))
        for icmp_type in (0, 3, 8, 128):
            for code in (0, 1):
                out.append(FiveTuple.icmp(src, dst, icmp_type, code))
        out.append(FiveTuple(src, dst, 47))
    return out


@st.composite
def contexts_near_windows(draw: st.DrawFn, model: Model) -> CheckContext:
    """A context, half the time within a minute or two of some rule's window edge."""
    windows = [r.conditions.time_window for r in model.rules.values() if r.conditions.time_window is not None]
    context = draw(contexts())
    if not windows or draw(st.integers(0, 3)) == 0:
        return context
    window = draw(st.sampled_from(windows))
    zone = ZoneInfo(window.timezone)
    day = datetime.fromtimestamp(context.now, zone).replace(hour=0, minute=0, second=0, microsecond=0)
    # On a listed day or the day after (where an overnight window closes).
    target = (draw(st.sampled_from(window.days)) + draw(st.integers(0, 1))) % 7
    day = day + timedelta(days=(target - day.weekday()) % 7)
    edge = draw(st.sampled_from((window.start, window.end)))
    local = day.replace(hour=min(edge // 60, 23), minute=edge % 60 if edge < 1440 else 59)
    now = local.timestamp() + draw(st.sampled_from((-61, -1, 0, 1, 59, 60)))
    return CheckContext(now, context.source, context.posture)
