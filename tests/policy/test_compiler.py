"""The incremental compiler: what a change recompiles, what it reports, and the document it writes."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest

from esplanade.ipsec.selectors import TrafficSelector
from esplanade.policy.compiled import CompiledDocumentError, CompiledPolicy
from esplanade.policy.compiler import PolicyCompiler, Removal
from esplanade.policy.conditions import ConnectFacts
from esplanade.policy.evaluator import Action, CheckContext, FiveTuple
from esplanade.policy.model import (
    Conditions,
    Destination,
    Group,
    Identity,
    Model,
    PortRange,
    Protocol,
    Resource,
    Rule,
    Site,
    TimeWindow,
)

NOW = 1_718_000_000.0  # a Monday, 2024-06-10 06:13 UTC


def net(text: str) -> Destination:
    return Destination(network=ipaddress.ip_network(text))


def org() -> Model:
    """Four teams of five people; rules per team; one shared wiki."""
    objects: list[object] = [Site("s")]
    for team in ("eng", "ops", "sales", "hr"):
        objects.append(Group(team))
        for i in range(5):
            objects.append(Identity(f"{team}{i}", groups=(team,)))
    objects.append(Identity("lead", groups=("eng", "ops")))
    objects += [
        Resource("git", net("10.1.0.10/32"), "s", Protocol.TCP, (PortRange(22, 22), PortRange(443, 443))),
        Resource("db", net("10.1.1.0/24"), "s", Protocol.TCP, (PortRange(5432, 5432),)),
        Resource("crm", net("10.2.0.0/24"), "s", Protocol.TCP, (PortRange(443, 443),)),
        Resource("wiki", Destination(dns_name="wiki.corp.example"), "s", Protocol.TCP, (PortRange(443, 443),)),
        Resource("payroll", net("10.3.0.5/32"), "s", Protocol.ANY),
    ]
    objects += [
        Rule("eng-git", ("eng",), ("git",)),
        Rule("ops-db", ("ops",), ("db",)),
        Rule("sales-crm", ("sales",), ("crm",)),
        Rule("hr-payroll", ("hr",), ("payroll",)),
        Rule("all-wiki", ("eng", "ops", "sales", "hr"), ("wiki",)),
    ]
    return Model.of(objects)  # type: ignore[arg-type]


def resolver(name: str) -> list[str]:
    return {"wiki.corp.example": ["10.9.0.7"]}.get(name, [])


def loaded(model: Model | None = None) -> PolicyCompiler:
    compiler = PolicyCompiler(resolver)
    compiler.load(model or org())
    compiler.stats.reset()
    return compiler


def tcp(dst: str, port: int) -> FiveTuple:
    return FiveTuple.parse("100.64.0.2", dst, 6, 40000, port)


CTX = CheckContext(NOW)


def test_full_load_compiles_each_group_set_once() -> None:
    compiler = PolicyCompiler(resolver)
    result = compiler.load(org())
    assert set(result.changed) == set(org().identities)
    assert compiler.stats.classes_compiled == 5  # {eng}, {ops}, {sales}, {hr}, {eng, ops}
    assert compiler.stats.identities_recompiled == 21


def test_one_rule_change_recompiles_only_its_groups_members() -> None:
    compiler = loaded()
    result = compiler.apply([Rule("ops-db", ("ops",), ("db", "git"))])
    assert compiler.stats.classes_compiled == 2  # {ops} and {eng, ops}
    assert compiler.stats.identities_recompiled == 6
    # "lead" (eng and ops) could reach git already, through eng-git: recompiled, but the
    # document is the same, so its store key is not rewritten.
    assert set(result.changed) == {f"ops{i}" for i in range(5)}
    assert result.writes()[0] == ("/esplanade/v1/policy/compiled/ops0", result.changed["ops0"])
    assert compiler.check("ops0", tcp("10.1.0.10", 22), CTX).allowed


def test_rule_description_change_compiles_nothing() -> None:
    compiler = loaded()
    result = compiler.apply([replace(org().rules["eng-git"], description="now documented")])
    assert compiler.stats.classes_compiled == 0
    assert result.changed == {}


def test_adding_a_rule_for_one_group() -> None:
    compiler = loaded()
    result = compiler.apply([Rule("hr-crm", ("hr",), ("crm",))])
    assert compiler.stats.identities_recompiled == 5
    assert set(result.changed) == {f"hr{i}" for i in range(5)}
    assert compiler.check("hr3", tcp("10.2.0.9", 443), CTX).rule == "hr-crm"


def test_removing_a_rule_revokes_access() -> None:
    compiler = loaded()
    assert compiler.check("sales1", tcp("10.2.0.9", 443), CTX).allowed
    result = compiler.apply([Removal("rules", "sales-crm")])
    assert set(result.changed) == {f"sales{i}" for i in range(5)}
    assert not compiler.check("sales1", tcp("10.2.0.9", 443), CTX).allowed


def test_resource_change_recompiles_the_rules_users() -> None:
    compiler = loaded()
    db = org().resources["db"]
    result = compiler.apply([replace(db, ports=(PortRange(5432, 5433),))])
    assert set(result.changed) == {f"ops{i}" for i in range(5)} | {"lead"}
    # A site or description change moves no packet: nothing is compiled.
    compiler.stats.reset()
    current = compiler.model.resources["db"]
    assert compiler.apply([replace(current, site="elsewhere", description="x")]).changed == {}
    assert compiler.stats.classes_compiled == 0


def test_identity_joining_a_group_reuses_the_compiled_class() -> None:
    compiler = loaded()
    result = compiler.apply([Identity("sales0", groups=("sales", "hr"))])
    assert compiler.stats.classes_compiled == 1  # {sales, hr} is new
    assert set(result.changed) == {"sales0"}
    compiler.stats.reset()
    result = compiler.apply([Identity("sales1", groups=("hr", "sales"))])
    assert compiler.stats.classes_compiled == 0  # same set of groups: compiled already
    assert set(result.changed) == {"sales1"}
    assert result.changed["sales1"]["digest"] == compiler.documents()["sales0"]["digest"]


def test_removed_identity_gets_its_document_deleted() -> None:
    compiler = loaded()
    result = compiler.apply([Removal("identities", "hr0")])
    assert result.changed == {"hr0": None}
    assert result.writes() == [("/esplanade/v1/policy/compiled/hr0", None)]
    decision = compiler.check("hr0", tcp("10.3.0.5", 1), CTX)
    assert (decision.action, decision.reason) == (Action.DENY, "unknown identity 'hr0'")


def test_deleting_a_group_revokes_what_it_granted() -> None:
    compiler = loaded()
    result = compiler.apply([Removal("groups", "hr")])
    assert set(result.changed) == {f"hr{i}" for i in range(5)}
    assert not compiler.check("hr0", tcp("10.3.0.5", 1), CTX).allowed
    compiler.apply([Group("hr")])
    assert compiler.check("hr0", tcp("10.3.0.5", 1), CTX).allowed


def test_dns_resources_resolve_through_the_injected_resolver() -> None:
    compiler = loaded()
    assert compiler.dns_names() == {"wiki.corp.example"}
    assert compiler.check("eng0", tcp("10.9.0.7", 443), CTX).rule == "all-wiki"
    compiler.stats.reset()
    result = compiler.set_resolution("wiki.corp.example", ["10.9.0.8", "fd00::8"])
    assert len(result.changed) == 21 and compiler.stats.classes_compiled == 5
    assert not compiler.check("eng0", tcp("10.9.0.7", 443), CTX).allowed
    assert compiler.check("eng0", FiveTuple.parse("fd99::2", "fd00::8", 6, 1, 443), CTX).allowed
    # the same answer again changes nothing
    assert compiler.set_resolution("wiki.corp.example", ["fd00::8", "10.9.0.8"]).changed == {}


def test_unresolved_names_grant_nothing_and_are_listed() -> None:
    def failing(name: str) -> list[str]:
        raise OSError("resolver down")

    compiler = PolicyCompiler(failing)
    compiler.load(org())
    assert not compiler.check("eng0", tcp("10.9.0.7", 443), CTX).allowed
    assert compiler.documents()["eng0"]["unresolved"] == ["wiki"]
    result = compiler.set_resolution("wiki.corp.example", ["10.9.0.7", "not an address"])
    assert result.changed["eng0"]["unresolved"] == []
    assert compiler.check("eng0", tcp("10.9.0.7", 443), CTX).allowed


def test_compiled_document_format() -> None:
    model = org()
    weekend = TimeWindow((5, 6), 0, 1440, "Europe/Berlin")
    on_call = Conditions(weekend, (ipaddress.ip_network("198.51.100.0/24"),), ("managed",))
    model = model.with_object(Rule("ops-payroll-weekend", ("ops",), ("payroll", "crm"), on_call))
    compiler = loaded(model)
    doc = compiler.documents()["ops0"]
    assert doc == {
        "format": 1,
        "identity": "ops0",
        "digest": doc["digest"],
        "parts": [
            {"rules": ["all-wiki", "ops-db"], "selectors": ["10.1.1.0/24[tcp/5432]", "10.9.0.7/32[tcp/443]"]},
            {
                "rules": ["ops-payroll-weekend"],
                "when": {
                    "time_window": {
                        "days": ["sat", "sun"],
                        "start": "00:00",
                        "end": "24:00",
                        "timezone": "Europe/Berlin",
                    },
                    "source_networks": ["198.51.100.0/24"],
                    "posture": ["managed"],
                },
                "selectors": ["10.2.0.0/24[tcp/443]", "10.3.0.5/32"],
            },
        ],
        "unresolved": [],
    }
    assert doc["digest"] == compiler.documents()["ops1"]["digest"]
    compiled = CompiledPolicy.from_document(doc)
    assert compiled.to_document() == doc
    inside = ConnectFacts(ipaddress.ip_address("198.51.100.9"), frozenset({"managed"}))
    outside = ConnectFacts(ipaddress.ip_address("203.0.113.9"), frozenset({"managed"}))
    assert [str(ts) for ts in compiled.selectors(outside)] == ["10.1.1.0/24[tcp/5432]", "10.9.0.7/32[tcp/443]"]
    assert [str(ts) for ts in compiled.selectors(inside)] == [
        "10.1.1.0/24[tcp/5432]",
        "10.2.0.0/24[tcp/443]",
        "10.3.0.5/32",
        "10.9.0.7/32[tcp/443]",
    ]
    assert [str(n) for n in compiled.routes(inside)] == ["10.1.1.0/24", "10.2.0.0/24", "10.3.0.5/32", "10.9.0.7/32"]
    assert compiled.selectors(inside, limit=2) == [
        TrafficSelector.parse("10.1.1.0-10.3.0.5"),
        TrafficSelector.parse("10.9.0.7/32"),
    ]


def test_timed_part_follows_the_clock_in_the_dataplane_filter() -> None:
    model = org().with_object(
        Rule("eng-db-office-hours", ("eng",), ("db",), Conditions(TimeWindow((0, 1, 2, 3, 4), 540, 1020, "UTC")))
    )
    compiler = loaded(model)
    compiled = compiler.compiled("eng0")
    assert compiled is not None
    packet_filter = compiled.packet_filter(ConnectFacts())
    db = int(ipaddress.ip_address("10.1.1.1"))
    monday_0859, monday_0900 = 1_718_009_940.0, 1_718_010_000.0
    assert not packet_filter.allows(4, db, 6, 5432, monday_0859)
    assert packet_filter.get_timer() == monday_0900
    assert packet_filter.allows(4, db, 6, 5432, monday_0900)
    assert packet_filter.allows(4, db, 6, 5432, monday_0900 + 8 * 3600 - 1)
    assert not packet_filter.allows(4, db, 6, 5432, monday_0900 + 8 * 3600)
    # the unconditional part is unaffected by the clock
    assert packet_filter.allows(4, int(ipaddress.ip_address("10.1.0.10")), 6, 22, monday_0859)


@pytest.mark.parametrize(
    "doc",
    [
        None,
        {"format": 2},
        {"format": 1, "identity": "x"},
        {"format": 1, "identity": "x", "parts": [{"rules": [], "selectors": ["10.0.0.0/33"]}]},
        {"format": 1, "identity": "x", "parts": [{"rules": [], "selectors": [], "when": {"posture": ["a b"]}}]},
    ],
)
def test_malformed_compiled_documents_are_refused(doc: object) -> None:
    with pytest.raises(CompiledDocumentError):
        CompiledPolicy.from_document(doc)
