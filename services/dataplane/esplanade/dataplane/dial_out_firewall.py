"""A connector's inbound firewall: the dataplane owns it while it runs (`site.inbound: dial-out-only`).

A connector only dials out (it is the IKE initiator of its uplink), so nothing from outside
needs to open anything on it. The dataplane service installs one nftables table,
``inet esplanade_dial_out``, in its network namespace before it starts the datapath, keeps it
while it runs and deletes it on a clean stop. Its input chain drops by default and accepts:

- loopback;
- replies to what this host sent (conntrack established/related: the uplink's IKE and
  ESP-in-UDP flows, the services' own outbound connections, ICMP errors about them);
- IPv6 neighbour discovery (hop limit 255: on-link only), without which IPv6 stops working;
- the configured management interfaces (gRPC, metrics, SSH).

Every other inbound packet, IPv4 and IPv6 (a new TCP connection, a UDP datagram such as an
IKE_SA_INIT to 500/4500, an ICMP echo) is dropped. Traffic routed through the connector (the
users' flows toward the resources it fronts) is forwarded, not input, and is untouched.

Installing is one nftables transaction (``nft -f``): an old table left by a crash is replaced in
the same transaction, and a failure leaves nothing half-installed. While the service runs,
`keep` checks every `KEEP_INTERVAL` seconds that the table is still there and puts it back (with
an error in the log) if someone deleted it.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

TABLE = "esplanade_dial_out"
KEEP_INTERVAL = 2.0  # seconds between checks that the table is still installed
Runner = Callable[[list[str], str], subprocess.CompletedProcess[str]]


class FirewallError(RuntimeError):
    """The table could not be installed (nothing was)."""


def ruleset(management_interfaces: Sequence[str] = ()) -> str:
    """The nft script that (re)creates the table atomically."""
    for name in management_interfaces:
        if not 0 < len(name) <= 15 or not all(c.isalnum() or c in "-_.@:" for c in name) or not name.isascii():
            raise FirewallError(f"{name!r} is not an interface name")
    management = "".join(f'        iifname "{name}" accept\n' for name in management_interfaces)
    return (
        f"add table inet {TABLE}\n"
        f"delete table inet {TABLE}\n"
        f"table inet {TABLE} {{\n"
        "    chain input {\n"
        "        type filter hook input priority filter; policy drop;\n"
        '        iif "lo" accept\n'
        "        ct state established,related accept\n"
        "        icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert } ip6 hoplimit 255 accept\n"
        f"{management}"
        "    }\n"
        "}\n"
    )


def _run(args: list[str], script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, input=script, text=True, capture_output=True, timeout=10, check=False)


class DialOutFirewall:
    """Install on `start`, delete on `stop`; `run` is `nft` (a fake in unit tests)."""

    def __init__(self, management_interfaces: Sequence[str] = (), run: Runner = _run, nft: str = "nft") -> None:
        self.script = ruleset(management_interfaces)
        self.management_interfaces = tuple(management_interfaces)
        self._run = run
        self._nft = nft
        self.installed = False
        self.reinstalls = 0  # times `keep` found the table gone and put it back

    def start(self) -> None:
        if self._run is _run and shutil.which(self._nft) is None:
            raise FirewallError(f"site.inbound is dial-out-only but {self._nft!r} (nftables) is not installed")
        try:
            result = self._run([self._nft, "-f", "-"], self.script)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise FirewallError(f"nft failed: {exc}") from None
        if result.returncode != 0:
            raise FirewallError(f"nft refused the dial-out-only table: {result.stderr.strip()[:500]}")
        self.installed = True
        log.info(
            "dial-out only: nftables table inet %s installed (inbound accepted on lo%s only)",
            TABLE,
            "".join(f", {name}" for name in self.management_interfaces),
        )

    def stop(self) -> None:
        if not self.installed:
            return
        try:
            result = self._run([self._nft, "delete", "table", "inet", TABLE], "")
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.error("dial-out-only table not removed: %s", exc)
            return
        if result.returncode != 0:
            log.error("dial-out-only table not removed: %s", result.stderr.strip()[:500])
            return
        self.installed = False
        log.info("dial-out only: nftables table inet %s removed", TABLE)

    def present(self) -> bool:
        """Is the table in the namespace (as installed; `nft list table` succeeds)?"""
        try:
            result = self._run([self._nft, "list", "table", "inet", TABLE], "")
        except (OSError, subprocess.TimeoutExpired):
            return False
        return result.returncode == 0

    async def keep(self, interval: float = KEEP_INTERVAL) -> None:
        """While the service runs: put the table back whenever it went missing."""
        while True:
            await asyncio.sleep(interval)
            if not self.installed or await asyncio.to_thread(self.present):
                continue
            log.error("dial-out only: nftables table inet %s was removed behind our back; reinstalling", TABLE)
            try:
                await asyncio.to_thread(self.start)
            except FirewallError as exc:
                log.error("dial-out only: reinstalling the table failed: %s", exc)
                continue
            self.reinstalls += 1
