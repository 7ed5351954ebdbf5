"""The kernel backend's bookkeeping against a fake kernel: all-or-nothing, reqids, events.

`FakeKernel` (fake_kernel.py) stands in for `XfrmClient` (the netlink side is proven against real kernels
in test_kernel_backend_netns.py and in the VM). It refuses duplicates and missing
entries like the kernel does and can be told to fail the n-th change, which lets these
tests break an install or a delete at every step and check that nothing is left half done.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from esplanade.dataplane.backend import (
    AlreadyExists,
    DataplaneError,
    DataplaneEventKind,
    Unsupported,
)
from esplanade.dataplane.kernel.backend import KernelXfrmBackend
from esplanade.dataplane.kernel.xfrm_messages import XfrmMsgType, xfrm_user_acquire, xfrm_user_expire
from esplanade.dataplane.kernel.xfrm_sa import XfrmSa
from esplanade.dataplane.kernel.xfrm_selector import XfrmSelector
from esplanade.dataplane.kernel.xfrm_socket import NetlinkHeader, decode_message
from esplanade.ipsec.sa import ChildSaRecord, Lifetime
from tests.dataplane.kernel.child_sa_builders import TRANSFORMS_BY_LABEL, Peer, child_sa_pair, protect_policies
from tests.dataplane.kernel.fake_kernel import FakeKernel

A, B = Peer("192.0.2.1", "10.1.0.1"), Peer("192.0.2.2", "10.2.0.1")
GCM = TRANSFORMS_BY_LABEL["aes128gcm16"]


@pytest.fixture
async def kernel_and_backend() -> Any:
    kernel = FakeKernel()
    backend = KernelXfrmBackend(client=kernel, wall_clock=lambda: 1000.0)  # type: ignore[arg-type]
    await backend.start()
    yield kernel, backend
    await backend.stop()


def record_pair(name: str = "c", **options: Any) -> tuple[ChildSaRecord, ChildSaRecord]:
    return child_sa_pair(name, A, B, GCM, **options)


STEPS = ["inbound SA", "outbound SA", "policy out", "policy in"]


@pytest.mark.parametrize("failing_step", range(1, len(STEPS) + 1), ids=STEPS)
async def test_a_failing_step_undoes_every_step_before_it(kernel_and_backend: Any, failing_step: int) -> None:
    kernel, backend = kernel_and_backend
    record, _ = record_pair()
    kernel.fail_at = failing_step
    with pytest.raises(Unsupported, match="injected failure"):
        await backend.install_child_sa(record, protect_policies(record))
    assert kernel.sas == {} and kernel.policies == {}
    assert backend.status().details["child_sas"] == "0" and backend.status().details["policies"] == "0"
    kernel.fail_at = None
    await backend.install_child_sa(record, protect_policies(record))  # no stale bookkeeping in the way
    assert len(kernel.sas) == 2 and len(kernel.policies) == 2


@pytest.mark.parametrize("failing_step", [1, 2, 3, 4])
async def test_a_failing_delete_restores_what_it_removed(kernel_and_backend: Any, failing_step: int) -> None:
    kernel, backend = kernel_and_backend
    record, _ = record_pair()
    await backend.install_child_sa(record, protect_policies(record))
    before = (dict(kernel.sas), dict(kernel.policies))
    kernel.fail_at = kernel.changes + failing_step
    with pytest.raises(Unsupported):
        await backend.delete_child_sa(record.id)
    assert (kernel.sas, kernel.policies) == before
    kernel.fail_at = None
    await backend.delete_child_sa(record.id)
    assert kernel.sas == {} and kernel.policies == {}


async def test_a_failing_policy_replacement_restores_the_old_version(kernel_and_backend: Any) -> None:
    kernel, backend = kernel_and_backend
    record, _ = record_pair()
    policy = protect_policies(record)[0]
    await backend.install_policy(policy)
    before = dict(kernel.policies)
    kernel.fail_at = kernel.changes + 1
    with pytest.raises(Unsupported):
        await backend.install_policy(dataclasses.replace(policy, priority=1))
    assert kernel.policies == before
    kernel.fail_at = None
    await backend.install_policy(dataclasses.replace(policy, priority=1))
    assert [p.priority for p in kernel.policies.values()] == [1]


async def test_install_is_idempotent_and_refuses_other_content_under_the_same_id(kernel_and_backend: Any) -> None:
    kernel, backend = kernel_and_backend
    record, _ = record_pair()
    await backend.install_child_sa(record)
    changes = kernel.changes
    await backend.install_child_sa(record)
    assert kernel.changes == changes
    with pytest.raises(AlreadyExists, match="other content"):
        await backend.install_child_sa(dataclasses.replace(record, identity="someone else"))
    other, _ = record_pair("other", spi_ab=record.outbound.spi, spi_ba=0xC0000001)
    with pytest.raises(AlreadyExists, match="belongs to Child SA"):
        await backend.install_child_sa(other)


async def test_reqids_link_policies_and_child_sas(kernel_and_backend: Any) -> None:
    kernel, backend = kernel_and_backend
    first, _ = record_pair("first")
    # a policy that names a Child SA not installed yet reserves the reqid the SAs will use
    trap = dataclasses.replace(protect_policies(first)[0], id="trap")
    await backend.install_policy(trap)
    await backend.install_child_sa(first)
    (policy,) = kernel.policies.values()
    reqids = {sa.reqid for sa in kernel.sas.values()}
    assert reqids == {policy.templates[0].reqid}
    # a rekey inherits the reqid, so the same policies carry its traffic
    rekeyed, _ = record_pair("first", spi_ab=0xA0000002, spi_ba=0xB0000002)
    rekeyed = dataclasses.replace(rekeyed, id="first-rekeyed", rekey_of=first.id)
    await backend.install_child_sa(rekeyed)
    assert {sa.reqid for sa in kernel.sas.values()} == reqids
    # an unrelated Child SA gets a fresh reqid; an explicit one wins
    second, _ = record_pair("second", spi_ab=0xA0000003, spi_ba=0xB0000003)
    await backend.install_child_sa(second)
    explicit, _ = record_pair("third", spi_ab=0xA0000004, spi_ba=0xB0000004)
    explicit = dataclasses.replace(
        explicit,
        inbound=dataclasses.replace(explicit.inbound, reqid=900),
        outbound=dataclasses.replace(explicit.outbound, reqid=900),
    )
    await backend.install_child_sa(explicit)
    by_spi = {sa.spi: sa.reqid for sa in kernel.sas.values()}
    assert by_spi[0xA0000003] not in reqids and by_spi[0xA0000004] == 900


async def test_seconds_lifetimes_count_from_created_at(kernel_and_backend: Any) -> None:
    kernel, backend = kernel_and_backend
    record, _ = record_pair(lifetime=Lifetime(soft_seconds=300, hard_seconds=360), created_at=900.0)
    await backend.install_child_sa(record)  # the wall clock says 1000: 100 s have passed
    assert {sa.lifetime.hard_add_seconds for sa in kernel.sas.values()} == {260}
    assert {sa.lifetime.soft_add_seconds for sa in kernel.sas.values()} == {200}


def _decoded(msg: Any, msg_type: int) -> Any:
    msg["header"] = {"type": msg_type, "flags": 0, "sequence_number": 0, "pid": 0}
    msg.encode()
    data = bytes(msg.data)
    return decode_message(NetlinkHeader(len(data), msg_type, 0, 0, 0), data)


def expire_message(sa: XfrmSa, *, hard: bool, packets: int) -> Any:
    msg = xfrm_user_expire()
    for key, value in sa.to_message().items():
        if key not in ("header", "attrs") and not key.startswith("__"):
            msg[f"state_{key}"] = value
    msg["state_curlft_packets"] = packets
    msg["hard"] = int(hard)
    return _decoded(msg, XfrmMsgType.EXPIRE)


async def test_kernel_expires_become_events_and_a_hard_expired_sa_needs_no_delete(kernel_and_backend: Any) -> None:
    kernel, backend = kernel_and_backend
    record, _ = record_pair(lifetime=Lifetime(soft_packets=10, hard_packets=20))
    await backend.install_child_sa(record)
    events = backend.events()
    assert (await anext(events)).kind == DataplaneEventKind.INSTALLED
    outbound = next(sa for sa in kernel.sas.values() if sa.spi == record.outbound.spi)

    backend.process_kernel_message(XfrmMsgType.EXPIRE, expire_message(outbound, hard=False, packets=10))
    soft = await anext(events)
    assert (soft.kind, soft.child_sa, soft.spi) == (DataplaneEventKind.SOFT_EXPIRE, record.id, record.outbound.spi)
    assert soft.reason.startswith("soft packet lifetime")

    del kernel.sas[outbound.id]  # the kernel removes an SA when its hard lifetime runs out
    backend.process_kernel_message(XfrmMsgType.EXPIRE, expire_message(outbound, hard=True, packets=20))
    hard = await anext(events)
    assert (hard.kind, hard.child_sa) == (DataplaneEventKind.HARD_EXPIRE, record.id)
    await backend.delete_child_sa(record.id)
    assert kernel.sas == {}
    assert (await anext(events)).kind == DataplaneEventKind.DELETED


async def test_acquire_names_the_policy(kernel_and_backend: Any) -> None:
    kernel, backend = kernel_and_backend
    record, _ = record_pair()
    trap = dataclasses.replace(protect_policies(record)[0], id="trap", reqid=31)
    await backend.install_policy(trap)
    (policy,) = kernel.policies.values()
    msg = xfrm_user_acquire()
    policy_fields = policy.to_message()
    for key, value in policy_fields.items():
        if key not in ("header", "attrs") and not key.startswith("__"):
            msg[f"policy_{key}"] = value
    msg.update(XfrmSelector(2, A.inner, B.inner, 32, 32, 1).to_fields("sel_"))
    msg["attrs"] = [("XFRMA_TMPL", [t.to_value() for t in policy.templates])]
    backend.process_kernel_message(XfrmMsgType.ACQUIRE, _decoded(msg, XfrmMsgType.ACQUIRE))
    event = await anext(backend.events())
    assert (event.kind, event.policy) == (DataplaneEventKind.ACQUIRE, "trap")
    assert event.reason == f"acquire for {A.inner} -> {B.inner} proto 1 (reqid 31)"


def _acquire_message(policy: Any) -> Any:
    msg = xfrm_user_acquire()
    for key, value in policy.to_message().items():
        if key not in ("header", "attrs") and not key.startswith("__"):
            msg[f"policy_{key}"] = value
    msg.update(XfrmSelector(2, A.inner, B.inner, 32, 32, 1).to_fields("sel_"))
    msg["attrs"] = [("XFRMA_TMPL", [t.to_value() for t in policy.templates])]
    return _decoded(msg, XfrmMsgType.ACQUIRE)


async def test_a_child_sa_installs_over_a_trap_entry_and_the_trap_comes_back(kernel_and_backend: Any) -> None:
    """The kernel holds one policy per selector and direction: the Child SA's entries (better
    priority) take the trap's place while it lives, the trap's return when it goes."""
    kernel, backend = kernel_and_backend
    record, _ = record_pair()
    traps = [
        dataclasses.replace(p, id=f"trap-{p.direction.name.lower()}", child_sa="", priority=1500)
        for p in protect_policies(record)
    ]
    for trap in traps:
        await backend.install_policy(trap)
    trap_entries = dict(kernel.policies)
    assert sorted(p.priority for p in trap_entries.values()) == [1500, 1500]
    await backend.install_child_sa(record, protect_policies(record))
    assert sorted(p.priority for p in kernel.policies.values()) == [1000, 1000]
    # the Child SA's SA expired hard: an acquire on its entry is the trap's to answer
    (out_entry,) = [p for p in kernel.policies.values() if p.direction == 1]
    backend.process_kernel_message(XfrmMsgType.ACQUIRE, _acquire_message(out_entry))
    event = await anext(backend.events())
    while event.kind != DataplaneEventKind.ACQUIRE:
        event = await anext(backend.events())
    assert event.policy == "trap-out"
    # a failing delete leaves the Child SA's entries in place
    kernel.fail_at = kernel.changes + 2
    with pytest.raises(Unsupported):
        await backend.delete_child_sa(record.id)
    assert sorted(p.priority for p in kernel.policies.values()) == [1000, 1000]
    kernel.fail_at = None
    await backend.delete_child_sa(record.id)
    assert kernel.policies == trap_entries and kernel.sas == {}
    for trap in traps:
        await backend.delete_policy(trap.id)
    assert kernel.policies == {}


async def test_a_trap_installed_under_a_live_child_sa_waits(kernel_and_backend: Any) -> None:
    kernel, backend = kernel_and_backend
    record, _ = record_pair()
    await backend.install_child_sa(record, protect_policies(record))
    child_entries = dict(kernel.policies)
    trap = dataclasses.replace(protect_policies(record)[0], id="trap", child_sa="", priority=1500)
    await backend.install_policy(trap)
    assert kernel.policies == child_entries  # the trap waits underneath
    with pytest.raises(AlreadyExists, match="belongs to policy"):  # same priority: a real conflict
        await backend.install_policy(dataclasses.replace(trap, id="rival", priority=1000))
    await backend.delete_child_sa(record.id)
    assert [p.priority for p in kernel.policies.values()] == [1500]
    await backend.delete_policy("trap")
    assert kernel.policies == {}


async def test_counters_report_both_directions(kernel_and_backend: Any) -> None:
    kernel, backend = kernel_and_backend
    record, _ = record_pair()
    await backend.install_child_sa(record)
    for sa in kernel.sas.values():
        kernel.packets[sa.id] = 7 if sa.spi == record.outbound.spi else 5
    counters = {(c.spi, c.direction): c for c in backend.counters()}
    out, inbound = counters[(record.outbound.spi, "out")], counters[(record.inbound.spi, "in")]
    assert (out.packets, out.bytes, out.replay_window_top) == (7, 700, 7)
    assert (inbound.packets, inbound.replay_window_top) == (5, 5)


async def test_stop_removes_everything_and_ends_the_event_stream() -> None:
    kernel = FakeKernel()
    backend = KernelXfrmBackend(client=kernel)  # type: ignore[arg-type]
    await backend.start()
    record, _ = record_pair()
    await backend.install_child_sa(record, protect_policies(record))
    await backend.install_policy(
        dataclasses.replace(
            protect_policies(record)[0], id="extra", priority=5, local_ts=protect_policies(record)[0].remote_ts
        )
    )
    await backend.stop()
    assert kernel.sas == {} and kernel.policies == {}
    kinds = [event.kind async for event in backend.events()]
    assert kinds == [DataplaneEventKind.INSTALLED, DataplaneEventKind.DELETED]
    with pytest.raises(DataplaneError, match="not started"):
        await backend.install_child_sa(record)
