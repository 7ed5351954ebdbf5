"""`esplanade ctl` and `esplanade policy` against a running API (typer's runner, real HTTP)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from esplanade.cli.main import app
from tests.api.stack import ApiStack

POLICY = """version: 1
sites:
  - {id: fra1, networks: [10.1.0.0/16]}
groups:
  - {id: engineering}
identities:
  - {id: alice, kind: user, ike_ids: ["email:alice@example.com"], groups: [engineering]}
resources:
  - {id: git, destination: 10.1.2.3, protocol: tcp, ports: [22, 443], site: fra1}
rules:
  - {id: eng-git, groups: [engineering], resources: [git]}
"""


@pytest.fixture
def ctl(stack: ApiStack, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CliRunner:
    monkeypatch.setenv("ESPLANADE_CTL_URL", stack.url)
    monkeypatch.setenv("ESPLANADE_CTL_TOKEN", stack.tokens["admin"])
    monkeypatch.setenv("HOME", str(tmp_path))
    return CliRunner()


def test_connections_and_sas(ctl: CliRunner, tmp_path: Path) -> None:
    spec = tmp_path / "gw.yaml"
    spec.write_text(
        "name: ctl-gw\nremote_addrs: [192.0.2.2]\nlocal: {id: gw1.example.com}\npsk: ctl-secret-123456\n"
        "children:\n  net: {local_ts: [10.1.0.0/16], remote_ts: [10.2.0.0/16]}\n"
    )
    created = ctl.invoke(app, ["ctl", "connections", "create", "-f", str(spec), "-o", "json"])
    assert created.exit_code == 0, created.output
    assert json.loads(created.output)["psk"] == {"set": True}
    listed = ctl.invoke(app, ["ctl", "connections", "list", "-o", "yaml"])
    assert "ctl-gw" in listed.output and "ctl-secret" not in listed.output
    up = ctl.invoke(app, ["ctl", "initiate", "ctl-gw"])
    assert up.exit_code == 0 and "initiating ctl-gw" in up.output
    sas = ctl.invoke(app, ["ctl", "sas"])
    assert sas.exit_code == 0
    assert "ctl-gw: #ike-" in sas.output and "ESTABLISHED" in sas.output and "bytes" in sas.output
    counters = ctl.invoke(app, ["ctl", "counters"])
    assert counters.exit_code == 0 and "node-a" in counters.output
    ike = sas.output.split("#", 1)[1].split(",", 1)[0]
    assert ctl.invoke(app, ["ctl", "rekey", ike]).exit_code == 0
    assert ctl.invoke(app, ["ctl", "terminate", ike]).exit_code == 0
    gone = ctl.invoke(app, ["ctl", "connections", "delete", "ctl-gw"])
    assert gone.exit_code == 0
    missing = ctl.invoke(app, ["ctl", "connections", "get", "ctl-gw"])
    assert missing.exit_code == 1 and "404" in missing.output


def test_policy_as_code(ctl: CliRunner, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    diff = ctl.invoke(app, ["policy", "diff", "-f", str(policy)])
    assert diff.exit_code == 0 and "+ rule 'eng-git'" in diff.output
    dry = ctl.invoke(app, ["policy", "apply", "-f", str(policy), "--dry-run"])
    assert "not applied" in dry.output
    applied = ctl.invoke(app, ["policy", "apply", "-f", str(policy)])
    assert applied.exit_code == 0 and "applied" in applied.output
    exported = ctl.invoke(app, ["policy", "export"])
    assert "eng-git" in exported.output
    what = ctl.invoke(
        app,
        [
            "policy",
            "what-if",
            "-f",
            str(policy),
            "--identity",
            "alice",
            "--src",
            "10.9.0.1",
            "--dst",
            "10.1.2.3",
            "--port",
            "22",
        ],
    )
    assert what.exit_code == 0 and "allow" in what.output
    rules = ctl.invoke(app, ["ctl", "rules", "list"])
    assert "eng-git" in rules.output
    audit = ctl.invoke(app, ["ctl", "audit", "-o", "json"])
    assert "POST /api/v1/policy/apply" in audit.output
    tokens = ctl.invoke(app, ["ctl", "tokens", "create", "ci", "--scope", "operator", "-o", "json"])
    assert json.loads(tokens.output)["token"].startswith("esp_")
    bad = ctl.invoke(app, ["ctl", "tokens", "create", "x", "--scope", "root"])
    assert bad.exit_code == 1 and "scope" in bad.output


def test_logs_and_status(ctl: CliRunner, stack: ApiStack) -> None:
    # audit: filtered by actor (--identity) and result (--decision), as JSON lines
    assert ctl.invoke(app, ["ctl", "groups", "delete", "no-such-group"]).exit_code == 1
    audit = ctl.invoke(app, ["ctl", "logs", "audit", "--decision", "error 404", "-o", "jsonl"])
    assert audit.exit_code == 0, audit.output
    records = [json.loads(line) for line in audit.output.splitlines()]
    assert records and all(r["result"] == "error 404" for r in records)
    assert any(r["action"].startswith("DELETE /api/v1/groups/") for r in records)
    assert ctl.invoke(app, ["ctl", "logs", "audit", "--since", "1h", "-o", "json"]).exit_code == 0
    # flows: every filter reaches the dataplane
    denied = ctl.invoke(app, ["ctl", "logs", "flows", "--decision", "deny", "-o", "json"])
    assert [f["identity"] for f in json.loads(denied.output)] == ["bob"]
    alice = ctl.invoke(app, ["ctl", "logs", "flows", "--identity", "alice", "--resource", "wiki", "-o", "jsonl"])
    (flow,) = [json.loads(line) for line in alice.output.splitlines()]
    assert flow["bytes"] == 5000 and flow["dst_port"] == 443 and flow["decision"] == "allow"
    ranged = ctl.invoke(app, ["ctl", "logs", "flows", "--since", "1015", "--until", "1100", "-o", "json"])
    assert [f["identity"] for f in json.loads(ranged.output)] == ["bob"]
    table = ctl.invoke(app, ["ctl", "logs", "flows"])
    assert table.exit_code == 0 and "deny" in table.output
    assert ctl.invoke(app, ["ctl", "logs", "nope"]).exit_code == 1
    # status: services, tunnels up or down and why
    status = ctl.invoke(app, ["ctl", "status", "-o", "json"])
    assert status.exit_code == 0, status.output
    doc = json.loads(status.output)
    tunnels = {t["connection"]: t for t in doc["tunnels"]}
    assert not tunnels["dead"]["up"] and "TIMEOUT" in tunnels["dead"]["reason"]
    assert set(doc["services"]) >= {"keyexchange", "dataplane", "policy"}
    assert doc["top_talkers"][0] == {"identity": "carol", "connection": "gw", "bytes": 90000, "packets": 70}
    shown = ctl.invoke(app, ["ctl", "status"])
    assert shown.exit_code == 0 and "DOWN" in shown.output
