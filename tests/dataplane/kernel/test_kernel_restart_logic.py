"""The kernel backend across restarts of its process, against a fake kernel that keeps state.

XFRM state outlives the dataplane process. A successor adopts what the store still wants
(no netlink change, counters carry on), replaces what a predecessor installed with other
content, removes what the store no longer wants, and never touches entries it did not
install. The sequence ledger follows the kernel's counters: a reinstalled SA starts after
every number ever reserved, NEWAE events keep the ledger ahead. The same flows run against
the real kernel in the VM (tests/vm/guest/test_service_restart.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from esplanade.dataplane.backend import AlreadyExists, DataplaneEvent, DataplaneEventKind
from esplanade.dataplane.kernel.backend import KernelXfrmBackend
from esplanade.dataplane.kernel.state_journal import KernelStateJournal
from esplanade.dataplane.kernel.xfrm_messages import XfrmAeFlag, XfrmMsgType, xfrm_aevent_id
from esplanade.dataplane.kernel.xfrm_sa import XfrmReplayState, XfrmSa, aevent_id_message, xfrm_sa_from_association
from esplanade.dataplane.kernel.xfrm_socket import NetlinkHeader, decode_message
from esplanade.dataplane.sa_persistence import MemorySaPersistence
from esplanade.ipsec.sa import ChildSaRecord
from esplanade.ipsec.selectors import TrafficSelector
from tests.dataplane.kernel.child_sa_builders import TRANSFORMS_BY_LABEL, Peer, child_sa_pair, protect_policies
from tests.dataplane.kernel.fake_kernel import FakeKernel

A, B = Peer("192.0.2.1", "10.1.0.1"), Peer("192.0.2.2", "10.2.0.1")
GCM = TRANSFORMS_BY_LABEL["aes128gcm16"]
BLOCK = 1024


class Node:
    """One node: its kernel, journal file and ledger survive the dataplane process."""

    def __init__(self, tmp_path: Path) -> None:
        self.kernel = FakeKernel()
        self.journal_path = tmp_path / "kernel.json"
        self.ledger = MemorySaPersistence()

    async def start_dataplane(self) -> KernelXfrmBackend:
        backend = KernelXfrmBackend(
            client=self.kernel,  # type: ignore[arg-type]
            wall_clock=lambda: 1000.0,
            keep_on_stop=True,
            persistence=self.ledger,
            sequence_block=BLOCK,
            replay_block=BLOCK,
            journal=KernelStateJournal(self.journal_path),
            mark_interval=0,
        )
        await backend.start()
        return backend


def record_pair(name: str = "c", **options: Any) -> tuple[ChildSaRecord, ChildSaRecord]:
    return child_sa_pair(name, A, B, GCM, **options)


def kernel_sa(node: Node, spi: int) -> XfrmSa:
    return next(sa for sa in node.kernel.sas.values() if sa.spi == spi)


def drain_events(backend: KernelXfrmBackend) -> list[DataplaneEvent]:
    out = []
    while not backend._queue.empty():
        event = backend._queue.get_nowait()
        if event is not None:
            out.append(event)
    return out


async def test_a_restarted_dataplane_adopts_what_the_kernel_still_holds(tmp_path: Path) -> None:
    node = Node(tmp_path)
    first = await node.start_dataplane()
    record, _ = record_pair()
    await first.install_child_sa(record, protect_policies(record))
    out_sa = kernel_sa(node, record.outbound.spi)
    node.kernel.packets[out_sa.id] = 5000  # the kernel sent while no process watched (kill -9)
    content = (dict(node.kernel.sas), dict(node.kernel.policies))

    second = await node.start_dataplane()
    changes = node.kernel.changes
    await second.install_child_sa(record, protect_policies(record))
    await second.finish_initial_sync()
    assert node.kernel.changes == changes, "adopting changed the kernel"
    assert (node.kernel.sas, node.kernel.policies) == content
    assert second.adopted == {"sas": 2, "policies": 2}
    # the ledger is taken over and raised above what the kernel sent meanwhile
    await second._keeper.drain()  # type: ignore[union-attr]
    assert node.ledger.sequence[record.outbound.spi] >= 5000 + BLOCK // 2
    assert not [e for e in drain_events(second) if e.kind == DataplaneEventKind.SOFT_EXPIRE]
    # and it is really ours now: a delete removes it
    await second.delete_child_sa(record.id)
    assert node.kernel.sas == {} and node.kernel.policies == {}


async def test_a_successor_replaces_changed_entries_and_removes_unwanted_ones(tmp_path: Path) -> None:
    node = Node(tmp_path)
    first = await node.start_dataplane()
    kept, _ = record_pair("kept")
    gone, _ = record_pair("gone", spi_ab=0xA0000002, spi_ba=0xB0000002)
    kept_policies = protect_policies(kept)
    await first.install_child_sa(kept, kept_policies)
    await first.install_child_sa(gone, protect_policies(gone, remote_ts=TrafficSelector.parse("10.2.9.0/24")))
    foreign = xfrm_sa_from_association(record_pair("x", spi_ab=0xF0000001, spi_ba=0xF0000002)[0].outbound, reqid=7)
    node.kernel.add_sa(foreign)  # someone else's SA: never ours to remove

    second = await node.start_dataplane()
    # the store now wants `kept`'s policies with another priority: replaced in place
    moved = [dataclasses.replace(p, priority=p.priority + 1) for p in kept_policies]
    await second.install_child_sa(kept, moved)
    await second.finish_initial_sync()
    assert second.adopted["sas"] == 2 and second.replaced["policies"] == 2
    assert {p.priority for p in node.kernel.policies.values()} == {1001}
    assert {sa.spi for sa in node.kernel.sas.values()} == {kept.inbound.spi, kept.outbound.spi, foreign.spi}
    assert second.swept == {"sas": 2, "policies": 2}
    # a third incarnation finds only what the second one installed in the journal
    third = await node.start_dataplane()
    await third.finish_initial_sync()
    assert {sa.spi for sa in node.kernel.sas.values()} == {foreign.spi}


async def test_a_predecessors_sa_with_other_keys_is_replaced(tmp_path: Path) -> None:
    node = Node(tmp_path)
    first = await node.start_dataplane()
    record, _ = record_pair()
    await first.install_child_sa(record)
    rekeyed = dataclasses.replace(
        record, outbound=dataclasses.replace(record.outbound, encr_key=bytes(len(record.outbound.encr_key)))
    )
    second = await node.start_dataplane()
    await second.install_child_sa(rekeyed)
    assert second.replaced["sas"] == 1 and second.adopted["sas"] == 1
    assert kernel_sa(node, record.outbound.spi).aead.key == bytes(len(record.outbound.encr_key))  # type: ignore[union-attr]


async def test_entries_nobody_listed_are_not_adopted_when_they_differ(tmp_path: Path) -> None:
    node = Node(tmp_path)
    record, _ = record_pair()
    policies = protect_policies(record)
    foreign = dataclasses.replace(policies[1], reqid=99)
    from esplanade.dataplane.kernel.xfrm_policy import xfrm_policies_from_spd

    (kernel_policy,) = xfrm_policies_from_spd(foreign, reqid=99)
    node.kernel.add_policy(kernel_policy)
    backend = await node.start_dataplane()
    with pytest.raises(AlreadyExists):
        await backend.install_child_sa(record, policies)
    assert node.kernel.sas == {} and list(node.kernel.policies.values()) == [kernel_policy]
    await backend.finish_initial_sync()
    assert list(node.kernel.policies.values()) == [kernel_policy]


async def test_a_reinstalled_sa_continues_after_the_ledger_and_asks_for_a_rekey(tmp_path: Path) -> None:
    node = Node(tmp_path)
    first = await node.start_dataplane()
    record, _ = record_pair()
    await first.install_child_sa(record)
    out_sa = kernel_sa(node, record.outbound.spi)
    assert out_sa.replay_thresh == BLOCK // 4 and out_sa.etimer_thresh == 0
    assert out_sa.initial_replay is None  # a new SPI starts at 1
    assert node.ledger.sequence[record.outbound.spi] == BLOCK
    node.kernel.packets[out_sa.id] = 700
    first.counters()  # a dump sees 700 sent: within half a block of the bound
    await first._keeper.drain()  # type: ignore[union-attr]
    assert node.ledger.sequence[record.outbound.spi] == 700 + BLOCK

    node.kernel.sas.clear()  # the node rebooted: the kernel lost its SAs (and the journal its file)
    node.journal_path.unlink()
    second = await node.start_dataplane()
    await second.install_child_sa(record)
    again = kernel_sa(node, record.outbound.spi)
    assert again.initial_replay == XfrmReplayState.sending_after(700 + BLOCK)
    inbound = kernel_sa(node, record.inbound.spi)
    assert inbound.initial_replay is not None and inbound.initial_replay.highest_received > 0
    events = drain_events(second)
    assert [e.reason for e in events if e.kind == DataplaneEventKind.SOFT_EXPIRE] == [
        "reinstalled from the sequence ledger: rekey recommended"
    ]


def aevent(sa: XfrmSa, replay: XfrmReplayState) -> Any:
    msg: xfrm_aevent_id = aevent_id_message(sa.id, sa.src, sa.reqid, XfrmAeFlag.CR)
    msg["attrs"] = [("XFRMA_REPLAY_VAL", {"oseq": replay.oseq, "seq": replay.seq, "bitmap": 0})]
    msg.reset()
    msg["header"] = {"type": XfrmMsgType.NEWAE}
    msg.encode()
    data = bytes(msg.data)
    return decode_message(NetlinkHeader(len(data), XfrmMsgType.NEWAE, 0, 0, 0), data)


async def test_newae_events_keep_the_ledger_ahead_and_a_lost_ledger_stops_nothing_silently(tmp_path: Path) -> None:
    node = Node(tmp_path)
    backend = await node.start_dataplane()
    record, _ = record_pair()
    await backend.install_child_sa(record)
    out_sa = kernel_sa(node, record.outbound.spi)
    backend.process_kernel_message(XfrmMsgType.NEWAE, aevent(out_sa, XfrmReplayState(oseq=256)))
    await backend._keeper.drain()  # type: ignore[union-attr]
    assert node.ledger.sequence[record.outbound.spi] == BLOCK  # 256 is far below the bound
    backend.process_kernel_message(XfrmMsgType.NEWAE, aevent(out_sa, XfrmReplayState(oseq=768)))
    await backend._keeper.drain()  # type: ignore[union-attr]
    assert node.ledger.sequence[record.outbound.spi] == 768 + BLOCK
    in_sa = kernel_sa(node, record.inbound.spi)
    backend.process_kernel_message(XfrmMsgType.NEWAE, aevent(in_sa, XfrmReplayState(seq=900)))
    await backend._keeper.drain()  # type: ignore[union-attr]
    assert node.ledger.replay[record.inbound.spi] == 900 + BLOCK
