"""The key-value contract: reads, writes, revisions, CAS and transactions, on both backends."""

from __future__ import annotations

import pytest

from esplanade.store.base import (
    MAX_REQUEST_BYTES,
    MAX_TXN_OPS,
    CasConflict,
    Compare,
    Delete,
    LeaseNotFound,
    Put,
    Store,
)


async def test_empty_store_starts_at_revision_one(store: Store) -> None:
    assert await store.ping() == 1
    assert await store.get("/nothing") is None
    assert await store.range("/") == ([], 1)


async def test_put_get_revisions_and_versions(store: Store) -> None:
    r1 = await store.put("/a", b"one")
    assert r1 == 2
    kv = await store.get("/a")
    assert kv is not None
    assert (kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease) == ("/a", b"one", 2, 2, 1, 0)

    r2 = await store.put("/a", b"two")
    assert r2 == 3
    kv = await store.get("/a")
    assert kv is not None
    assert (kv.value, kv.create_revision, kv.mod_revision, kv.version) == (b"two", 2, 3, 2)

    r3 = await store.put("/b", b"")
    assert r3 == 4
    b = await store.get("/b")
    assert b is not None and b.value == b""
    assert await store.ping() == 4


async def test_delete_resets_version_and_create_revision(store: Store) -> None:
    await store.put("/k", b"1")
    await store.put("/k", b"2")
    assert await store.delete("/k") is True
    assert await store.ping() == 4
    assert await store.get("/k") is None
    assert await store.delete("/k") is False
    assert await store.ping() == 4, "deleting a missing key writes nothing"
    await store.put("/k", b"3")
    kv = await store.get("/k")
    assert kv is not None
    assert (kv.create_revision, kv.mod_revision, kv.version) == (5, 5, 1)


async def test_range_is_prefix_scoped_ordered_and_limited(store: Store) -> None:
    for key in ("/p/b", "/p/a", "/p/c/d", "/q/a", "/p", "/pz"):
        await store.put(key, key.encode())
    kvs, revision = await store.range("/p/")
    assert [kv.key for kv in kvs] == ["/p/a", "/p/b", "/p/c/d"]
    assert revision == await store.ping()
    kvs, _ = await store.range("/p/", limit=2)
    assert [kv.key for kv in kvs] == ["/p/a", "/p/b"]
    everything, _ = await store.range("")
    assert [kv.key for kv in everything] == ["/p", "/p/a", "/p/b", "/p/c/d", "/pz", "/q/a"]


async def test_keys_and_values_are_opaque(store: Store) -> None:
    key = "/ünï/çødé/\u2603"
    value = bytes(range(256))
    await store.put(key, value)
    kv = await store.get(key)
    assert kv is not None and kv.key == key and kv.value == value
    kvs, _ = await store.range("/ünï/")
    assert [kv.key for kv in kvs] == [key]


async def test_cas_put(store: Store) -> None:
    created = await store.put("/cas", b"v1", expect_mod_revision=0)
    with pytest.raises(CasConflict) as excinfo:
        await store.put("/cas", b"again", expect_mod_revision=0)
    assert (excinfo.value.key, excinfo.value.expected, excinfo.value.actual) == ("/cas", 0, created)

    updated = await store.put("/cas", b"v2", expect_mod_revision=created)
    with pytest.raises(CasConflict) as excinfo:
        await store.put("/cas", b"stale", expect_mod_revision=created)
    assert excinfo.value.actual == updated
    with pytest.raises(CasConflict) as excinfo:
        await store.put("/missing", b"x", expect_mod_revision=7)
    assert excinfo.value.actual == 0

    kv = await store.get("/cas")
    assert kv is not None and kv.value == b"v2"
    assert await store.get("/missing") is None
    assert await store.ping() == updated, "failed CAS writes nothing"


async def test_cas_delete(store: Store) -> None:
    revision = await store.put("/d", b"x")
    with pytest.raises(CasConflict):
        await store.delete("/d", expect_mod_revision=revision + 1)
    with pytest.raises(CasConflict):
        await store.delete("/d", expect_mod_revision=0)
    assert await store.get("/d") is not None
    assert await store.delete("/d", expect_mod_revision=revision) is True
    assert await store.get("/d") is None
    with pytest.raises(CasConflict):
        await store.delete("/d", expect_mod_revision=revision)
    assert await store.delete("/d", expect_mod_revision=0) is False


async def test_transaction_applies_everything_at_one_revision(store: Store) -> None:
    a = await store.put("/t/a", b"a")
    await store.put("/t/gone", b"x")
    result = await store.commit(
        [Compare("/t/a", a), Compare("/t/new", 0)],
        [Put("/t/a", b"a2"), Put("/t/new", b"n"), Delete("/t/gone"), Delete("/t/never-existed")],
    )
    assert result.succeeded and result.failed == ()
    assert result.revision == a + 2
    kvs, _ = await store.range("/t/")
    assert {kv.key: (kv.value, kv.mod_revision) for kv in kvs} == {
        "/t/a": (b"a2", result.revision),
        "/t/new": (b"n", result.revision),
    }


async def test_transaction_is_all_or_nothing(store: Store) -> None:
    a = await store.put("/t/a", b"a")
    b = await store.put("/t/b", b"b")
    result = await store.commit(
        [Compare("/t/a", a), Compare("/t/b", b + 100), Compare("/t/c", 0), Compare("/t/a", a + 1)],
        [Put("/t/a", b"changed"), Delete("/t/b"), Put("/t/c", b"c")],
    )
    assert not result.succeeded
    assert result.revision == b
    assert result.failed == (Compare("/t/b", b + 100), Compare("/t/a", a + 1))
    kvs, revision = await store.range("/t/")
    assert [(kv.key, kv.value) for kv in kvs] == [("/t/a", b"a"), ("/t/b", b"b")]
    assert revision == b


async def test_transaction_without_changes_does_not_advance(store: Store) -> None:
    before = await store.put("/x", b"x")
    result = await store.commit([], [Delete("/absent")])
    assert result.succeeded and result.revision == before
    result = await store.commit([Compare("/x", before)], [])
    assert result.succeeded and result.revision == before
    assert await store.ping() == before


async def test_limits_are_the_same_on_both_backends(store: Store) -> None:
    with pytest.raises(ValueError):
        await store.put("", b"x")
    with pytest.raises(ValueError):
        await store.put("/big", b"x" * (MAX_REQUEST_BYTES + 1))
    with pytest.raises(ValueError):
        await store.commit([], [Put(f"/k{i}", b"") for i in range(MAX_TXN_OPS + 1)])
    with pytest.raises(ValueError):
        await store.commit([], [Put("/dup", b"1"), Delete("/dup")])
    assert await store.ping() == 1
    ok = await store.commit([], [Put(f"/k{i}", b"") for i in range(MAX_TXN_OPS)])
    assert ok.succeeded
    assert len((await store.range("/k"))[0]) == MAX_TXN_OPS


async def test_write_with_unknown_lease_writes_nothing(store: Store) -> None:
    with pytest.raises(LeaseNotFound):
        await store.put("/l", b"x", lease=0x1234)
    with pytest.raises(LeaseNotFound):
        await store.commit([], [Put("/l1", b"x"), Put("/l2", b"x", lease=0x1234)])
    assert await store.range("/l") == ([], 1)


async def test_compaction_keeps_current_state(store: Store) -> None:
    for i in range(5):
        await store.put("/c", str(i).encode())
    await store.put("/gone", b"x")
    await store.delete("/gone")
    revision = await store.ping()
    await store.compact(revision)
    await store.compact(revision - 1)  # already compacted: a no-op
    with pytest.raises(ValueError):
        await store.compact(revision + 100)
    kvs, now = await store.range("")
    assert [(kv.key, kv.value, kv.version) for kv in kvs] == [("/c", b"4", 5)]
    assert now == revision
    assert await store.put("/c", b"5") == revision + 1
