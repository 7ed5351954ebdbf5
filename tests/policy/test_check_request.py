"""The policy service's Check refuses a request it cannot evaluate with a typed error."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from esplanade.policy.compiled_sync import CompiledSync
from esplanade.policy.policy_file import load_policy_yaml
from esplanade.policy.servicer import PolicyServicer
from esplanade.policy.store_state import PolicyStore
from esplanade.store.base import Store
from esplanade.store.embedded import EmbeddedStore
from esplanade.v1 import policy_pb2

POLICY = """
version: 1
sites:
  - {id: hq, networks: [10.50.0.0/16]}
groups:
  - {id: oncall}
identities:
  - {id: alice, ike_ids: ["email:alice@corp.test"], groups: [oncall]}
resources:
  - {id: db, destination: 10.50.2.20, protocol: tcp, ports: [5432], site: hq}
rules:
  - id: oncall-db
    groups: [oncall]
    resources: [db]
    conditions:
      time_window: {days: [sat, sun], start: "00:00", end: "24:00", timezone: Europe/Berlin}
"""


class Aborted(Exception):
    pass


class FakeContext:
    """What `Check` uses of a grpc.aio servicer context."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.metadata: Any = ()

    def set_trailing_metadata(self, metadata: Any) -> None:
        self.metadata = metadata

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        raise Aborted(details)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with EmbeddedStore(tmp_path / "state.db") as opened:
        yield opened


@pytest.mark.parametrize("instant", [1e20, float("nan"), float("inf"), -1e12])
async def test_a_check_at_an_instant_no_clock_can_show_is_refused_as_invalid(store: Store, instant: float) -> None:
    sync = CompiledSync(store)
    sync.compiler.load(load_policy_yaml(POLICY))
    sync.ready.set()
    servicer = PolicyServicer(PolicyStore(store), sync)
    flow = policy_pb2.FiveTuple(src="100.64.0.2", dst="10.50.2.20", protocol=6, src_port=40000, dst_port=5432)
    request = policy_pb2.CheckRequest(identity="alice", flow=flow, time=instant)
    context = FakeContext()
    with pytest.raises(Aborted):
        await servicer.Check(request, context)  # type: ignore[arg-type]
    assert context.code is grpc.StatusCode.INVALID_ARGUMENT


async def test_a_check_at_a_valid_instant_is_answered(store: Store) -> None:
    sync = CompiledSync(store)
    sync.compiler.load(load_policy_yaml(POLICY))
    sync.ready.set()
    servicer = PolicyServicer(PolicyStore(store), sync)
    flow = policy_pb2.FiveTuple(src="100.64.0.2", dst="10.50.2.20", protocol=6, src_port=40000, dst_port=5432)
    saturday_noon = 1_718_445_600.0  # 2024-06-15 12:00 Europe/Berlin
    reply = await servicer.Check(
        policy_pb2.CheckRequest(identity="alice", flow=flow, time=saturday_noon), FakeContext()
    )  # type: ignore[arg-type]
    assert reply.allow and reply.rule == "oncall-db"
