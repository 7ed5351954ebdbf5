"""What only the etcd backend has: a real etcd killed and restarted, TLS client certs, endpoints."""

from __future__ import annotations

import time

import pytest

from esplanade.store.base import StoreError, StoreUnavailable
from esplanade.store.etcd import EtcdStore, parse_endpoint
from tests.conditions import async_wait_until
from tests.etcd_server import EtcdServer, free_port
from tests.store.watch_collector import WatchCollector

pytestmark = pytest.mark.etcd


async def _write_when_back(store: EtcdStore, key: str, value: bytes) -> int:
    """Write once etcd answers again (the channel reconnects on its own)."""
    revisions: list[int] = []

    async def attempt() -> bool:
        revisions.append(await store.put(key, value))
        return True

    await async_wait_until(attempt, timeout=15, what=f"a write of {key} after the restart")
    return revisions[-1]


async def test_watch_survives_sigkill_and_restart_of_etcd(etcd_server: EtcdServer) -> None:
    async with EtcdStore([etcd_server.endpoint], timeout=2) as store:
        start = await store.ping() + 1
        watch = WatchCollector(store.watch("/k/", start))
        try:
            await store.put("/k/1", b"1")
            await store.put("/k/2", b"2")
            await async_wait_until(lambda: _ready(len(watch.events) >= 2), what="events before the kill")

            etcd_server.kill()
            with pytest.raises(StoreUnavailable):
                await store.put("/k/lost", b"etcd is down")
            etcd_server.start()

            await _write_when_back(store, "/k/3", b"3")
            await store.delete("/k/1")
            await async_wait_until(lambda: _ready(len(watch.events) >= 4), timeout=15, what="events after restart")
            assert [(kind, key) for kind, key, _, _ in watch.summary()] == [
                ("put", "/k/1"),
                ("put", "/k/2"),
                ("put", "/k/3"),
                ("delete", "/k/1"),
            ]
            revisions = [e.kv.mod_revision for e in watch.events]
            assert revisions == sorted(set(revisions)), "no duplicate, no reordering"
            assert watch.error is None and watch.resyncs == []
        finally:
            await watch.stop()


async def _ready(value: bool) -> bool:
    return value


async def test_every_call_fails_with_store_unavailable_while_etcd_is_down(etcd_server: EtcdServer) -> None:
    async with EtcdStore([etcd_server.endpoint], timeout=1) as store:
        lease = await store.grant_lease(30)
        etcd_server.kill()
        started = time.monotonic()
        for call in (
            store.ping(),
            store.get("/x"),
            store.range("/"),
            store.put("/x", b"1"),
            store.put("/x", b"1", expect_mod_revision=0),
            store.delete("/x"),
            store.commit([], []),
            store.grant_lease(5),
            store.keepalive(lease.id),
            store.revoke_lease(lease.id),
            store.compact(1),
        ):
            with pytest.raises(StoreUnavailable):
                await call
        assert time.monotonic() - started < 11 * 1.5, "each call gave up within its deadline"


async def test_leases_survive_an_etcd_restart(etcd_server: EtcdServer) -> None:
    async with EtcdStore([etcd_server.endpoint], timeout=2) as store:
        lease = await store.grant_lease(30)
        await store.put("/lease/x", b"x", lease=lease.id)
        etcd_server.kill()
        etcd_server.start()
        await _write_when_back(store, "/probe", b"p")
        assert await store.keepalive(lease.id) == 30
        kv = await store.get("/lease/x")
        assert kv is not None and kv.lease == lease.id


async def test_tls_with_client_certificates(etcd_tls_server: EtcdServer) -> None:
    tls = etcd_tls_server.client_tls
    assert tls is not None
    async with EtcdStore(
        [etcd_tls_server.endpoint], ca_file=tls.ca, cert_file=tls.cert, key_file=tls.key, timeout=3
    ) as store:
        revision = await store.put("/tls/x", b"secret channel")
        kv = await store.get("/tls/x")
        assert kv is not None and kv.mod_revision == revision

    # Without a client certificate etcd refuses the handshake.
    async with EtcdStore([etcd_tls_server.endpoint], ca_file=tls.ca, timeout=2) as anonymous:
        with pytest.raises(StoreUnavailable):
            await anonymous.ping()
    # A plaintext client gets nowhere either.
    async with EtcdStore([etcd_tls_server.endpoint], timeout=2) as plaintext:
        with pytest.raises(StoreUnavailable):
            await plaintext.ping()


async def test_missing_tls_file_is_a_clear_error(tmp_path: object) -> None:
    store = EtcdStore(["127.0.0.1:2379"], ca_file="/nonexistent/ca.pem")
    with pytest.raises(StoreError, match=r"CA certificate /nonexistent/ca\.pem"):
        await store.connect()


async def test_reads_move_on_to_the_next_endpoint(etcd_server: EtcdServer) -> None:
    dead = f"127.0.0.1:{free_port()}"
    async with EtcdStore([dead, etcd_server.endpoint], timeout=2) as store:
        assert await store.ping() >= 1  # the dead endpoint is skipped within the call
        assert await store.put("/after-failover", b"x") > 1  # and writes go to the live one


def test_endpoint_forms() -> None:
    assert parse_endpoint("127.0.0.1:2379") == ("127.0.0.1:2379", False)
    assert parse_endpoint("https://etcd.example:2379/") == ("etcd.example:2379", True)
    assert parse_endpoint("[::1]:2379") == ("[::1]:2379", False)
    for bad in ("etcd", "etcd:", ":2379", "etcd:99999"):
        with pytest.raises(ValueError):
            parse_endpoint(bad)
