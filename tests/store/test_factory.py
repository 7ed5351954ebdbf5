"""Building a store from settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from esplanade.config.settings import StoreSettings, TlsSettings
from esplanade.store.embedded import EmbeddedStore
from esplanade.store.etcd import EtcdStore
from esplanade.store.factory import open_store
from esplanade.store.measured import MeasuredStore
from tests.etcd_server import EtcdServer


async def test_embedded_is_the_default(tmp_path: Path) -> None:
    settings = StoreSettings(path=tmp_path / "s.db")
    assert settings.backend == "embedded"
    store = open_store(settings)
    assert isinstance(store, MeasuredStore) and isinstance(store.inner, EmbeddedStore)
    async with store:
        assert await store.put("/x", b"1") == 2


@pytest.mark.etcd
async def test_etcd_with_tls_from_settings(etcd_tls_server: EtcdServer) -> None:
    tls = etcd_tls_server.client_tls
    assert tls is not None
    settings = StoreSettings(
        backend="etcd",
        etcd_endpoints=[etcd_tls_server.endpoint],
        etcd_tls=TlsSettings(enabled=True, ca_file=tls.ca, cert_file=tls.cert, key_file=tls.key),
        timeout_seconds=2.5,
    )
    store = open_store(settings)
    assert isinstance(store, MeasuredStore)
    assert isinstance(store.inner, EtcdStore) and store.inner.timeout == 2.5
    async with store:
        assert await store.ping() >= 1


async def test_unusable_embedded_path_is_store_unavailable(tmp_path: Path) -> None:
    from esplanade.store.base import StoreUnavailable

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = open_store(StoreSettings(path=blocker / "state.db"))
    with pytest.raises(StoreUnavailable, match=r"state\.db"):
        await store.connect()


async def test_a_file_that_is_not_a_database_is_store_unavailable(tmp_path: Path) -> None:
    from esplanade.store.base import StoreUnavailable

    path = tmp_path / "state.db"
    path.write_bytes(b"this is not an SQLite database" * 100)
    store = EmbeddedStore(path)
    with pytest.raises(StoreUnavailable, match=r"state\.db"):
        await store.connect()
    await store.close()
