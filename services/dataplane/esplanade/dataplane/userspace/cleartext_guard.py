"""RFC 4301 §5.2 for the userspace backend: cleartext from a protected peer subnet is discarded.

Packets that arrive without IPsec never pass through the userspace datapath: the host
delivers them itself. So the guard lives in the kernel, which checks every packet it
delivers or forwards against its XFRM policies even when it has no ESP:

- each inbound PROTECT policy (IN, or FWD) is mirrored as an XFRM BLOCK policy with the same
  selectors and priority, in both the IN and the FWD direction (traffic for this host and
  for hosts behind it);
- the TUN gets `disable_policy` (IPv4 and IPv6): what the datapath decrypted and wrote into
  it skips the check, as packets the kernel decapsulated itself would pass theirs;
- the datapath's and the service's own sockets (UDP 500/4500, raw ESP) carry a per-socket
  bypass (`kernel.socket_options.bypass_ipsec`), so a "protect everything" policy never
  blocks the ESP and IKE between the gateways.

Several SPD entries can ask for the same kernel policy (the IN and the FWD entry of one Child
SA have the same selectors; so do the Child SAs of many peers on one connection, and an entry
re-pointed at a new Child SA asks for what it asked before): a kernel policy is shared, held
by every entry that wants it, updated only when its content changes and deleted with its last
holder. Re-pointing an entry (every rekey, every new SA on the same traffic) therefore costs
no netlink message at all, and removing one entry never lifts the guard another still needs.

Without NETLINK_XFRM (a kernel without XFRM, or no CAP_NET_ADMIN) the guard reports itself
off in the status and the SPD still governs everything that passes through the datapath.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from esplanade.dataplane.backend import DataplaneError
from esplanade.dataplane.kernel.xfrm_client import XfrmClient
from esplanade.dataplane.kernel.xfrm_messages import XfrmPolicyAction, XfrmPolicyDir
from esplanade.dataplane.kernel.xfrm_policy import XfrmPolicy, XfrmPolicyKey, xfrm_policies_from_spd
from esplanade.dataplane.kernel.xfrm_socket import XfrmSocket
from esplanade.ipsec.selectors import TrafficSelector
from esplanade.ipsec.spd import PolicyAction, PolicyDirection, SpdPolicy

log = logging.getLogger(__name__)

GUARD_DIRECTIONS = (PolicyDirection.IN, PolicyDirection.FWD)
BLOCKS_CACHED = 1024  # distinct guards remembered (`CleartextGuard._kernel_policies`)

# What the kernel BLOCK policies of an entry depend on: its selectors, priority, mark, if_id
_BlockKey = tuple[TrafficSelector, TrafficSelector, int, int, int]


def guarded(policy: SpdPolicy) -> bool:
    return policy.direction in GUARD_DIRECTIONS and policy.action == PolicyAction.PROTECT


def is_guard_policy(policy: XfrmPolicy) -> bool:
    """What the guard installs: template-less BLOCK policies, IN or FWD. On a node whose IPsec
    runs in userspace nothing else installs those (leftovers of a crashed predecessor are ours)."""
    return (
        policy.direction in (XfrmPolicyDir.IN, XfrmPolicyDir.FWD)
        and policy.action == XfrmPolicyAction.BLOCK
        and not policy.templates
    )


class CleartextGuard:
    def __init__(self, tun: str, proc_sys: Path = Path("/proc/sys")) -> None:
        self.tun = tun
        self.proc_sys = proc_sys
        self._sock: XfrmSocket | None = None
        self._client: XfrmClient | None = None
        self._installed: dict[str, list[XfrmPolicy]] = {}  # SPD policy id -> the kernel policies it wants
        self._kernel: dict[XfrmPolicyKey, XfrmPolicy] = {}  # what we put into the kernel, by its key
        self._holders: dict[XfrmPolicyKey, list[str]] = {}  # key -> SPD ids wanting it, latest last
        self._blocks: dict[_BlockKey, tuple[XfrmPolicy, ...]] = {}  # see _kernel_policies
        self.netlink_updates = 0
        self.netlink_deletes = 0
        self.swept = 0
        self.note = "not started"

    @property
    def active(self) -> bool:
        return self._client is not None

    async def start(self) -> None:
        try:
            for family in ("ipv4", "ipv6"):
                (self.proc_sys / "net" / family / "conf" / self.tun / "disable_policy").write_text("1")
        except OSError as exc:
            self.note = f"off: cannot exempt {self.tun} from XFRM policies ({exc.strerror})"
            log.warning("inbound cleartext guard %s", self.note)
            return
        try:
            self._sock = XfrmSocket()
            self._client = XfrmClient(self._sock)
            # kill -9 leaves kernel state behind: a predecessor's guard policies go first
            for stale in self._client.dump_policies():
                if is_guard_policy(stale):
                    self._client.delete_policy(stale.key)
                    self.swept += 1
        except (OSError, DataplaneError) as exc:
            self.note = f"off: {exc}"
            log.warning("inbound cleartext guard %s", self.note)
            self._close()
            return
        self.note = "on: XFRM BLOCK policies mirror the inbound PROTECT policies"

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = self._client = None

    async def stop(self) -> None:
        for policy_id in list(self._installed):
            await self.remove(policy_id)
        self._close()

    def _kernel_policies(self, policy: SpdPolicy) -> list[XfrmPolicy]:
        """The BLOCK policies mirroring `policy`, remembered per what they depend on: every
        Child SA of one connection (every setup, every rekey) asks for the same ones, and
        building them parses the selectors' addresses again. A policy that cannot be
        expressed raises each time (its error names the entry), and is not remembered."""
        key = (policy.local_ts, policy.remote_ts, policy.priority, policy.mark, policy.if_id)
        blocks = self._blocks.get(key)
        if blocks is None:
            out: list[XfrmPolicy] = []
            for direction in GUARD_DIRECTIONS:
                block = replace(policy, direction=direction, action=PolicyAction.DISCARD, trap=False, reqid=0)
                out.extend(xfrm_policies_from_spd(block, reqid=0))
            if len(self._blocks) >= BLOCKS_CACHED:
                self._blocks.clear()
            blocks = self._blocks[key] = tuple(out)
        return list(blocks)

    async def add(self, policy: SpdPolicy) -> None:
        """Mirror `policy` (replacing an earlier version of it); all or nothing (DataplaneError)."""
        client = self._client
        if client is None:
            return
        if not guarded(policy):
            await self.remove(policy.id)
            return
        wanted = self._kernel_policies(policy)
        changed: list[tuple[XfrmPolicyKey, XfrmPolicy | None]] = []  # (key, what the kernel had)
        try:
            for kernel_policy in wanted:
                before = self._kernel.get(kernel_policy.key)
                if before == kernel_policy:
                    continue  # held already, as wanted: nothing to tell the kernel
                client.update_policy(kernel_policy)  # create or replace: idempotent after a crash
                self.netlink_updates += 1
                self._kernel[kernel_policy.key] = kernel_policy
                changed.append((kernel_policy.key, before))
        except DataplaneError:
            for key, before in reversed(changed):
                if before is None:
                    self._kernel.pop(key, None)
                    self._delete(key)
                else:
                    self._put(before)
            raise
        previous = self._installed.get(policy.id, [])
        self._installed[policy.id] = wanted
        for kernel_policy in wanted:
            holders = self._holders.setdefault(kernel_policy.key, [])
            if policy.id in holders:
                holders.remove(policy.id)
            holders.append(policy.id)
        wanted_keys = {p.key for p in wanted}
        for old in previous:
            if old.key not in wanted_keys:
                self._release(old.key, policy.id)

    async def remove(self, policy_id: str) -> None:
        for kernel_policy in self._installed.pop(policy_id, []):
            self._release(kernel_policy.key, policy_id)

    def _release(self, key: XfrmPolicyKey, policy_id: str) -> None:
        """`policy_id` no longer wants `key`: delete it with its last holder, else leave (or put
        back) what the latest remaining holder wants."""
        holders = self._holders.get(key, [])
        if policy_id in holders:
            holders.remove(policy_id)
        if not holders:
            self._holders.pop(key, None)
            self._kernel.pop(key, None)
            self._delete(key)
            return
        latest = next((p for p in self._installed.get(holders[-1], []) if p.key == key), None)
        if latest is not None and self._kernel.get(key) != latest:
            self._put(latest)

    def _put(self, kernel_policy: XfrmPolicy) -> None:
        if self._client is None:
            return
        try:
            self._client.update_policy(kernel_policy)
            self.netlink_updates += 1
            self._kernel[kernel_policy.key] = kernel_policy
        except DataplaneError as exc:
            log.warning("cleartext guard policy %s not restored: %s", kernel_policy.key, exc)

    def _delete(self, key: XfrmPolicyKey) -> None:
        if self._client is None:
            return
        try:
            self._client.delete_policy(key)
            self.netlink_deletes += 1
        except DataplaneError as exc:
            log.warning("cleartext guard policy %s not removed: %s", key, exc)

    def kernel_policies(self) -> list[XfrmPolicy]:
        """The kernel policies the guard holds now (one per key, however many entries want it)."""
        return list(self._kernel.values())

    def status(self) -> str:
        if not self.active:
            return self.note
        return f"{self.note} ({len(self._installed)} policies, {len(self._kernel)} kernel policies)"
