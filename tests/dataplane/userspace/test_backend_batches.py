"""UserspaceBackend.install_child_sas: each Child SA all or nothing on its own, one ledger call
for the batch, the workers' messages sent together (workers faked at the channel)."""

from __future__ import annotations

import asyncio
from typing import Any

from esplanade.dataplane.backend import AlreadyExists, DataplaneError
from esplanade.dataplane.sa_persistence import MemorySaPersistence
from esplanade.dataplane.userspace.backend import UserspaceBackend, UserspaceBackendSettings
from esplanade.dataplane.userspace.datapath import DatapathSettings
from esplanade.ipsec.sa import ChildSaRecord
from esplanade.ipsec.selectors import TrafficSelector
from tests.dataplane.child_sa_records import record


class FakeChannel:
    def __init__(self, index: int, refuse: set[str]) -> None:
        self.index = index
        self.refuse = refuse
        self.sent: list[dict[str, Any]] = []

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        self.sent.append(message)
        if message["op"] == "install_sa" and message["child_sa"] in self.refuse:
            return {"ok": False, "error": "no room"}
        return {"ok": True}


class CountingPersistence(MemorySaPersistence):
    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[str]] = []

    async def start_children(self, children: Any, block: int) -> list[tuple[int, int, int]]:
        self.batches.append([c[0] for c in children])
        return await super().start_children(children, block)


def backend(workers: int, refuse: set[str]) -> tuple[UserspaceBackend, list[FakeChannel], CountingPersistence]:
    persistence = CountingPersistence()
    b = UserspaceBackend(UserspaceBackendSettings(DatapathSettings(workers=workers)), persistence)
    channels = [FakeChannel(i, refuse) for i in range(workers)]
    b._channels = channels  # type: ignore[assignment]
    return b, channels, persistence


def test_a_batch_installs_each_child_sa_on_its_own() -> None:
    b, channels, persistence = backend(2, refuse={"bad"})
    good, clash, bad, other = (
        record("good", 0x1000),
        record("clash", 0x1000),  # the same inbound SPI as "good", in the same batch
        record("bad", 0x3000),
        record("other", 0x4001),
    )

    async def scenario() -> list[DataplaneError | None]:
        return await b.install_child_sas([good, clash, bad, other])

    results = asyncio.run(scenario())
    assert results[0] is None and results[3] is None
    assert isinstance(results[1], AlreadyExists)
    assert isinstance(results[2], DataplaneError) and "no room" in str(results[2])
    assert {r.id for r in b.installed_child_sas()} == {"good", "other"}
    assert persistence.batches == [["good", "bad", "other"]]  # one ledger call for what passed the checks
    removed = [m["child_sa"] for c in channels for m in c.sent if m["op"] == "remove_sa"]
    assert sorted(removed) == ["bad", "bad"]  # the refused one is taken back from every worker
    # installing the same records again changes nothing; a clash with an installed SA is refused
    assert asyncio.run(b.install_child_sas([good])) == [None]
    again = asyncio.run(b.install_child_sas([record("late", 0x1000)]))
    assert isinstance(again[0], AlreadyExists)


def test_deleting_frees_the_spis_for_a_successor() -> None:
    b, _, _ = backend(1, refuse=set())
    first: ChildSaRecord = record("first", 0x5000)
    asyncio.run(b.install_child_sas([first]))
    asyncio.run(b.delete_child_sa("first"))
    assert asyncio.run(b.install_child_sas([record("second", 0x5000)])) == [None]


def test_the_initial_filter_travels_in_the_install_message() -> None:
    """A governed SA carries its identity filter from its first packet: the policy enforcer's
    `initial_filter` goes into the owner's install_sa message (no window before a set_filter)."""
    b, channels, _ = backend(1, refuse=set())
    wanted = {"governed": [TrafficSelector.parse("10.50.1.10/32[tcp/443]")], "closed": []}
    b.initial_filter = lambda record: wanted.get(record.id)
    asyncio.run(b.install_child_sas([record("governed", 0x6000), record("closed", 0x6100), record("s2s", 0x6200)]))
    installs = {m["child_sa"]: m for m in channels[0].sent if m["op"] == "install_sa"}
    assert installs["governed"]["filter"] == ["10.50.1.10/32[tcp/443]"]
    assert installs["closed"]["filter"] == []  # granted nothing: drops everything from the start
    assert "filter" not in installs["s2s"]  # not governed
