"""The policy service's store layer: a plan larger than one transaction applies all or nothing."""

from __future__ import annotations

from pathlib import Path

from esplanade.policy.apply import apply_model
from esplanade.policy.decode import object_to_document
from esplanade.policy.model import Group, Identity, Model
from esplanade.policy.store_state import PolicyStore, read_model
from esplanade.store import schema
from esplanade.store.base import StoreUnavailable
from esplanade.store.embedded import EmbeddedStore


async def test_large_apply_is_chunked_and_complete(tmp_path: Path) -> None:
    async with EmbeddedStore(tmp_path / "s.db") as store:
        ps = PolicyStore(store)
        groups = [Group(f"g{i}") for i in range(150)]
        identities = [Identity(f"u{i}", groups=(f"g{i}",)) for i in range(150)]
        outcome = await apply_model(ps, Model.of([*groups, *identities]), "test")
        assert outcome.applied and len(outcome.changes) == 300
        model, generation, _ = await read_model(store)
        assert len(model.groups) == 150 and len(model.identities) == 150
        assert generation.applying is None
        leftovers, _ = await store.range(schema.prefix("policy", "_apply"))
        assert leftovers == []


async def test_failed_chunk_rolls_everything_back(tmp_path: Path) -> None:
    async with EmbeddedStore(tmp_path / "s.db") as store:
        ps = PolicyStore(store)
        await apply_model(ps, Model.of([Group("keep")]), "test")
        before, _, _ = await read_model(store)
        desired = Model.of([Group("keep", description="changed"), *(Group(f"n{i}") for i in range(200))])
        original_commit = store.commit
        calls = 0

        async def sabotage(conditions, ops):  # type: ignore[no-untyped-def]
            nonlocal calls
            calls += 1
            if calls == 3:  # the second chunk: the store fails
                raise StoreUnavailable("injected")
            return await original_commit(conditions, ops)

        store.commit = sabotage  # type: ignore[method-assign]
        try:
            await apply_model(ps, desired, "test")
        except StoreUnavailable:
            pass
        else:
            raise AssertionError("the apply should have failed")
        store.commit = original_commit  # type: ignore[method-assign]
        after, generation, _ = await read_model(store)
        assert set(after.groups) == {"keep"}
        assert generation.applying is None
        assert object_to_document(after.groups["keep"]) == object_to_document(before.groups["keep"])
        leftovers, _ = await store.range(schema.prefix("policy", "_apply"))
        assert leftovers == []
