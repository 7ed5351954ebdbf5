"""Identity filters on the kernel backend, against the fake kernel: which XFRM policies a filter
becomes, how a change replaces them without a gap for a still-granted flow, restore on None,
all or nothing, and the journal across a restart. The real kernel: test_kernel_backend_netns.py
(policies) and tests/vm/guest/test_identity_filter.py (packets)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from esplanade.dataplane.backend import InvalidArgument, NotFound, Unsupported
from esplanade.dataplane.kernel.backend import KernelXfrmBackend
from esplanade.dataplane.kernel.state_journal import KernelStateJournal
from esplanade.dataplane.kernel.xfrm_messages import XfrmPolicyAction, XfrmPolicyDir
from esplanade.dataplane.kernel.xfrm_policy import XfrmPolicy, XfrmPolicyKey
from esplanade.dataplane.kernel.xfrm_selector import selector_matches
from esplanade.ipsec.sa import ChildSaRecord
from esplanade.ipsec.selectors import TrafficSelector
from esplanade.ipsec.spd import PolicyDirection, SpdPolicy
from esplanade.ipsec.transforms import Mode
from tests.dataplane.kernel.child_sa_builders import TRANSFORMS_BY_LABEL, Peer, child_sa_pair, protect_policies
from tests.dataplane.kernel.fake_kernel import FakeKernel

A, B = Peer("192.0.2.1", "10.1.0.1"), Peer("192.0.2.2", "10.2.0.1")
GCM = TRANSFORMS_BY_LABEL["aes128gcm16"]
SITE = TrafficSelector.from_network("10.1.0.0/16")  # the gateway's side (local)
CLIENT = TrafficSelector.from_network("10.2.0.1/32")  # the peer's side (remote)
WEB = TrafficSelector.parse("10.1.0.5/32[tcp/443]")
DB = TrafficSelector.parse("10.1.0.6/32[tcp/5432]")
IN_DIRS = (XfrmPolicyDir.IN, XfrmPolicyDir.FWD)


def ts(text: str) -> TrafficSelector:
    return TrafficSelector.parse(text)


class RecordingKernel(FakeKernel):
    """Evaluates flows after every change, as the kernel's inbound policy check would."""

    def __init__(self) -> None:
        super().__init__()
        self.watched: list[tuple[str, str, int, int]] = []
        self.verdicts: list[list[str]] = []

    def add_policy(self, policy: XfrmPolicy) -> None:
        super().add_policy(policy)
        self._record()

    def update_policy(self, policy: XfrmPolicy) -> None:
        super().update_policy(policy)
        self._record()

    def delete_policy(self, key: XfrmPolicyKey) -> None:
        super().delete_policy(key)
        self._record()

    def _record(self) -> None:
        self.verdicts.append([verdict(self, XfrmPolicyDir.FWD, *flow) for flow in self.watched])


def verdict(kernel: FakeKernel, direction: int, src: str, dst: str, proto: int, dport: int) -> str:
    """What the kernel's policy check does with a decapsulated packet of our SA: the matching
    policy with the best (lowest) priority decides."""
    matching = [
        p
        for p in kernel.policies.values()
        if p.direction == direction and selector_matches(p.selector, src, dst, proto, 40000, dport)
    ]
    if not matching:
        return "no policy"
    best = min(matching, key=lambda p: p.priority)
    if best.action == XfrmPolicyAction.BLOCK:
        return "block"
    return "allow" if best.templates else "bypass"


def gateway_policies(record: ChildSaRecord, *, mode: Mode = Mode.TUNNEL) -> list[SpdPolicy]:
    out, inbound = protect_policies(record, local_ts=SITE, remote_ts=CLIENT)
    policies = [out, inbound]
    if mode == Mode.TUNNEL:
        policies.append(dataclasses.replace(inbound, id=f"{record.id}-fwd", direction=PolicyDirection.FWD))
    return policies


@pytest.fixture
async def gateway() -> Any:
    kernel = RecordingKernel()
    backend = KernelXfrmBackend(client=kernel, wall_clock=lambda: 1000.0, xfrm_stat=dict)  # type: ignore[arg-type]
    await backend.start()
    record, _ = child_sa_pair("c", A, B, GCM)
    await backend.install_child_sa(record, gateway_policies(record))
    yield kernel, backend, record
    await backend.stop()


def inbound_entries(kernel: FakeKernel) -> dict[int, list[XfrmPolicy]]:
    out: dict[int, list[XfrmPolicy]] = {d: [] for d in IN_DIRS}
    for p in kernel.policies.values():
        if p.direction in IN_DIRS:
            out[p.direction].append(p)
    return out


async def test_a_filter_becomes_allow_entries_for_the_grant_and_a_block_over_the_rest(gateway: Any) -> None:
    kernel, backend, record = gateway
    negotiated = dict(kernel.policies)
    outbound = [p for p in negotiated.values() if p.direction == XfrmPolicyDir.OUT]
    await backend.set_identity_filter(record.id, [WEB, ts("192.168.0.0/16")])  # the second is outside the SA
    for direction, entries in inbound_entries(kernel).items():
        (allow,) = [p for p in entries if p.action == XfrmPolicyAction.ALLOW]
        (block,) = [p for p in entries if p.action == XfrmPolicyAction.BLOCK]
        full = next(p for p in negotiated.values() if p.direction == direction)
        assert (allow.selector.saddr, allow.selector.prefixlen_s) == ("10.2.0.1", 32)
        assert (allow.selector.daddr, allow.selector.prefixlen_d) == ("10.1.0.5", 32)
        assert (allow.selector.proto, allow.selector.dport, allow.selector.dport_mask) == (6, 443, 0xFFFF)
        assert allow.templates == full.templates and allow.priority == full.priority - 1
        assert block.key == full.key and block.priority == full.priority and block.templates == ()
    assert [p for p in kernel.policies.values() if p.direction == XfrmPolicyDir.OUT] == outbound
    for direction in IN_DIRS:
        assert verdict(kernel, direction, "10.2.0.1", "10.1.0.5", 6, 443) == "allow"
        assert verdict(kernel, direction, "10.2.0.1", "10.1.0.5", 6, 80) == "block"
        assert verdict(kernel, direction, "10.2.0.1", "10.1.0.6", 6, 443) == "block"
    assert backend.identity_filter(record.id) == (WEB, ts("192.168.0.0/16"))
    assert backend.status().details["identity_filters"] == "1"


async def test_a_change_adds_before_it_removes_so_a_still_granted_flow_never_sees_a_gap(gateway: Any) -> None:
    kernel, backend, record = gateway
    kernel.watched = [("10.2.0.1", "10.1.0.5", 6, 443), ("10.2.0.1", "10.1.0.6", 6, 5432)]
    await backend.set_identity_filter(record.id, [WEB])
    assert kernel.verdicts[-1] == ["allow", "block"]
    kernel.verdicts.clear()
    # the web grant is re-expressed (a wider selector, new kernel key) and the db grant added
    await backend.set_identity_filter(record.id, [ts("10.1.0.4/30[tcp/443]"), DB])
    assert kernel.verdicts and all(v[0] == "allow" for v in kernel.verdicts)
    assert kernel.verdicts[-1] == ["allow", "allow"]
    kernel.verdicts.clear()
    await backend.set_identity_filter(record.id, [DB])  # revocation of the web grant
    assert kernel.verdicts[-1] == ["block", "allow"]
    assert all(v[1] == "allow" for v in kernel.verdicts)


async def test_none_restores_the_negotiated_entries_and_an_empty_filter_lets_nothing_through(gateway: Any) -> None:
    kernel, backend, record = gateway
    negotiated = dict(kernel.policies)
    kernel.watched = [("10.2.0.1", "10.1.0.5", 6, 443)]
    await backend.set_identity_filter(record.id, [])
    for direction, entries in inbound_entries(kernel).items():
        assert [p.action for p in entries] == [XfrmPolicyAction.BLOCK]
        assert verdict(kernel, direction, "10.2.0.1", "10.1.0.9", 17, 53) == "block"
    await backend.set_identity_filter(record.id, [WEB])
    kernel.verdicts.clear()
    await backend.set_identity_filter(record.id, None)
    assert kernel.policies == negotiated
    assert all(v == ["allow"] for v in kernel.verdicts)  # the block went back to PROTECT before the allow went
    assert backend.identity_filter(record.id) is None
    changes = kernel.changes
    await backend.set_identity_filter(record.id, None)
    assert kernel.changes == changes


async def test_a_grant_covering_the_whole_selector_is_the_negotiated_entry(gateway: Any) -> None:
    kernel, backend, record = gateway
    negotiated = dict(kernel.policies)
    await backend.set_identity_filter(record.id, [ts("10.0.0.0/8")])
    assert kernel.policies == negotiated


async def test_policies_installed_after_the_filter_are_narrowed_and_deleting_the_child_removes_all(
    gateway: Any,
) -> None:
    kernel, backend, record = gateway
    other, _ = child_sa_pair("d", A, B, GCM, spi_ab=0xA0000009, spi_ba=0xB0000009)
    await backend.install_child_sa(other)
    await backend.set_identity_filter(other.id, [WEB])
    policies = [dataclasses.replace(p, remote_ts=ts("10.2.0.2/32"), id=p.id + "-2") for p in gateway_policies(other)]
    for policy in policies:
        await backend.install_policy(policy)
    assert verdict(kernel, XfrmPolicyDir.FWD, "10.2.0.2", "10.1.0.5", 6, 443) == "allow"
    assert verdict(kernel, XfrmPolicyDir.FWD, "10.2.0.2", "10.1.0.6", 6, 443) == "block"
    assert verdict(kernel, XfrmPolicyDir.FWD, "10.2.0.1", "10.1.0.6", 6, 443) == "allow"  # the unfiltered SA
    for policy in policies:
        await backend.delete_policy(policy.id)
    await backend.delete_child_sa(other.id)
    await backend.delete_child_sa(record.id)
    assert kernel.policies == {} and kernel.sas == {}
    assert backend.status().details["identity_filters"] == "0"


async def test_transport_mode_narrows_the_in_entry_with_a_block_guard() -> None:
    kernel = FakeKernel()
    backend = KernelXfrmBackend(client=kernel, xfrm_stat=dict)  # type: ignore[arg-type]
    await backend.start()
    record, _ = child_sa_pair("t", A, B, GCM, mode=Mode.TRANSPORT)
    out, inbound = protect_policies(record)
    await backend.install_child_sa(record, [out, inbound])
    await backend.set_identity_filter(record.id, [ts("192.0.2.1/32[udp/53]")])
    # a decapsulated transport-mode packet that matched no policy would pass: the BLOCK stops it
    assert verdict(kernel, XfrmPolicyDir.IN, "192.0.2.2", "192.0.2.1", 17, 53) == "allow"
    assert verdict(kernel, XfrmPolicyDir.IN, "192.0.2.2", "192.0.2.1", 6, 22) == "block"
    await backend.stop()


@pytest.mark.parametrize(
    "bad",
    [
        [WEB, TrafficSelector(SITE.start_addr, SITE.end_addr, 6, 65535, 0)],  # OPAQUE ports
        [WEB, ts("10.1.0.1-10.1.255.254[tcp/1-65534]")],  # far more kernel selectors than allowed
        [WEB, "10.1.0.5/32"],  # not a selector
    ],
    ids=["opaque", "too-many", "not-a-selector"],
)
async def test_a_filter_that_cannot_be_expressed_is_refused_and_changes_nothing(gateway: Any, bad: Any) -> None:
    kernel, backend, record = gateway
    await backend.set_identity_filter(record.id, [DB])
    before, changes = dict(kernel.policies), kernel.changes
    with pytest.raises(InvalidArgument):
        await backend.set_identity_filter(record.id, bad)
    assert kernel.policies == before and kernel.changes == changes
    assert backend.identity_filter(record.id) == (DB,)
    with pytest.raises(NotFound):
        await backend.set_identity_filter("nobody", [WEB])
    errors = await backend.set_identity_filters({record.id: bad, "nobody": [WEB]})
    assert set(errors) == {record.id, "nobody"}
    assert kernel.policies == before


@pytest.mark.parametrize("failing_change", [1, 2, 3, 4, 5, 6])
async def test_a_kernel_failure_midway_puts_the_previous_filter_back(gateway: Any, failing_change: int) -> None:
    kernel, backend, record = gateway
    await backend.set_identity_filter(record.id, [DB])
    before = dict(kernel.policies)
    kernel.fail_at = kernel.changes + failing_change  # the change takes 6: 2 adds, 1 delete, twice
    with pytest.raises(Unsupported):
        await backend.set_identity_filter(record.id, [WEB, ts("10.1.0.7/32")])
    assert kernel.policies == before
    assert backend.identity_filter(record.id) == (DB,)
    kernel.fail_at = None
    await backend.set_identity_filter(record.id, [WEB])
    assert verdict(kernel, XfrmPolicyDir.IN, "10.2.0.1", "10.1.0.5", 6, 443) == "allow"
    assert verdict(kernel, XfrmPolicyDir.IN, "10.2.0.1", "10.1.0.6", 6, 5432) == "block"


async def test_a_rekey_carries_the_filter_over() -> None:
    kernel = FakeKernel()
    backend = KernelXfrmBackend(client=kernel, xfrm_stat=dict)  # type: ignore[arg-type]
    await backend.start()
    record, _ = child_sa_pair("c", A, B, GCM)
    await backend.install_child_sa(record)  # the reconciler's way: policies on their own
    for policy in gateway_policies(record):
        await backend.install_policy(policy)
    await backend.set_identity_filter(record.id, [WEB])
    rekeyed, _ = child_sa_pair("c2", A, B, GCM, spi_ab=0xA0000002, spi_ba=0xB0000002)
    rekeyed = dataclasses.replace(rekeyed, rekey_of=record.id)
    await backend.install_child_sa(rekeyed)
    for policy in gateway_policies(record):  # keyexchange points the policies at the new Child SA
        await backend.install_policy(dataclasses.replace(policy, child_sa=rekeyed.id))
    await backend.delete_child_sa(record.id)
    assert verdict(kernel, XfrmPolicyDir.FWD, "10.2.0.1", "10.1.0.6", 6, 5432) == "block"
    assert backend.identity_filter(rekeyed.id) == (WEB,)
    assert verdict(kernel, XfrmPolicyDir.FWD, "10.2.0.1", "10.1.0.5", 6, 443) == "allow"
    await backend.stop()


async def test_drops_are_the_namespace_counters_since_start() -> None:
    counters = {"XfrmInPolBlock": 7, "XfrmInNoPols": 2, "XfrmInTmplMismatch": 0, "XfrmOutPolBlock": 9}
    backend = KernelXfrmBackend(client=FakeKernel(), xfrm_stat=lambda: dict(counters))  # type: ignore[arg-type]
    await backend.start()
    counters["XfrmInPolBlock"] += 5
    counters["XfrmOutPolBlock"] += 1
    drops = await backend.identity_filter_drops()
    assert drops.unattributed == {"XfrmInPolBlock": 5, "XfrmInNoPols": 0, "XfrmInTmplMismatch": 0}
    assert drops.denied == {} and drops.samples == []
    await backend.stop()


class Node:
    def __init__(self, tmp_path: Path) -> None:
        self.kernel = FakeKernel()
        self.journal = tmp_path / "kernel.json"

    async def start_dataplane(self) -> KernelXfrmBackend:
        backend = KernelXfrmBackend(
            client=self.kernel,  # type: ignore[arg-type]
            keep_on_stop=True,
            journal=KernelStateJournal(self.journal),
            xfrm_stat=dict,
        )
        await backend.start()
        return backend


async def test_a_restarted_dataplane_adopts_the_filter_entries_and_sweeps_them_when_unfiltered(
    tmp_path: Path,
) -> None:
    node = Node(tmp_path)
    record, _ = child_sa_pair("c", A, B, GCM)
    policies = gateway_policies(record)
    first = await node.start_dataplane()
    await first.install_child_sa(record)
    await first.set_identity_filter(record.id, [WEB])  # before the policies, as the reconciler does
    for policy in policies:
        await first.install_policy(policy)
    filtered = dict(node.kernel.policies)
    await first.stop()

    second = await node.start_dataplane()  # same filter: everything adopted, no netlink change
    changes = node.kernel.changes
    await second.install_child_sa(record)
    await second.set_identity_filter(record.id, [WEB])
    for policy in policies:
        await second.install_policy(policy)
    await second.finish_initial_sync()
    assert node.kernel.changes == changes and node.kernel.policies == filtered
    assert second.adopted["policies"] == len(filtered) and second.swept["policies"] == 0
    await second.stop()

    third = await node.start_dataplane()  # the identity is no longer governed: no filter
    await third.install_child_sa(record)
    for policy in policies:
        await third.install_policy(policy)
    await third.finish_initial_sync()
    assert sorted(p.action for p in node.kernel.policies.values()) == [XfrmPolicyAction.ALLOW] * 3
    # the journal's filter held the entries narrowed until the first reconcile was done
    assert third.adopted["policies"] == len(filtered) and third.swept["policies"] == 0
    assert verdict(node.kernel, XfrmPolicyDir.FWD, "10.2.0.1", "10.1.0.6", 6, 5432) == "allow"
    await third.stop()


async def test_a_successor_keeps_the_entries_narrowed_before_the_enforcer_is_back(tmp_path: Path) -> None:
    """At start-up the policies may come before the filter: the journal's filter narrows them,
    so a restart never widens a governed Child SA, not even for a moment."""
    node = Node(tmp_path)
    record, _ = child_sa_pair("c", A, B, GCM)
    policies = gateway_policies(record)
    first = await node.start_dataplane()
    await first.install_child_sa(record)
    for policy in policies:
        await first.install_policy(policy)
    await first.set_identity_filter(record.id, [WEB])
    filtered = dict(node.kernel.policies)
    await first.stop()

    second = await node.start_dataplane()
    changes = node.kernel.changes
    await second.install_child_sa(record)
    for policy in policies:  # before the enforcer: the journal's filter applies
        await second.install_policy(policy)
    assert node.kernel.changes == changes and node.kernel.policies == filtered
    await second.set_identity_filter(record.id, [DB])  # the enforcer, with today's grant
    await second.finish_initial_sync()
    assert verdict(node.kernel, XfrmPolicyDir.FWD, "10.2.0.1", "10.1.0.5", 6, 443) == "block"
    assert verdict(node.kernel, XfrmPolicyDir.FWD, "10.2.0.1", "10.1.0.6", 6, 5432) == "allow"
    await second.stop()

    third = await node.start_dataplane()
    await third.install_child_sa(record)
    for policy in policies:
        await third.install_policy(policy)
    assert verdict(node.kernel, XfrmPolicyDir.FWD, "10.2.0.1", "10.1.0.5", 6, 443) == "block"  # still narrowed
    await third.finish_initial_sync()  # no filter came: the Child SA is not governed any more
    assert verdict(node.kernel, XfrmPolicyDir.FWD, "10.2.0.1", "10.1.0.5", 6, 443) == "allow"
    assert sorted(p.action for p in node.kernel.policies.values()) == [XfrmPolicyAction.ALLOW] * 3
    assert third.identity_filter(record.id) is None
    await third.stop()


def test_the_journal_keeps_filters_and_reads_journals_written_before_them(tmp_path: Path) -> None:
    journal = KernelStateJournal(tmp_path / "kernel.json")
    journal.save([], [], {"c-a": (WEB, ts("fd00::/64[udp/53]")), "d-a": ()})
    assert journal.load().filters == {"c-a": (WEB, ts("fd00::/64[udp/53]")), "d-a": ()}
    (tmp_path / "kernel.json").write_text('{"version": 1, "sas": [], "policies": []}')
    assert journal.load().filters == {}


async def test_ipv6_entries_are_narrowed_and_a_grant_of_the_other_family_grants_nothing() -> None:
    kernel = FakeKernel()
    backend = KernelXfrmBackend(client=kernel, xfrm_stat=dict)  # type: ignore[arg-type]
    await backend.start()
    record, _ = child_sa_pair("v6", A, B, GCM)
    await backend.install_child_sa(record)
    _, inbound = protect_policies(record, local_ts=ts("fd01::/64"), remote_ts=ts("fd02::1/128"))
    await backend.install_policy(inbound)
    await backend.set_identity_filter(record.id, [ts("fd01::5/128[tcp/443]"), WEB])
    assert verdict(kernel, XfrmPolicyDir.IN, "fd02::1", "fd01::5", 6, 443) == "allow"
    assert verdict(kernel, XfrmPolicyDir.IN, "fd02::1", "fd01::6", 6, 443) == "block"
    await backend.set_identity_filter(record.id, [WEB])  # IPv4 only: nothing in this IPv6 entry
    assert verdict(kernel, XfrmPolicyDir.IN, "fd02::1", "fd01::5", 6, 443) == "block"
    await backend.stop()
