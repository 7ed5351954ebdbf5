"""The dataplane's policy enforcer against a real (embedded) store and a fake filtering backend:
filters on install, on every policy change (live SAs), none for ungoverned peers, drops -> events."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from esplanade.dataplane.backend import DataplaneError, FilterDrops, InvalidArgument
from esplanade.dataplane.kernel.backend import KernelXfrmBackend
from esplanade.dataplane.kernel.xfrm_messages import XfrmPolicyDir
from esplanade.dataplane.policy_enforcement import PolicyEnforcer
from esplanade.ipsec.sa import ChildSaRecord
from esplanade.ipsec.selectors import TrafficSelector
from esplanade.ipsec.spd import PolicyDirection
from esplanade.policy.access_view import AccessTable, AccessView, ike_id_from_peer_text
from esplanade.policy.compiler import PolicyCompiler
from esplanade.policy.decision_events import DecisionEvents
from esplanade.policy.decision_log import DecisionKind
from esplanade.policy.decode import encode_document, object_to_document
from esplanade.policy.policy_file import load_policy_yaml
from esplanade.store import schema
from esplanade.store.base import KeyValue, Store
from esplanade.store.embedded import EmbeddedStore
from tests.conditions import async_wait_until, holds
from tests.dataplane.child_sa_records import record
from tests.dataplane.kernel.child_sa_builders import TRANSFORMS_BY_LABEL, Peer, child_sa_pair, protect_policies
from tests.dataplane.kernel.fake_kernel import FakeKernel
from tests.dataplane.kernel.test_kernel_identity_filter import verdict

POLICY = """
version: 1
sites:
  - {id: hq, networks: [10.50.0.0/16]}
groups:
  - {id: eng}
  - {id: sales}
identities:
  - {id: alice, ike_ids: ["email:alice@corp.test"], groups: [eng]}
  - {id: bob, ike_ids: ["fqdn:bob.corp.test"], groups: [sales]}
resources:
  - {id: web, destination: 10.50.1.10, protocol: tcp, ports: [443], site: hq}
  - {id: crm, destination: 10.50.2.20, protocol: tcp, ports: [8080], site: hq}
rules:
  - {id: eng-web, groups: [eng], resources: [web]}
  - {id: sales-crm, groups: [sales], resources: [crm]}
"""


class FilteringBackend:
    def __init__(self) -> None:
        self.filters: dict[str, list[str] | None] = {}
        self.calls = 0
        self.batches = 0
        self.denied: dict[str, int] = {}
        self.samples: list[tuple[str, bytes]] = []
        self.outside: dict[str, int] = {}
        self.outside_samples: list[tuple[str, bytes]] = []

    async def set_identity_filter(self, child_sa_id: str, selectors: list[TrafficSelector] | None) -> None:
        self.calls += 1
        self.filters[child_sa_id] = None if selectors is None else sorted(str(s) for s in selectors)

    async def set_identity_filters(self, filters: dict[str, list[TrafficSelector] | None]) -> dict[str, str]:
        """The batch form (the userspace backend's): one call for every SA a change touches."""
        self.batches += 1
        for child_sa_id, selectors in filters.items():
            await self.set_identity_filter(child_sa_id, selectors)
        return {}

    async def identity_filter_drops(self) -> FilterDrops:
        samples, self.samples = self.samples, []
        outside_samples, self.outside_samples = self.outside_samples, []
        return FilterDrops(dict(self.denied), dict(self.outside), samples, outside_samples)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with EmbeddedStore(tmp_path / "state.db") as opened:
        yield opened


async def write_policy(store: Store, text: str) -> None:
    """What the policy service leaves in the store: objects and compiled documents."""
    model = load_policy_yaml(text)
    compiler = PolicyCompiler()
    compiler.load(model)
    old, _ = await store.range(schema.prefix("policy"))
    wanted: dict[str, bytes] = {}
    for identity in model.identities.values():
        wanted[schema.policy_object("identities", identity.id)] = encode_document(object_to_document(identity))
    for identity, doc in compiler.documents().items():
        wanted[schema.compiled_policy(identity)] = encode_document(doc)
    for kv in old:
        if kv.key not in wanted:
            await store.delete(kv.key)
    for key, value in wanted.items():
        await store.put(key, value)


@contextlib.asynccontextmanager
async def enforcing(
    store: Store, backend: Any, decisions: DecisionEvents | None = None, policy: str = POLICY
) -> AsyncIterator[tuple[PolicyEnforcer, AccessView]]:
    """`policy` written to the store, an access view following it (loaded), and an enforcer on
    `backend` over that view."""
    await write_policy(store, policy)
    view = AccessView(store)
    enforcer = PolicyEnforcer(backend, view, decisions or DecisionEvents("test"))
    task = asyncio.create_task(view.run())
    try:
        await asyncio.wait_for(view.ready.wait(), 5)
        yield enforcer, view
    finally:
        task.cancel()


def peer(child_id: str, spi: int, identity: str) -> ChildSaRecord:
    return dataclasses.replace(record(child_id, spi), identity=identity)


async def test_filters_follow_the_policy_on_live_sas(store: Store) -> None:
    backend = FilteringBackend()
    async with enforcing(store, backend) as (enforcer, _):
        await enforcer.on_installed(peer("a1", 0x1000, "alice@corp.test"))
        await enforcer.on_installed(peer("a2", 0x1100, "alice@corp.test"))  # a second device or rekey
        await enforcer.on_installed(peer("b1", 0x2000, "bob.corp.test"))
        await enforcer.on_installed(peer("s1", 0x3000, "site-b.corp.test"))  # not a policy identity
        web, crm = ["10.50.1.10/32[tcp/443]"], ["10.50.2.20/32[tcp/8080]"]
        assert backend.filters == {"a1": web, "a2": web, "b1": crm}

        # eng loses its rule: alice's live SAs are cut to nothing in one batch; bob's is not touched
        calls, batches = backend.calls, backend.batches
        await write_policy(store, POLICY.replace("  - {id: eng-web, groups: [eng], resources: [web]}\n", ""))
        await async_wait_until(
            holds(lambda: backend.filters["a1"] == backend.filters["a2"] == []), timeout=5, what="alice cut"
        )
        assert backend.filters["b1"] == crm
        assert (backend.calls, backend.batches) == (calls + 2, batches + 1)

        # eng is granted web and crm: the live SA widens again
        await write_policy(store, POLICY.replace("resources: [web]}", "resources: [web, crm]}"))
        await async_wait_until(
            holds(lambda: backend.filters["a1"] == ["10.50.1.10/32[tcp/443]", "10.50.2.20/32[tcp/8080]"]),
            timeout=5,
            what="alice's filter widened",
        )
        # alice's binding goes: her live SA stays governed and carries nothing (not its selectors)
        await write_policy(store, POLICY.replace('ike_ids: ["email:alice@corp.test"], ', ""))
        await async_wait_until(holds(lambda: backend.filters["a1"] == []), timeout=5, what="alice unbound")
        assert enforcer.applied["a1"].selectors == ()
        await enforcer.on_removed("a1")
        assert "a1" not in enforcer.applied


async def test_deleting_an_identity_cuts_its_live_sas_instead_of_lifting_their_filter(store: Store) -> None:
    """Fail closed on revocation: a live SA of a deleted identity gets the empty filter. Lifting
    its filter would hand it everything its negotiated selectors allow (the whole site network
    with `access_narrowing: networks`, or 0.0.0.0/0 for a connection that does not narrow)."""
    backend = FilteringBackend()
    async with enforcing(store, backend) as (enforcer, view):
        await enforcer.on_installed(peer("a1", 0x1000, "alice@corp.test"))
        assert backend.filters == {"a1": ["10.50.1.10/32[tcp/443]"]}
        without_alice = POLICY.replace('  - {id: alice, ike_ids: ["email:alice@corp.test"], groups: [eng]}\n', "")
        assert without_alice != POLICY
        await write_policy(store, without_alice)
        await async_wait_until(holds(lambda: view.lookup("alice@corp.test") is None), timeout=5, what="deleted")
        await async_wait_until(holds(lambda: backend.filters["a1"] is not None), timeout=5, what="reapplied")
        assert backend.filters["a1"] == []
        # a new SA of that peer (a fresh IKE SA) is ungoverned again: by design, no filter
        await enforcer.on_installed(peer("a2", 0x1100, "alice@corp.test"))
        assert "a2" not in backend.filters


def identity_kv(identity: str, ike_ids: list[str], revision: int, **extra: object) -> KeyValue:
    doc = {"id": identity, "ike_ids": ike_ids, "groups": [], **extra}
    return KeyValue(schema.policy_object("identities", identity), json.dumps(doc).encode(), 1, revision, 1)


@pytest.mark.parametrize("order", ["bob-first", "alice-first"])
def test_an_ike_id_moved_between_identities_stays_bound_whatever_the_event_order(order: str) -> None:
    """alice's IKE id moves to bob in one transaction: one watch batch of two puts, in either
    order. After it the IKE id binds bob: left unbound, its peer would be ungoverned."""
    table = AccessTable()
    table.load([identity_kv("alice", ["email:x@corp.test"], 1), identity_kv("bob", [], 1)])
    assert table.lookup("x@corp.test") is not None
    puts = [identity_kv("alice", [], 2), identity_kv("bob", ["email:x@corp.test"], 2)]
    changed: set[str] = set()
    for kv in puts if order == "alice-first" else puts[::-1]:
        changed |= table.put(kv)
    access = table.lookup("x@corp.test")
    assert access is not None and access.identity == "bob"
    assert "bob" in changed
    table.put(identity_kv("bob", [], 3))
    assert table.lookup("x@corp.test") is None  # nobody names it any more: ungoverned


def test_an_undecodable_identity_document_keeps_its_peer_bound_to_nothing() -> None:
    """A document that does not decode (by hand, or a newer version's) must not make its peer
    ungoverned: its IKE ids stay bound, to an identity that is granted nothing."""
    table = AccessTable()
    compiled = {"format": 1, "identity": "alice", "parts": [{"rules": ["r"], "selectors": ["10.50.1.10/32[tcp/443]"]}]}
    table.load(
        [
            identity_kv("alice", ["email:alice@corp.test"], 1),
            KeyValue(schema.compiled_policy("alice"), json.dumps(compiled).encode(), 1, 1, 1),
        ]
    )
    before = table.lookup("alice@corp.test")
    assert before is not None and not before.grants_nothing
    assert table.put(identity_kv("alice", ["email:alice@corp.test"], 2, colour="blue")) == {"alice"}
    after = table.lookup("alice@corp.test")
    assert after is not None and after.identity == "alice" and after.grants_nothing
    table.put(identity_kv("alice", ["email:alice@corp.test"], 3))  # readable again: its grant is back
    again = table.lookup("alice@corp.test")
    assert again is not None and not again.grants_nothing
    # unreadable from the first sight: still bound by the IKE ids it names
    fresh = AccessTable()
    fresh.load(
        [
            KeyValue(
                schema.policy_object("identities", "eve"),
                b'{"id": "eve", "ike_ids": ["fqdn:eve.test"], "x": 1}',
                1,
                1,
                1,
            )
        ]
    )
    eve = fresh.lookup("eve.test")
    assert eve is not None and eve.grants_nothing


class RefusingBackend(FilteringBackend):
    """Refuses every non-empty filter while `refusing` (as the kernel backend refuses one it
    cannot express, or a worker that errs)."""

    def __init__(self) -> None:
        super().__init__()
        self.refusing = True

    async def set_identity_filter(self, child_sa_id: str, selectors: list[TrafficSelector] | None) -> None:
        if self.refusing and selectors:
            raise InvalidArgument("the backend cannot express this filter")
        await super().set_identity_filter(child_sa_id, selectors)


async def test_a_refused_filter_closes_the_sa_instead_of_leaving_it_open(store: Store) -> None:
    """Deny by default: a governed SA whose filter the backend refuses carries nothing (the empty
    filter), not its negotiated selectors; the right filter applies on the next change."""
    backend = RefusingBackend()
    async with enforcing(store, backend) as (enforcer, _):
        await enforcer.on_installed(peer("a1", 0x1000, "alice@corp.test"))
        assert backend.filters == {"a1": []}
        assert enforcer.applied["a1"].selectors == () and enforcer.errors == 1

        backend.refusing = False
        await write_policy(store, POLICY.replace("resources: [web]}", "resources: [web, crm]}"))
        await async_wait_until(
            holds(lambda: backend.filters["a1"] == ["10.50.1.10/32[tcp/443]", "10.50.2.20/32[tcp/8080]"]),
            timeout=5,
            what="the filter applied once the backend takes it",
        )


async def test_a_refused_filter_is_retried_until_it_applies_without_a_policy_change(store: Store) -> None:
    """A passing fault (a worker restarting) must not leave the SA closed until the next policy
    change: the enforcer tries the refused filter again (every `retry_seconds`)."""
    backend = RefusingBackend()
    async with enforcing(store, backend) as (enforcer, _):
        await enforcer.on_installed(peer("a1", 0x1000, "alice@corp.test"))
        await enforcer.on_installed(peer("b1", 0x2000, "bob.corp.test"))
        assert backend.filters == {"a1": [], "b1": []} and enforcer.refused == {"a1", "b1"}
        await enforcer.retry_refused()  # still refusing: still closed, still waiting
        assert backend.filters == {"a1": [], "b1": []} and enforcer.refused == {"a1", "b1"}
        await enforcer.on_removed("b1")
        backend.refusing = False
        await enforcer.retry_refused()
        assert backend.filters["a1"] == ["10.50.1.10/32[tcp/443]"]
        assert enforcer.applied["a1"].selectors == ("10.50.1.10/32[tcp/443]",)
        assert enforcer.refused == set()


async def test_the_retry_loop_applies_a_refused_filter(store: Store) -> None:
    backend = RefusingBackend()
    async with enforcing(store, backend) as (enforcer, _):
        enforcer.retry_seconds = 0.05
        await enforcer.on_installed(peer("a1", 0x1000, "alice@corp.test"))
        running = asyncio.create_task(enforcer.run())
        try:
            backend.refusing = False
            await async_wait_until(
                holds(lambda: backend.filters["a1"] == ["10.50.1.10/32[tcp/443]"]), timeout=5, what="retried"
            )
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)


class BatchFailingBackend(FilteringBackend):
    """Its batch call fails as a whole; one by one, only the SA `bad` is refused."""

    def __init__(self, bad: str) -> None:
        super().__init__()
        self.bad = bad

    async def set_identity_filters(self, filters: dict[str, list[TrafficSelector] | None]) -> dict[str, str]:
        raise DataplaneError("the worker channel broke mid-batch")

    async def set_identity_filter(self, child_sa_id: str, selectors: list[TrafficSelector] | None) -> None:
        if child_sa_id == self.bad and selectors:
            raise InvalidArgument("the backend cannot express this filter")
        await super().set_identity_filter(child_sa_id, selectors)


async def test_a_batch_that_fails_as_a_whole_closes_only_the_sa_that_is_refused(store: Store) -> None:
    backend = BatchFailingBackend(bad="a2")
    async with enforcing(store, backend) as (enforcer, _):
        for child, spi in (("a1", 0x1000), ("a2", 0x1100), ("a3", 0x1200)):
            await enforcer.on_installed(peer(child, spi, "alice@corp.test"))
        web = ["10.50.1.10/32[tcp/443]"]
        assert backend.filters == {"a1": web, "a2": [], "a3": web}
        await write_policy(store, POLICY.replace("resources: [web]}", "resources: [web, crm]}"))
        both = ["10.50.1.10/32[tcp/443]", "10.50.2.20/32[tcp/8080]"]
        await async_wait_until(
            holds(lambda: backend.filters["a1"] == backend.filters["a3"] == both), timeout=5, what="widened"
        )
        assert backend.filters["a2"] == [] and enforcer.refused == {"a2"}


class InstallFilteringBackend(FilteringBackend):
    """A backend that installs an SA with its filter (the userspace backend's `initial_filter`)."""

    def __init__(self) -> None:
        super().__init__()
        self.initial_filter: Callable[[ChildSaRecord], list[TrafficSelector] | None] | None = None


async def test_the_enforcer_hands_the_backend_each_sas_filter_for_its_install(store: Store) -> None:
    backend = InstallFilteringBackend()
    async with enforcing(store, backend) as (enforcer, _):
        assert backend.initial_filter == enforcer.initial_filter
        alice = backend.initial_filter(peer("a1", 0x1000, "alice@corp.test"))
        assert alice is not None and [str(s) for s in alice] == ["10.50.1.10/32[tcp/443]"]
        assert backend.initial_filter(peer("s1", 0x3000, "site-b.corp.test")) is None  # not governed


class BrokenBackend(FilteringBackend):
    """Refuses every filter, the empty one too (a worker that errs on every message)."""

    async def set_identity_filter(self, child_sa_id: str, selectors: list[TrafficSelector] | None) -> None:
        raise InvalidArgument("worker error")


async def test_an_sa_that_takes_no_filter_at_all_is_not_acknowledged(store: Store) -> None:
    """If neither its filter nor the empty one applies, a governed SA would carry everything its
    selectors allow: `on_installed` raises, so the reconciler does not ack it (keyexchange never
    answers the peer with it). An ungoverned SA is not concerned."""
    async with enforcing(store, BrokenBackend()) as (enforcer, _):
        with pytest.raises(DataplaneError, match="no identity filter applies"):
            await enforcer.on_installed(peer("a1", 0x1000, "alice@corp.test"))
        assert "a1" not in enforcer.applied
        await enforcer.on_installed(peer("s1", 0x3000, "site-b.corp.test"))


async def test_a_restarted_dataplane_keeps_a_record_governed_by_an_identity_that_went(store: Store) -> None:
    """A dataplane that never saw the SA governed (restarted, or taking over, after the identity
    was deleted) reads `governed_by` in the record: the SA gets the empty filter, at install and
    on the next policy change, not none (its IKE-narrowed selectors would stand)."""
    backend = FilteringBackend()
    alice_unbound = POLICY.replace('ike_ids: ["email:alice@corp.test"], ', "")
    async with enforcing(store, backend, policy=alice_unbound) as (enforcer, _):
        governed = dataclasses.replace(peer("a1", 0x1000, "alice@corp.test"), governed_by="alice")
        assert enforcer.initial_filter(governed) == []
        assert enforcer.initial_filter(peer("s1", 0x3000, "site-b.corp.test")) is None
        await enforcer.on_installed(governed)
        await enforcer.on_installed(peer("s1", 0x3000, "site-b.corp.test"))  # never governed: no filter
        assert backend.filters == {"a1": []}
        assert enforcer.applied["a1"].identity == "alice"


def test_the_record_carries_governed_by_and_reads_older_documents() -> None:
    governed = dataclasses.replace(peer("a1", 0x1000, "alice@corp.test"), governed_by="alice")
    document = governed.to_document(lambda field, value: value.hex())
    assert document["governed_by"] == "alice"
    assert ChildSaRecord.from_document(document, lambda field, value: bytes.fromhex(value)) == governed
    del document["governed_by"]  # written before the field existed: not known to be governed
    assert ChildSaRecord.from_document(document, lambda field, value: bytes.fromhex(value)).governed_by == ""


async def test_drops_become_aggregated_decision_events(store: Store) -> None:
    backend = FilteringBackend()
    decisions = DecisionEvents("test")
    async with enforcing(store, backend, decisions=decisions) as (enforcer, _):
        await enforcer.on_installed(peer("a1", 0x1000, "alice@corp.test"))
        header = ipv4_tcp("10.99.0.1", "10.50.1.10", 40000, 22)
        backend.samples = [("a1", header)]
        backend.denied = {"a1": 1000}
        await enforcer.poll_drops()
        records = list(decisions.recent)
        first = records[0]
        assert first.event is not None and first.event.kind == DecisionKind.DROP
        assert first.event.identity == "alice" and first.event.child_sa == "a1"
        doc = first.to_document()
        assert (doc["dst"], doc["dst_port"], doc["protocol"]) == ("10.50.1.10", 22, 6)
        # 999 unsampled drops: one immediate record, the rest counted, not 999 lines
        assert len(records) <= 2
        await enforcer.poll_drops()  # no growth: nothing new
        assert len(decisions.recent) == len(records)


async def test_drops_outside_the_selectors_are_logged_with_their_flow(store: Store) -> None:
    """policy_mismatch drops of a governed SA (a client sending what its narrowed selectors do not
    cover): the sampled header names the flow, the rest are counted per SA, rate-limited."""
    backend = FilteringBackend()
    decisions = DecisionEvents("test")
    async with enforcing(store, backend, decisions=decisions) as (enforcer, _):
        await enforcer.on_installed(peer("a1", 0x1000, "alice@corp.test"))
        backend.outside_samples = [("a1", ipv4_tcp("10.99.0.1", "10.50.2.20", 40000, 8080))]
        backend.outside = {"a1": 5000}  # a spoofed flood: counted, not 5000 lines
        await enforcer.poll_drops()
        records = list(decisions.recent)
        assert 1 <= len(records) <= 2
        doc = records[0].to_document()
        assert records[0].event is not None and records[0].event.identity == "alice"
        assert (doc["src"], doc["dst"], doc["protocol"], doc["dst_port"]) == ("10.99.0.1", "10.50.2.20", 6, 8080)
        assert "outside the Child SA's selectors" in records[0].message
        backend.outside = {"a1": 5001}
        backend.outside_samples = [("a1", ipv4_tcp("10.99.0.1", "10.50.2.21", 40000, 22))]
        await enforcer.poll_drops()
        later = [r.to_document() for r in list(decisions.recent)[len(records) :]]
        assert any(d.get("dst") == "10.50.2.21" and d.get("dst_port") == 22 for d in later), later


def ipv4_tcp(src: str, dst: str, sport: int, dport: int) -> bytes:
    ip = bytes([0x45, 0, 0, 40, 0, 1, 0, 0, 64, 6, 0, 0]) + socket.inet_aton(src) + socket.inet_aton(dst)
    return ip + sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + bytes(16)


def test_peer_identity_text_maps_to_the_policy_form() -> None:
    assert str(ike_id_from_peer_text("Alice@Corp.Test")) == "email:Alice@corp.test"
    assert str(ike_id_from_peer_text("GW.corp.test")) == "fqdn:gw.corp.test"
    assert str(ike_id_from_peer_text("192.0.2.7")) == "ip:192.0.2.7"
    assert str(ike_id_from_peer_text("C=CH, O=Example, CN=alice")) == "dn:C=CH, O=Example, CN=alice"
    assert ike_id_from_peer_text("%any") is None
    assert AccessTable().lookup("alice@corp.test") is None


async def test_the_kernel_backend_enforces_the_filters_with_xfrm_policies(store: Store) -> None:
    """The same enforcer on the kernel backend (fake kernel): the governed SA's FWD entry allows
    the grant only, a revocation blocks it; drops come back as unattributed namespace counts."""
    await write_policy(store, POLICY)
    view = AccessView(store)
    kernel = FakeKernel()
    counters = {"XfrmInPolBlock": 10, "XfrmInNoPols": 0, "XfrmInTmplMismatch": 0}
    backend = KernelXfrmBackend(client=kernel, xfrm_stat=lambda: dict(counters))  # type: ignore[arg-type]
    await backend.start()
    decisions = DecisionEvents("test")
    enforcer = PolicyEnforcer(backend, view, decisions)
    assert enforcer.backend is backend
    task = asyncio.create_task(view.run())
    try:
        await asyncio.wait_for(view.ready.wait(), 5)
        gateway, client = Peer("192.0.2.1", "10.50.0.1"), Peer("192.0.2.2", "10.99.0.1")
        alice, _ = child_sa_pair("alice", gateway, client, TRANSFORMS_BY_LABEL["aes128gcm16"])
        alice = dataclasses.replace(alice, identity="alice@corp.test")
        await backend.install_child_sa(alice)
        await enforcer.on_installed(alice)
        site, remote = TrafficSelector.parse("10.50.0.0/16"), TrafficSelector.parse("10.99.0.1/32")
        out, inbound = protect_policies(alice, local_ts=site, remote_ts=remote)
        for policy in (out, inbound, dataclasses.replace(inbound, id="fwd", direction=PolicyDirection.FWD)):
            await backend.install_policy(policy)
        assert verdict(kernel, XfrmPolicyDir.FWD, "10.99.0.1", "10.50.1.10", 6, 443) == "allow"
        assert verdict(kernel, XfrmPolicyDir.FWD, "10.99.0.1", "10.50.2.20", 6, 8080) == "block"

        await write_policy(store, POLICY.replace("  - {id: eng-web, groups: [eng], resources: [web]}\n", ""))
        await async_wait_until(
            holds(lambda: verdict(kernel, XfrmPolicyDir.FWD, "10.99.0.1", "10.50.1.10", 6, 443) == "block"),
            timeout=5,
            what="alice's web flow cut in the kernel",
        )
        counters["XfrmInPolBlock"] += 4
        await enforcer.poll_drops()
        assert enforcer.unattributed_drops == 4 and list(decisions.recent) == []  # no identity to name
    finally:
        task.cancel()
        await backend.stop()
