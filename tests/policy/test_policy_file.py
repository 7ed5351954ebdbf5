"""The policy file: every validation message, word for word, with its line and column."""

from __future__ import annotations

import textwrap

import pytest

from esplanade.policy.model import Model
from esplanade.policy.policy_file import export_policy_yaml, load_policy_yaml
from esplanade.policy.problems import PolicyError

BASE = """\
version: 1
sites:
  - {id: fra1, networks: [10.1.0.0/16, "fd00:1::/48"]}
  - {id: ams1, networks: [10.2.0.0/16]}
groups:
  - {id: eng}
  - {id: ops}
identities:
  - id: alice
    ike_ids: ["email:alice@example.com"]
    groups: [eng]
resources:
  - {id: git, destination: 10.1.2.3, protocol: tcp, ports: [22, 443], site: fra1}
rules:
  - {id: eng-git, groups: [eng], resources: [git]}
"""


def problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load_policy_yaml(textwrap.dedent(text))
    return [str(p) for p in info.value.problems]


def test_base_policy_loads() -> None:
    model = load_policy_yaml(BASE)
    assert set(model.sites) == {"fra1", "ams1"}
    assert model.rules["eng-git"].resources == ("git",)


# -- the file as a whole ---------------------------------------------------------------------


def test_not_yaml() -> None:
    # the problem's words are the YAML parser's (libyaml and pure PyYAML word it differently)
    [problem] = problems("version: 1\nsites: [\n")
    assert problem.startswith("line 3, column 1: not valid YAML: ")
    [problem] = problems("version: 1\n\tsites: []\n")
    assert problem.startswith("line 2, column 1: not valid YAML: ")


def test_empty_file() -> None:
    assert problems("") == ["line 1, column 1: the policy file is empty"]


def test_not_a_mapping() -> None:
    assert problems("- a\n- b\n") == [
        "line 1, column 1: the policy file must be a mapping with the keys version, sites, groups, identities,"
        " resources, rules"
    ]


def test_unknown_top_level_field_and_version() -> None:
    assert problems("version: 2\nrule: []\n") == [
        "line 1, column 10: the policy file: unsupported version '2' (this release reads version 1)",
        "line 2, column 1: the policy file: unknown field 'rule' (did you mean 'rules'?)",
    ]
    assert problems("sites: []\n") == ["line 1, column 1: the policy file: missing field 'version'"]


def test_section_must_be_a_list() -> None:
    assert problems("version: 1\nsites: {id: a}\n") == ["line 2, column 8: the policy file: 'sites' must be a list"]


def test_duplicate_keys_and_aliases_are_refused() -> None:
    text = """\
    version: 1
    groups:
      - &g {id: eng, id: ops}
      - *g
    """
    assert problems(text) == [
        # the alias is reported where its anchor is: it is the same node
        "line 3, column 5: anchors and aliases are not supported",
        "line 3, column 18: duplicate key 'id'",
    ]


def test_yaml_11_scalars_are_taken_as_written() -> None:
    # 19:00 is the integer 1140 in YAML 1.1, and "no" is false: here they are the text written.
    text = BASE.replace(
        "  - {id: eng-git, groups: [eng], resources: [git]}",
        "  - {id: eng-git, groups: [eng, no], resources: [git],"
        " conditions: {time_window: {days: [mon], start: 08:00, end: 19:00}}}",
    ).replace("  - {id: ops}", "  - {id: no}")
    model = load_policy_yaml(text)
    window = model.rules["eng-git"].conditions.time_window
    assert window is not None and (window.start, window.end) == (480, 1140)
    assert model.rules["eng-git"].groups == ("eng", "no")


# -- objects -----------------------------------------------------------------------------------

HEAD = """\
version: 1
sites:
  - {id: fra1, networks: [10.1.0.0/16, "fd00:1::/48"]}
  - {id: ams1, networks: [10.2.0.0/16]}
groups:
  - {id: eng}
"""  # six lines: what follows starts on line 7


def test_unknown_fields_missing_fields_and_ids() -> None:
    text = (
        HEAD
        + """\
  - {id: ops, descripton: x}
  - {id: dev, colour: red}
  - {description: nameless}
  - {id: "bad/id"}
  - {id: eng}
"""
    )
    assert problems(text) == [
        "line 7, column 15: group 'ops': unknown field 'descripton' (did you mean 'description'?)",
        "line 8, column 15: group 'dev': unknown field 'colour'",
        "line 9, column 5: group #4: missing field 'id'",
        "line 10, column 10: group 'bad/id': invalid id: use 1-128 letters, digits, '.', '_' or '-', starting with"
        " a letter or digit",
        "line 11, column 10: duplicate group id 'eng' (first defined at line 6)",
    ]


def test_object_must_be_a_mapping() -> None:
    assert problems(HEAD + "  - ops\n") == ["line 7, column 5: group #2 must be a mapping"]


def test_site_networks() -> None:
    text = """\
version: 1
sites:
  - {id: ams1, networks: [10.2.0.0/33, 10.3.0.1/16, banana, "fd00::/64"]}
"""
    assert problems(text) == [
        "line 3, column 27: site 'ams1': invalid CIDR '10.2.0.0/33'",
        "line 3, column 40: site 'ams1': invalid CIDR '10.3.0.1/16': host bits are set (did you mean '10.3.0.0/16'?)",
        "line 3, column 53: site 'ams1': invalid CIDR 'banana'",
    ]


def test_identities() -> None:
    text = (
        HEAD
        + """\
identities:
  - id: alice
    kind: robot
    ike_ids: ["email:alice@example.com", "alice", "ip:300.1.1.1", "fqdn:-bad-.example", "email:nobody",
              "dn:CN", "email:alice@EXAMPLE.COM", "fqdn:vpn.example.com"]
    groups: [eng, nope, eng]
  - id: bob
    ike_ids: ["email:alice@example.com", "fqdn:VPN.example.com."]
"""
    )
    assert problems(text) == [
        "line 9, column 11: identity 'alice': kind must be 'user' or 'device', not 'robot'",
        "line 10, column 42: identity 'alice': invalid IKE identity 'alice': use TYPE:VALUE with TYPE one of fqdn,"
        " email, ip, dn",
        "line 10, column 51: identity 'alice': invalid IKE identity 'ip:300.1.1.1': not an IP address",
        "line 10, column 67: identity 'alice': invalid IKE identity 'fqdn:-bad-.example': not a DNS name",
        "line 10, column 89: identity 'alice': invalid IKE identity 'email:nobody': not an email address (user@domain)",
        "line 11, column 15: identity 'alice': invalid IKE identity 'dn:CN': not a distinguished name"
        " (ATTR=value, ...)",
        # the domain of an email identity is case-insensitive: this is the first one again
        "line 11, column 24: identity 'alice': IKE identity 'email:alice@example.com' is listed twice",
        "line 12, column 19: identity 'alice': unknown group 'nope'",
        "line 12, column 25: identity 'alice': group 'eng' is listed twice",
        "line 14, column 15: identity 'bob': IKE identity 'email:alice@example.com' is already bound to"
        " identity 'alice'",
        "line 14, column 42: identity 'bob': IKE identity 'fqdn:vpn.example.com' is already bound to identity 'alice'",
    ]


def test_resource_fields() -> None:
    text = (
        HEAD
        + """\
resources:
  - {id: a, destination: "10.1.0.0/33", protocol: tcp, site: fra1}
  - {id: b, destination: "10.1.0.1/24", protocol: sctp, site: fra1}
  - {id: c, destination: "-bad-", protocol: tcp, ports: [22, http, 70000, 90-80, -5], site: fra1}
  - {id: d, destination: 10.1.0.4, protocol: icmp, ports: [80], icmp_types: [8, 3/1, 256, 3/x], site: fra1}
  - {id: e, destination: 10.1.0.5, protocol: udp, icmp_types: [8], site: fra1}
  - {id: f, destination: 10.1.0.6, site: fra1}
  - {id: g, destination: 10.1.0.7, protocol: tcp}
"""
    )
    assert problems(text) == [
        "line 8, column 26: resource 'a': invalid CIDR '10.1.0.0/33'",
        "line 9, column 26: resource 'b': invalid CIDR '10.1.0.1/24': host bits are set (did you mean '10.1.0.0/24'?)",
        "line 9, column 51: resource 'b': protocol must be one of tcp, udp, icmp, any, not 'sctp'",
        "line 10, column 26: resource 'c': destination '-bad-' is neither an IP address, a CIDR nor a DNS name",
        "line 10, column 62: resource 'c': invalid port 'http': use a number or a range like 8000-8080",
        "line 10, column 68: resource 'c': port 70000 is out of range (0-65535)",
        "line 10, column 75: resource 'c': port range 90-80 is empty (start is after end)",
        "line 10, column 82: resource 'c': invalid port '-5': use a number or a range like 8000-8080",
        "line 11, column 59: resource 'd': ports apply only to tcp and udp",
        "line 11, column 86: resource 'd': invalid ICMP type '256': use TYPE or TYPE/CODE with numbers 0-255",
        "line 11, column 91: resource 'd': invalid ICMP type '3/x': use TYPE or TYPE/CODE with numbers 0-255",
        "line 12, column 63: resource 'e': icmp_types apply only to protocol icmp",
        "line 13, column 5: resource 'f': missing field 'protocol'",
        "line 14, column 5: resource 'g': missing field 'site'",
    ]


def test_resource_references_and_collisions() -> None:
    text = (
        HEAD
        + """\
resources:
  - {id: a, destination: 10.1.2.0/24, protocol: tcp, ports: [443], site: fra1}
  - {id: b, destination: 10.1.2.7, protocol: tcp, ports: [400-500], site: ams1}
  - {id: c, destination: 10.1.2.7, protocol: udp, ports: [443], site: ams1}
  - {id: d, destination: 10.1.2.0/25, protocol: any, site: fra1}
  - {id: e, destination: 10.9.0.1, protocol: any, site: fra1}
  - {id: f, destination: 10.2.0.1, protocol: any, site: moon}
  - {id: g, destination: git.example.com, protocol: tcp, site: ams1}
"""
    )
    assert problems(text) == [
        "line 9, column 26: resource 'b': destination 10.1.2.7 is outside the networks fronted by site 'ams1'",
        "line 9, column 26: resource 'b': overlaps resource 'a' (same addresses, protocol and ports) but is"
        " fronted by site 'ams1', not site 'fra1'",
        "line 10, column 26: resource 'c': destination 10.1.2.7 is outside the networks fronted by site 'ams1'",
        "line 11, column 26: resource 'd': overlaps resource 'b' (same addresses, protocol and ports) but is"
        " fronted by site 'fra1', not site 'ams1'",
        "line 11, column 26: resource 'd': overlaps resource 'c' (same addresses, protocol and ports) but is"
        " fronted by site 'fra1', not site 'ams1'",
        "line 12, column 26: resource 'e': destination 10.9.0.1 is outside the networks fronted by site 'fra1'",
        "line 13, column 57: resource 'f': unknown site 'moon'",
    ]


def test_rules() -> None:
    text = (
        HEAD
        + """\
resources:
  - {id: git, destination: 10.1.2.3, protocol: tcp, site: fra1}
rules:
  - {id: r1, groups: [eng, nope], resources: [git, gone, git]}
  - {id: r2, groups: [], resources: []}
  - {id: r3}
  - id: r4
    groups: [eng]
    resources: [git]
    conditions:
      time_window: {days: [mon, funday, fri-mon], start: "25:00", end: "8:00", timezone: Mars/Olympus}
      source_networks: [198.51.100.0/24, 198.51.100.1/24]
      posture: [managed, "bad tag", managed]
      weather: sunny
  - {id: r5, groups: [eng], resources: [git], conditions: {time_window: {days: [], start: "09:00", end: "09:00"}}}
  - {id: r6, groups: [eng], resources: [git], conditions: {time_window: {days: [sun], start: "24:00", end: "01:00"}}}
"""
    )
    assert problems(text) == [
        "line 10, column 28: rule 'r1': unknown group 'nope'",
        "line 10, column 52: rule 'r1': unknown resource 'gone'",
        "line 10, column 58: rule 'r1': resource 'git' is listed twice",
        "line 11, column 22: rule 'r2': names no groups",
        "line 11, column 37: rule 'r2': names no resources",
        "line 12, column 5: rule 'r3': names no groups",
        "line 12, column 5: rule 'r3': names no resources",
        "line 17, column 33: rule 'r4': invalid day 'funday': use mon, tue, wed, thu, fri, sat, sun or a range"
        " like mon-fri",
        "line 17, column 58: rule 'r4': invalid time '25:00': use HH:MM from 00:00 to 24:00",
        "line 17, column 72: rule 'r4': invalid time '8:00': use HH:MM from 00:00 to 24:00",
        "line 17, column 90: rule 'r4': unknown time zone 'Mars/Olympus'",
        "line 18, column 42: rule 'r4': invalid CIDR '198.51.100.1/24': host bits are set (did you mean"
        " '198.51.100.0/24'?)",
        "line 19, column 26: rule 'r4': invalid posture tag 'bad tag': use up to 64 letters, digits, '.', '_', ':'"
        " or '-'",
        "line 19, column 37: rule 'r4': posture tag 'managed' is listed twice",
        "line 20, column 7: rule 'r4': unknown field 'weather'",
        "line 21, column 73: rule 'r5': time window names no days",
        "line 21, column 73: rule 'r5': time window is empty: start and end are both 09:00",
        "line 22, column 94: rule 'r6': a time window cannot start at 24:00",
    ]


def test_every_problem_is_reported_at_once() -> None:
    text = (
        BASE.replace("groups: [eng]\nresources", "groups: [nope]\nresources")
        .replace("ports: [22, 443]", "ports: [22, 99999]")
        .replace("resources: [git]}", "resources: [gti]}")
    )
    found = problems(text)
    assert found == [
        "line 11, column 14: identity 'alice': unknown group 'nope'",
        "line 13, column 65: resource 'git': port 99999 is out of range (0-65535)",
        "line 15, column 46: rule 'eng-git': unknown resource 'gti'",
    ]


# -- export --------------------------------------------------------------------------------------


def test_export_round_trip() -> None:
    text = (
        HEAD
        + """\
  - {id: ops, description: "Operations: on call"}
identities:
  - id: alice
    kind: user
    ike_ids: ["email:Alice@Example.COM", "dn: cn=alice , o=Example", "ip:fd00::0001", "fqdn:Laptop.example.com."]
    groups: [eng, ops]
  - {id: printer, kind: device, ike_ids: ["ip:10.1.0.9"]}
resources:
  - {id: git, destination: 10.1.2.3, protocol: tcp, ports: [22, 443, "8000-8080"], site: fra1}
  - {id: ping6, destination: "fd00:1::/64", protocol: icmp, icmp_types: [128, 1/4], site: fra1}
  - {id: wiki, destination: Wiki.Corp.Example.com, protocol: any, site: ams1, description: the wiki}
rules:
  - id: eng-git
    groups: [eng, ops]
    resources: [git, ping6, wiki]
    conditions:
      time_window: {days: [fri-mon], start: "22:00", end: "06:30", timezone: Europe/Berlin}
      source_networks: [198.51.100.0/24, "2001:db8::/32"]
      posture: [managed]
"""
    )
    model = load_policy_yaml(text)
    exported = export_policy_yaml(model)
    again = load_policy_yaml(exported)
    assert again == model
    assert export_policy_yaml(again) == exported
    assert model.identities["alice"].ike_ids[0].value == "Alice@example.com"
    assert str(model.identities["alice"].ike_ids[1]) == "dn:CN=alice, O=Example"
    assert model.resources["wiki"].destination.dns_name == "wiki.corp.example.com"
    window = model.rules["eng-git"].conditions.time_window
    assert window is not None and window.days == (0, 4, 5, 6)


def test_export_of_empty_model_loads() -> None:
    assert load_policy_yaml(export_policy_yaml(Model())) == Model()
