"""A dataplane backend double that keeps what it is given and logs each call, for the
reconciler's and the services' unit tests (acceptance tests use the real backends)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from esplanade.dataplane.backend import BackendStatus, DataplaneEvent, NotFound, SaCounters, Unsupported
from esplanade.ipsec.sa import ChildSaRecord
from esplanade.ipsec.spd import SpdPolicy
from esplanade.ipsec.transforms import Mode


class FakeBackend:
    def __init__(self) -> None:
        self.children: dict[str, ChildSaRecord] = {}
        self.policies: dict[str, SpdPolicy] = {}
        self.calls: list[str] = []

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def status(self) -> BackendStatus:
        return BackendStatus("fake", "test")

    async def install_child_sa(self, record: ChildSaRecord) -> None:
        if record.inbound.mode == Mode.TRANSPORT:
            raise Unsupported("no transport mode here")
        self.calls.append(f"install {record.id}")
        self.children[record.id] = record

    async def update_child_sa(self, record: ChildSaRecord) -> None:
        self.calls.append(f"update {record.id}")
        self.children[record.id] = record

    async def delete_child_sa(self, child_sa_id: str) -> None:
        if child_sa_id not in self.children:
            raise NotFound(child_sa_id)
        self.calls.append(f"delete {child_sa_id}")
        del self.children[child_sa_id]

    async def install_policy(self, policy: SpdPolicy) -> None:
        self.calls.append(f"policy {policy.id}")
        self.policies[policy.id] = policy

    async def delete_policy(self, policy_id: str) -> None:
        self.calls.append(f"unpolicy {policy_id}")
        del self.policies[policy_id]

    def counters(self) -> list[SaCounters]:
        return []

    async def events(self) -> AsyncIterator[DataplaneEvent]:
        return
        yield
