"""Policy core at scale: check latency, packet-filter latency, full and incremental compile.

A synthetic organisation: 10,000 rules over 1,000 resources, 500 groups and 5,000
identities (a department, a role and up to two projects each). Prints one JSON record
``{"name", "value", "unit"}`` per line. Run: ``.venv/bin/python bench/policy_eval.py``.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import json
import random
import statistics
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from esplanade.policy.compiler import PolicyCompiler
from esplanade.policy.conditions import ConnectFacts
from esplanade.policy.decode import encode_document
from esplanade.policy.evaluator import CheckContext, FiveTuple
from esplanade.policy.model import (
    Conditions,
    Destination,
    Group,
    IcmpMatch,
    Identity,
    Model,
    PolicyObject,
    PortRange,
    Protocol,
    Resource,
    Rule,
    Site,
    TimeWindow,
)
from esplanade.policy.policy_file import export_policy_yaml, load_policy_yaml

if TYPE_CHECKING:
    from bench.records import Figure

COMMON_PORTS = [22, 53, 80, 443, 389, 636, 1433, 3306, 3389, 5432, 5672, 6379, 8080, 8443, 9200, 27017]


def build_model(
    rng: random.Random, rules: int, resources: int, groups: int, identities: int
) -> tuple[Model, dict[str, list[str]]]:
    objects: list[PolicyObject] = [Site(f"site{i}") for i in range(20)]
    departments = [f"dept{i}" for i in range(50)]
    roles = [f"role{i}" for i in range(10)]
    projects = [f"proj{i}" for i in range(groups - len(departments) - len(roles))]
    group_ids = departments + roles + projects
    objects += [Group(g) for g in group_ids]
    dns: dict[str, list[str]] = {}
    resource_ids = []
    for i in range(resources):
        kind = rng.random()
        if kind < 0.6:
            dest = Destination(
                network=ipaddress.ip_network(f"10.{i % 200}.{rng.randrange(256)}.{rng.randrange(1, 255)}")
            )
        elif kind < 0.85:
            prefix = rng.choice((24, 26, 28))
            base = ipaddress.ip_network(f"10.{200 + i % 50}.{rng.randrange(256)}.0/{prefix}", strict=False)
            dest = Destination(network=base)
        elif kind < 0.95:
            dest = Destination(network=ipaddress.ip_network(f"fd00:{i:x}::/64"))
        else:
            name = f"svc{i}.corp.example"
            dest = Destination(dns_name=name)
            dns[name] = [f"10.250.{i % 256}.{rng.randrange(1, 255)}"]
        p = rng.random()
        if p < 0.75:
            protocol = Protocol.TCP
            ports = tuple(PortRange(x, x) for x in rng.sample(COMMON_PORTS, rng.randint(1, 3)))
            if rng.random() < 0.1:
                ports += (PortRange(30000, 30999),)
            res = Resource(f"res{i}", dest, f"site{i % 20}", protocol, ports)
        elif p < 0.88:
            res = Resource(f"res{i}", dest, f"site{i % 20}", Protocol.UDP, (PortRange(53, 53), PortRange(123, 123)))
        elif p < 0.95:
            res = Resource(f"res{i}", dest, f"site{i % 20}", Protocol.ICMP, (), (IcmpMatch(8),))
        else:
            res = Resource(f"res{i}", dest, f"site{i % 20}", Protocol.ANY)
        objects.append(res)
        resource_ids.append(res.id)
    for i in range(identities):
        member = [rng.choice(departments), rng.choice(roles), *rng.sample(projects, rng.randint(0, 2))]
        objects.append(Identity(f"user{i}", groups=tuple(member)))
    office = TimeWindow((0, 1, 2, 3, 4), 7 * 60, 20 * 60, "Europe/Berlin")
    for i in range(rules):
        c = rng.random()
        if c < 0.10:
            conditions = Conditions(time_window=office)
        elif c < 0.15:
            conditions = Conditions(posture=("managed",))
        elif c < 0.20:
            conditions = Conditions(source_networks=(ipaddress.ip_network("198.51.100.0/24"),))
        else:
            conditions = Conditions()
        rule_groups = tuple(rng.sample(group_ids, rng.randint(1, 2)))
        rule_resources = tuple(rng.sample(resource_ids, rng.randint(1, 3)))
        objects.append(Rule(f"rule{i:05d}", rule_groups, rule_resources, conditions))
    return Model.of(objects), dns


def make_flows(
    rng: random.Random, compiler: PolicyCompiler, identity_ids: list[str], count: int
) -> list[tuple[str, FiveTuple]]:
    """Half toward something a rule of the identity names, half anywhere in 10/8."""
    selectors = {}
    for identity in identity_ids:
        compiled = compiler.compiled(identity)
        selectors[identity] = [ts for part in compiled.parts for ts in part.selectors] if compiled else []
    src4, src6 = ipaddress.ip_address("100.64.0.2"), ipaddress.ip_address("fd99::2")
    flows: list[tuple[str, FiveTuple]] = []
    for _ in range(count):
        identity = rng.choice(identity_ids)
        if selectors[identity] and rng.random() < 0.5:
            ts = rng.choice(selectors[identity])
            dst: ipaddress.IPv4Address | ipaddress.IPv6Address = ts.start_addr
            port = ts.start_port if ts.protocol else 0
            proto = ts.protocol or 6
        else:
            dst = ipaddress.ip_address(f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}")
            proto, port = 6, rng.choice(COMMON_PORTS)
        flows.append((identity, FiveTuple(src4 if dst.version == 4 else src6, dst, proto, 40000, port)))
    return flows


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def emit(name: str, value: float, unit: str) -> None:
    print(json.dumps({"name": name, "value": round(value, 3), "unit": unit}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rules", type=int, default=10_000)
    parser.add_argument("--resources", type=int, default=1_000)
    parser.add_argument("--groups", type=int, default=500)
    parser.add_argument("--identities", type=int, default=5_000)
    parser.add_argument("--checks", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    model, dns = build_model(rng, args.rules, args.resources, args.groups, args.identities)
    emit("policy.model.rules", len(model.rules), "count")
    emit("policy.model.resources", len(model.resources), "count")
    emit("policy.model.groups", len(model.groups), "count")
    emit("policy.model.identities", len(model.identities), "count")

    def resolver(name: str) -> list[str]:
        return dns.get(name, [])

    # -- full compile --------------------------------------------------------------------------
    compiler = PolicyCompiler(resolver)
    gc.collect()
    t0 = time.perf_counter()
    result = compiler.load(model)
    full = time.perf_counter() - t0
    emit("policy.compile.full", full * 1000, "ms")
    emit("policy.compile.access_classes", compiler.stats.classes_compiled, "count")
    sizes = [len(encode_document(doc)) for doc in result.changed.values() if doc is not None]
    emit("policy.compiled_document.mean_size", statistics.mean(sizes), "bytes")
    emit("policy.compiled_document.max_size", max(sizes), "bytes")
    selector_counts = [sum(len(p["selectors"]) for p in doc["parts"]) for doc in result.changed.values() if doc]
    emit("policy.compiled_document.mean_selectors", statistics.mean(selector_counts), "count")

    # -- check latency -------------------------------------------------------------------------
    identity_ids = list(model.identities)
    flows = make_flows(rng, compiler, rng.sample(identity_ids, 1000), args.checks)
    context = CheckContext(1_718_020_800.0, ipaddress.ip_address("198.51.100.9"), frozenset({"managed"}))
    check = compiler.check
    samples: list[float] = []
    allowed = 0
    perf = time.perf_counter_ns
    gc.disable()
    for identity, flow in flows:
        t = perf()
        decision = check(identity, flow, context)
        samples.append((perf() - t) / 1000)
        allowed += decision.allowed
    gc.enable()
    emit("policy.check.p50", percentile(samples, 0.5), "us")
    emit("policy.check.p99", percentile(samples, 0.99), "us")
    emit("policy.check.allowed_fraction", allowed / len(flows), "ratio")

    # -- packet filter ---------------------------------------------------------------------------
    facts = ConnectFacts(context.source, context.posture)
    filters = {}
    for identity in identity_ids[:300]:
        compiled = compiler.compiled(identity)
        if compiled is not None:
            filters[identity] = compiled.packet_filter(facts, context.now)
    filter_flows = [(filters[i], f) for i, f in make_flows(rng, compiler, list(filters), 50_000)]
    packets = [(pf, f.dst.version, int(f.dst), f.protocol, f.dst_port) for pf, f in filter_flows]
    now = context.now
    samples = []
    gc.disable()
    for pf, version, dst_int, proto, port in packets:
        t = perf()
        pf.allows(version, dst_int, proto, port, now)
        samples.append((perf() - t) / 1000)
    t0 = perf()
    for pf, version, dst_int, proto, port in packets:
        pf.allows(version, dst_int, proto, port, now)
    batch = (perf() - t0) / len(packets)
    gc.enable()
    emit("policy.filter.allows.p50", percentile(samples, 0.5) * 1000, "ns")
    emit("policy.filter.allows.p99", percentile(samples, 0.99) * 1000, "ns")
    emit("policy.filter.allows.mean_in_loop", batch, "ns")
    raw = []
    for pf, f in filter_flows[:20_000]:
        header = bytearray(40)
        if f.dst.version == 4:
            header[0], header[9] = 0x45, f.protocol
            header[16:20] = f.dst.packed
            header[22:24] = f.dst_port.to_bytes(2, "big")
        else:
            header = bytearray(60)
            header[0], header[6] = 0x60, f.protocol
            header[24:40] = f.dst.packed
            header[42:44] = f.dst_port.to_bytes(2, "big")
        raw.append((pf, bytes(header)))
    t0 = perf()
    for pf, pkt in raw:
        pf.allows_packet(pkt, now)
    emit("policy.filter.allows_packet.mean_in_loop", (perf() - t0) / len(raw), "ns")
    t0 = time.perf_counter()
    some = compiler.compiled(identity_ids[0])
    assert some is not None
    for _ in range(20):
        some.packet_filter(facts, context.now)
    emit("policy.filter.build", (time.perf_counter() - t0) / 20 * 1000, "ms")

    # -- incremental ---------------------------------------------------------------------------
    times, recompiled, changed = [], [], []
    rule_ids = list(model.rules)
    resource_ids = list(model.resources)
    for _ in range(30):
        rule = model.rules[rng.choice(rule_ids)]
        new = replace(rule, resources=(*rule.resources[1:], rng.choice(resource_ids)))
        compiler.stats.reset()
        t0 = time.perf_counter()
        result = compiler.apply([new])
        times.append(time.perf_counter() - t0)
        recompiled.append(compiler.stats.identities_recompiled)
        changed.append(len(result.changed))
    emit("policy.compile.one_rule.p50", percentile(times, 0.5) * 1000, "ms")
    emit("policy.compile.one_rule.max", max(times) * 1000, "ms")
    emit("policy.compile.one_rule.identities_recompiled_mean", statistics.mean(recompiled), "count")
    emit("policy.compile.one_rule.documents_changed_mean", statistics.mean(changed), "count")
    compiler.stats.reset()
    identity = model.identities[identity_ids[0]]
    t0 = time.perf_counter()
    compiler.apply([replace(identity, groups=(*identity.groups, "proj0"))])
    emit("policy.compile.one_identity", (time.perf_counter() - t0) * 1000, "ms")

    # -- policy as code ----------------------------------------------------------------------------
    t0 = time.perf_counter()
    text = export_policy_yaml(model)
    emit("policy.yaml.export", (time.perf_counter() - t0) * 1000, "ms")
    t0 = time.perf_counter()
    load_policy_yaml(text)
    emit("policy.yaml.load_and_validate", (time.perf_counter() - t0) * 1000, "ms")
    emit("policy.yaml.size", len(text) / 1024, "KiB")


def run() -> list[Figure]:
    """For `make bench` (bench/run.py): this script with its defaults, as figures."""
    from bench.json_lines import figures_from_script  # here: the script also runs as a file

    return figures_from_script("policy_eval", "policy")


if __name__ == "__main__":
    main()
