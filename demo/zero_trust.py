"""Zero-trust access: remote users in two groups through an Esplanade gateway.

    python -m demo.zero_trust

The gateway (policy + keyexchange + dataplane services, netns zt-gw) fronts a private network;
three strongSwan 5.9.8 remote users connect: alice (group eng), bob (group sales) and carol
(contractors, granted nothing). The demo shows what each got (virtual IP, narrowed selectors,
routes), an allowed flow, denied flows with their decision-log entries, and a rule revoked
live: alice's TCP stream stops reaching the server within a second, and the audit log records
who removed the rule. `run_scenario()` is what `make demo` calls.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from esplanade.journal.audit import AuditLog
from tests.conditions import wait_until
from tests.keyexchange.esp_tunnel import EspState
from tests.zerotrust.gateway import (
    CRM,
    POLICY_YAML,
    WEB,
    Bed,
    Listener,
    StampedServer,
    decision_lines,
    gateway_record,
    send_esp,
    stamped_sender,
    tcp_reaches,
    tcp_syn,
    zero_trust_bed,
)

Say = Callable[[str], None]


def _message(line: str) -> str:
    return line.split("esplanade.decisions: ", 1)[-1]


def _show_users(bed: Bed, say: Say) -> bool:
    ok = True
    for name, user in (("alice (eng)", bed.alice), ("bob (sales)", bed.bob)):
        sas = user.sas()
        remote = next(
            (
                line.split(None, 1)[1]
                for line in sas.splitlines()
                if line.strip().startswith("remote ") and "@" not in line
            ),
            "",
        )
        say(f"  {name}: virtual IP {user.virtual_ip()}, tunnel selectors {remote.strip()}")
        say(f"      routes into the tunnel: {', '.join(user.tunnel_routes())}")
        ok &= bool(remote)
    denied = decision_lines(bed.gw.kx_log, "connect deny carol")
    say(f"  carol (contractors): Child SA refused (TS_UNACCEPTABLE); log: {_message(denied[0]) if denied else '-'}")
    for line in decision_lines(bed.gw.kx_log, "connect allow"):
        say(f"  log: {_message(line)}")
    return ok and bool(denied)


def _flows(bed: Bed, say: Say) -> bool:
    alice_ip, bob_ip = bed.alice.virtual_ip(), bed.bob.virtual_ip()
    listeners = [Listener(WEB, 8443), Listener(WEB, 9000), Listener(CRM, 8443), Listener(CRM, 9000)]
    try:
        checks = [
            ("alice -> web 10.60.1.10:8443 (granted)", tcp_reaches(bed.alice, alice_ip, WEB, 8443), True),
            ("alice -> web 10.60.1.10:9000 (other port)", tcp_reaches(bed.alice, alice_ip, WEB, 9000), False),
            ("alice -> crm 10.60.1.11:8443 (neighbour host)", tcp_reaches(bed.alice, alice_ip, CRM, 8443), False),
            ("bob   -> crm 10.60.1.11:9000 (granted)", tcp_reaches(bed.bob, bob_ip, CRM, 9000), True),
            ("bob   -> web 10.60.1.10:8443 (eng's)", tcp_reaches(bed.bob, bob_ip, WEB, 8443), False),
        ]
    finally:
        for listener in listeners:
            listener.stop()
    ok = True
    for label, reached, expected in checks:
        say(f"  {label}: {'connected' if reached else 'no connection'}")
        ok &= reached == expected
    return ok


def _revoke_live(bed: Bed, say: Say) -> bool:
    gw = bed.gw
    server = StampedServer(WEB, 8443, bed.base / "demo-server.log")
    sender = stamped_sender(bed.alice, bed.alice.virtual_ip(), WEB, 8443, 3.0, bed.base / "demo-sender.log")
    try:
        wait_until(lambda: len(server.lines()) >= 10, timeout=10, what="alice's stream flowing")
        removed_at = time.time()
        gw.delete_rule("eng-web")
        say("  alice streams timestamped lines to web:8443; rule eng-web deleted by 'security-team'")
        sender.wait(20)
        received = server.lines()
        last_sent = max(at for _, _, at in received) - removed_at
        say(f"  the server received {len(received)} lines; the last one was sent {last_sent * 1000:+.0f} ms after")
        say("  the removal (the client kept writing for 3 s)")
        wait_until(
            lambda: decision_lines(gw.dp_log, "identity filter"), timeout=15, what="the drops in the decision log"
        )
        say(f"  log: {_message(decision_lines(gw.dp_log, 'identity filter')[0])}")
        audit = AuditLog(gw.audit_path)
        try:
            page = audit.query()
        finally:
            audit.close()
        rows = [r for r in page.records if r.get("target") == "rules/eng-web" and r.get("action") == "policy.delete"]
        if rows:
            row = rows[-1]
            say(f"  audit: {row.get('actor')} {row.get('action')} {row.get('target')} ({row.get('result')})")
        return last_sent <= 1.0 and bool(rows)
    finally:
        sender.kill()
        server.stop()
        gw.put_rule({"id": "eng-web", "groups": ["eng"], "resources": ["web"]})


def _outside_grant(bed: Bed, say: Say) -> bool:
    """A client that sends outside its grant anyway (alice's SA keys, forged packets)."""
    gw = bed.gw
    record = gateway_record(gw, "alice@corp.test")
    state = EspState(record.inbound)
    state.seq = 1_000_000
    ip = bed.alice.virtual_ip()
    send_esp(bed.alice, record, [state.encrypt(tcp_syn(ip, CRM, 8443), 4)])
    wait_until(
        lambda: [line for line in decision_lines(gw.dp_log, "drop deny alice") if "outside" in line],
        timeout=15,
        what="the drop logged",
    )
    line = next(line for line in decision_lines(gw.dp_log, "drop deny alice") if "outside" in line)
    say("  packets alice's client encrypts toward crm anyway are dropped by the gateway's dataplane:")
    say(f"  log: {_message(line)}")
    return True


def run_scenario(say: Say = print) -> bool:
    say("policy (esplanade policy apply -f):")
    for line in POLICY_YAML.strip().splitlines()[1:]:
        say(f"  {line}")
    with tempfile.TemporaryDirectory(prefix="demo-zt-") as tmp, zero_trust_bed(Path(tmp), with_connector=False) as bed:
        ok = True
        for title, step in (
            ("what each user got", _show_users),
            ("flows", _flows),
            ("a rule revoked live", _revoke_live),
            ("a client sending outside its grant", _outside_grant),
        ):
            say(f"\n-- {title}")
            try:
                step_ok = step(bed, say)
            except Exception as exc:  # a demo step reports, the others still run
                say(f"  FAILED: {type(exc).__name__}: {exc}")
                step_ok = False
            ok &= step_ok
        return ok


if __name__ == "__main__":
    sys.exit(0 if run_scenario() else 1)
