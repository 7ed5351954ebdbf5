"""`make demo`: the platform, IKEv2 tunnels with Esplanade and strongSwan peers, and their traffic.

1. `esplanade up`: the four services SERVING, /readyz 200.
2. IKEv2 between two Esplanade sites (ECDSA certificates) and with strongSwan 5.9.8 (PSK):
   the SAs, a ping across each tunnel and the per-SA counters.
3. Zero-trust access: strongSwan remote users in two groups (and one granted nothing) through
   an Esplanade gateway: an allowed flow, denied flows with their log entries, a rule revoked
   live (the stream stops within a second) and its audit record.
"""

from __future__ import annotations

import sys
import time

from demo import ike_sites, platform_up, zero_trust


def say(text: str) -> None:
    print(text, flush=True)


def main() -> int:
    steps = [
        ("The platform: esplanade up", platform_up.run_scenario),
        ("IKEv2 tunnels: Esplanade <-> Esplanade, Esplanade <-> strongSwan", ike_sites.run_scenario),
        ("Zero-trust access: remote users in two groups", zero_trust.run_scenario),
    ]
    failed = []
    for title, scenario in steps:
        say(f"\n{'=' * 78}\n{title}\n{'=' * 78}")
        started = time.monotonic()
        ok = scenario(say)
        say(f"-- {'ok' if ok else 'FAILED'} ({time.monotonic() - started:.0f}s)")
        if not ok:
            failed.append(title)
    if failed:
        say(f"\nfailed: {', '.join(failed)}")
        return 1
    say("\nall demo steps passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
