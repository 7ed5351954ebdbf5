"""Dry-run diff, the apply plan with its guards, and what-if checks."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest

from esplanade.policy.decode import object_from_document
from esplanade.policy.diff import (
    ChangeAction,
    FieldChange,
    affected_identities,
    diff,
    plan_apply,
    plan_conditions,
    what_if,
)
from esplanade.policy.evaluator import CheckContext, FiveTuple
from esplanade.policy.model import Conditions, Group, Model, Rule
from esplanade.policy.policy_file import load_policy_yaml
from esplanade.policy.problems import PolicyError

CURRENT = """\
version: 1
sites:
  - {id: fra1, networks: [10.1.0.0/16]}
groups:
  - {id: eng}
  - {id: ops}
identities:
  - {id: alice, ike_ids: ["email:alice@example.com"], groups: [eng]}
  - {id: bob, ike_ids: ["email:bob@example.com"], groups: [ops]}
resources:
  - {id: git, destination: 10.1.2.3, protocol: tcp, ports: [22, 443], site: fra1}
  - {id: db, destination: 10.1.5.0/24, protocol: tcp, ports: [5432], site: fra1}
rules:
  - {id: eng-git, groups: [eng], resources: [git]}
  - {id: ops-db, groups: [ops], resources: [db]}
"""


def desired_text() -> str:
    return (
        CURRENT.replace("ports: [22, 443]", "ports: [443]")
        .replace("  - {id: ops-db, groups: [ops], resources: [db]}\n", "")
        .replace("  - {id: ops}\n", "  - {id: ops}\n  - {id: sec}\n")
        .replace(
            "  - {id: eng-git, groups: [eng], resources: [git]}",
            "  - id: eng-git\n    groups: [eng, ops]\n    resources: [git]\n"
            "    conditions: {posture: [managed], time_window: {days: [mon], start: '08:00', end: '18:00'}}",
        )
    )


def test_diff_lists_each_change_with_its_fields() -> None:
    current, desired = load_policy_yaml(CURRENT), load_policy_yaml(desired_text())
    changes = diff(current, desired)
    assert [(c.action, c.kind, c.id) for c in changes] == [
        (ChangeAction.CREATE, "groups", "sec"),
        (ChangeAction.UPDATE, "resources", "git"),
        (ChangeAction.UPDATE, "rules", "eng-git"),
        (ChangeAction.DELETE, "rules", "ops-db"),
    ]
    assert changes[1].fields == (FieldChange("ports", [22, 443], [443]),)
    assert changes[2].fields == (
        FieldChange("conditions.posture", None, ["managed"]),
        FieldChange("conditions.time_window.days", None, ["mon"]),
        FieldChange("conditions.time_window.end", None, "18:00"),
        FieldChange("conditions.time_window.start", None, "08:00"),
        FieldChange("conditions.time_window.timezone", None, "UTC"),
        FieldChange("groups", ["eng"], ["eng", "ops"]),
    )
    assert [str(c) for c in changes] == [
        "+ group 'sec'",
        "~ resource 'git': ports: [22, 443] -> [443]",
        "~ rule 'eng-git': conditions.posture: (none) -> [managed]; conditions.time_window.days: (none) -> [mon];"
        " conditions.time_window.end: (none) -> 18:00; conditions.time_window.start: (none) -> 08:00;"
        " conditions.time_window.timezone: (none) -> UTC; groups: [eng] -> [eng, ops]",
        "- rule 'ops-db'",
    ]
    assert diff(current, current) == []


def test_plan_apply_turns_the_diff_into_store_writes() -> None:
    current, desired = load_policy_yaml(CURRENT), load_policy_yaml(desired_text())
    writes = plan_apply(current, desired)
    assert [key for key, _ in writes] == [
        "/esplanade/v1/policy/groups/sec",
        "/esplanade/v1/policy/resources/git",
        "/esplanade/v1/policy/rules/eng-git",
        "/esplanade/v1/policy/rules/ops-db",
    ]
    assert writes[0][1] == {"id": "sec"}
    assert writes[3][1] is None
    # Applying the writes to the current objects gives the desired model.
    applied = current
    for key, doc in writes:
        kind, object_id = key.split("/")[-2:]
        if doc is None:
            applied = applied.without(kind, object_id)
        else:
            applied = applied.with_object(object_from_document(kind, doc))
    assert applied == desired


def test_plan_apply_refuses_an_invalid_model() -> None:
    current = load_policy_yaml(CURRENT)
    broken = current.with_object(Rule("x", ("nobody",), ("git",)))
    with pytest.raises(PolicyError) as info:
        plan_apply(current, broken)
    assert [str(p) for p in info.value.problems] == ["rules.x.groups[0]: rule 'x': unknown group 'nobody'"]


def test_plan_conditions_guard_every_write() -> None:
    current = load_policy_yaml(CURRENT)
    # as read from the store: each object carries its key's mod_revision
    current = Model.of([replace(o, revision=100 + i) for i, o in enumerate(current.objects())])
    desired = load_policy_yaml(desired_text())
    assert plan_conditions(current, desired) == [
        ("/esplanade/v1/policy/groups/sec", 0),
        ("/esplanade/v1/policy/resources/git", 105),
        ("/esplanade/v1/policy/rules/eng-git", 107),
        ("/esplanade/v1/policy/rules/ops-db", 108),
    ]


def test_what_if_and_affected_identities() -> None:
    current, desired = load_policy_yaml(CURRENT), load_policy_yaml(desired_text())
    monday_noon = 1_718_020_800.0
    managed = CheckContext(monday_noon, ipaddress.ip_address("198.51.100.1"), frozenset({"managed"}))
    to_git_22 = FiveTuple.parse("100.64.0.2", "10.1.2.3", 6, 40000, 22)
    result = what_if(current, desired, "alice", to_git_22, managed)
    assert result.current.rule == "eng-git" and not result.desired.allowed and result.changed
    to_git_443 = FiveTuple.parse("100.64.0.2", "10.1.2.3", 6, 40000, 443)
    result = what_if(current, desired, "bob", to_git_443, CheckContext(monday_noon))
    assert not result.current.allowed and not result.changed
    assert result.desired.reason == "rule 'eng-git' grants resource 'git' but posture tag 'managed' is missing"
    assert affected_identities(current, desired) == ["alice", "bob"]
    assert affected_identities(current, current.with_object(Group("new"))) == []


def test_rule_conditions_compare_as_values() -> None:
    a = Rule("r", ("g",), ("x",), Conditions(posture=("managed",)))
    assert diff(Model.of([a]), Model.of([replace(a, revision=7)])) == []
