"""`access_narrowing: networks` (coarse IKE narrowing to the sites' networks, the filter stays exact)
and the connector's dial-out-only role (no IKE responder; the dataplane's nftables table): the
pure parts and the validation, without netns."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from dataclasses import dataclass
from typing import Any

import pytest
from pydantic import ValidationError

from esplanade.config.settings import Settings
from esplanade.dataplane.dial_out_firewall import TABLE, DialOutFirewall, FirewallError, ruleset
from esplanade.ipsec.selectors import TrafficSelector
from esplanade.keyexchange.config import ConnectionConfig
from esplanade.keyexchange.connection_documents import DocumentError, connection_config
from esplanade.keyexchange.ikev2.errors import ConfigError
from esplanade.keyexchange.ikev2.events import IkeSaEstablished
from esplanade.keyexchange.remote_access_policy import RemoteAccessPolicy
from esplanade.policy.access_view import AccessTable
from esplanade.policy.compiler import PolicyCompiler
from esplanade.policy.decision_events import DecisionEvents
from esplanade.policy.decode import encode_document, object_to_document
from esplanade.policy.model import Site
from esplanade.policy.policy_file import load_policy_yaml
from esplanade.policy.selector_sets import network_selectors
from esplanade.store import schema
from esplanade.store.base import KeyValue
from tests.keyexchange.peers import conn, pair

POLICY = """
version: 1
sites:
  - {id: hq, networks: [10.60.0.0/16, "2001:db8:60::/48"]}
  - {id: lab, networks: [10.60.9.0/24]}
  - {id: edge, networks: [10.70.0.0/24]}
  - {id: bare}
groups:
  - {id: eng}
identities:
  - {id: alice, ike_ids: ["email:alice@corp.test"], groups: [eng]}
resources:
  - {id: web, destination: 10.60.1.10, protocol: tcp, ports: [8443], site: hq}
  - {id: v6, destination: "2001:db8:60::5", protocol: tcp, ports: [22], site: hq}
  - {id: scope, destination: 10.60.9.7, protocol: udp, ports: [161], site: lab}
  - {id: app, destination: 10.70.0.5, protocol: tcp, ports: [17000], site: edge}
  - {id: loose, destination: 192.0.2.9, protocol: tcp, ports: [80], site: bare}
rules:
  - {id: eng-all, groups: [eng], resources: [web, v6, scope, app, loose]}
"""


def kv(key: str, doc: dict[str, Any]) -> KeyValue:
    return KeyValue(key, encode_document(doc), 1, 1, 1)


def table() -> AccessTable:
    model = load_policy_yaml(POLICY)
    compiler = PolicyCompiler()
    compiler.load(model)
    kvs = [kv(schema.policy_object("sites", s.id), object_to_document(s)) for s in model.sites.values()]
    kvs += [kv(schema.policy_object("identities", i.id), object_to_document(i)) for i in model.identities.values()]
    kvs += [kv(schema.compiled_policy(i), doc) for i, doc in compiler.documents().items()]
    t = AccessTable()
    t.load(kvs)
    return t


def test_network_selectors_widen_each_grant_to_the_smallest_site_network_holding_it() -> None:
    grants = [TrafficSelector.parse(t) for t in ("10.60.1.10/32[tcp/8443]", "10.60.9.7/32[udp/161]", "192.0.2.9/32")]
    nets = [ipaddress.ip_network(n) for n in ("10.60.0.0/16", "10.60.9.0/24", "10.70.0.0/24")]
    # 10.60.9.7 is in both hq and lab: the smaller (lab) is enough, and hq's /16 swallows it anyway
    assert [str(t) for t in network_selectors(grants, nets)] == ["10.60.0.0/16", "192.0.2.9/32"]
    only_lab = [TrafficSelector.parse("10.60.9.7/32[udp/161]")]
    assert [str(t) for t in network_selectors(only_lab, nets)] == ["10.60.9.0/24"]
    # a grant wider than every site network stays as it is (address-only)
    wide = [TrafficSelector.parse("10.0.0.0/8[tcp/22]")]
    assert [str(t) for t in network_selectors(wide, nets)] == ["10.0.0.0/8"]
    assert network_selectors([], nets) == []
    many = [TrafficSelector.parse(f"172.16.{i}.1/32") for i in range(0, 200, 2)]
    assert len(network_selectors(many, [], limit=10)) <= 10


def test_the_access_table_follows_sites_without_telling_the_filters() -> None:
    t = table()
    access = t.lookup("alice@corp.test")
    assert access is not None
    assert {str(n) for n in access.site_networks} == {
        "10.60.0.0/16",
        "2001:db8:60::/48",
        "10.60.9.0/24",
        "10.70.0.0/24",
    }
    assert (
        t.put(
            kv(
                schema.policy_object("sites", "edge"),
                object_to_document(Site("edge", (ipaddress.ip_network("10.71.0.0/24"),))),
            )
        )
        == set()
    )
    access = t.lookup("alice@corp.test")
    assert access is not None and "10.71.0.0/24" in {str(n) for n in access.site_networks}
    assert t.delete(schema.policy_object("sites", "edge")) == set()
    access = t.lookup("alice@corp.test")
    assert access is not None and not any(str(n).startswith("10.7") for n in access.site_networks)


@dataclass
class FakeIke:
    config: ConnectionConfig
    remote: tuple[str, int] = ("198.51.100.7", 4500)

    def remote_identity_text(self) -> str:
        return "alice@corp.test"


class FakeView:
    def __init__(self, t: AccessTable) -> None:
        self.table = t

    def lookup(self, peer: str) -> Any:
        return self.table.lookup(peer)


def grant(narrowing: str | None) -> Any:
    over = {} if narrowing is None else {"access_narrowing": narrowing}
    config = ConnectionConfig.from_dict("rw", conn("b", **over))
    policy = RemoteAccessPolicy(FakeView(table()), DecisionEvents("test"))  # type: ignore[arg-type]
    return policy.grant_for(FakeIke(config))  # type: ignore[arg-type]


def test_exact_narrowing_is_the_default_and_grants_hosts_protocols_and_ports() -> None:
    exact = grant(None)
    assert exact == grant("exact")
    assert "10.60.1.10/32[tcp/8443]" in [str(t) for t in exact.selectors]
    assert [str(r) for r in exact.routes][:2] == ["10.60.1.10/32", "10.60.9.7/32"]


def test_networks_narrowing_grants_the_site_networks_address_only_with_routes_to_match() -> None:
    coarse = grant("networks")
    assert coarse.identity == "alice" and coarse.rules == ("eng-all",)
    assert [str(t) for t in coarse.selectors] == ["10.60.0.0/16", "10.70.0.0/24", "192.0.2.9/32", "2001:db8:60::/48"]
    assert [str(r) for r in coarse.routes] == ["10.60.0.0/16", "10.70.0.0/24", "192.0.2.9/32", "2001:db8:60::/48"]


def test_access_narrowing_is_validated_in_the_connection_document() -> None:
    assert ConnectionConfig.from_dict("rw", conn("b")).access_narrowing == "exact"
    assert ConnectionConfig.from_dict("rw", conn("b", access_narrowing="networks")).access_narrowing == "networks"
    with pytest.raises(ConfigError) as err:
        ConnectionConfig.from_dict("rw", conn("b", access_narrowing="sites"))
    assert err.value.field == "connections.rw.access_narrowing"
    doc = json.loads(json.dumps(conn("b", access_narrowing=True), default=str))
    doc["psk"] = doc["psk"].encode() if isinstance(doc["psk"], str) else doc["psk"]
    with pytest.raises(DocumentError) as derr:
        connection_config("rw", doc, {})
    assert derr.value.field == "connections.rw.access_narrowing" and "exact or networks" in derr.value.reason


def test_a_dial_out_only_keyexchange_answers_no_ike_sa_init_but_still_initiates() -> None:
    net, a, b = pair()
    b.engine.responder = False
    a.engine.initiate("ab", net.now)
    net.run()
    assert not a.of(IkeSaEstablished) and not b.of(IkeSaEstablished)
    assert b.engine.counters.get("dropped_init_not_responder", 0) >= 1
    net, a, b = pair()
    a.engine.responder = False  # the connector initiates; the gateway answers
    a.engine.initiate("ab", net.now)
    net.run()
    assert a.of(IkeSaEstablished) and b.of(IkeSaEstablished)


def test_the_dial_out_table_drops_inbound_but_loopback_replies_nd_and_management() -> None:
    script = ruleset(["mgmt0", "eth1"])
    assert script.startswith(f"add table inet {TABLE}\ndelete table inet {TABLE}\n")  # replaces a stale one
    assert "hook input priority filter; policy drop;" in script
    for line in ('iif "lo" accept', "ct state established,related accept", 'iifname "mgmt0" accept'):
        assert line in script
    assert "ip6 hoplimit 255 accept" in script
    with pytest.raises(FirewallError):
        ruleset(['eth0" accept; #'])


def test_the_dial_out_firewall_is_installed_in_one_transaction_and_removed_on_stop() -> None:
    calls: list[tuple[list[str], str]] = []

    def run(args: list[str], script: str) -> subprocess.CompletedProcess[str]:
        calls.append((args, script))
        return subprocess.CompletedProcess(args, 0, "", "")

    fw = DialOutFirewall(["mgmt0"], run=run)
    fw.start()
    assert fw.installed and calls == [(["nft", "-f", "-"], ruleset(["mgmt0"]))]
    fw.stop()
    assert not fw.installed and calls[-1][0] == ["nft", "delete", "table", "inet", TABLE]


def test_a_refused_table_is_a_clear_error_and_nothing_to_remove() -> None:
    def refuse(args: list[str], script: str) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(args, 1, "", "Error: Could not process rule: No such file or directory")

    fw = DialOutFirewall(run=refuse)
    with pytest.raises(FirewallError, match="nft refused the dial-out-only table: Error: Could not process"):
        fw.start()
    assert not fw.installed
    fw.stop()  # nothing to remove, no call

    def missing(args: list[str], script: str) -> subprocess.CompletedProcess[str]:
        raise FileNotFoundError("nft")

    with pytest.raises(FirewallError, match="nft failed"):
        DialOutFirewall(run=missing).start()


def test_site_settings_are_validated() -> None:
    settings = Settings(site={"inbound": "dial-out-only", "management_interfaces": ["mgmt0"]})  # type: ignore[arg-type]
    assert settings.site.inbound == "dial-out-only" and settings.site.management_interfaces == ["mgmt0"]
    assert Settings().site.inbound == "open"
    with pytest.raises(ValidationError, match="inbound"):
        Settings(site={"inbound": "closed"})  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="not an interface name"):
        Settings(site={"inbound": "dial-out-only", "management_interfaces": ["way-too-long-interface"]})  # type: ignore[arg-type]
