"""Building a store from settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from esplanade.store.embedded import EmbeddedStore
from esplanade.store.etcd import EtcdStore
from esplanade.store.factory import StoreSettings, StoreSettingsError, build_store

from tests.etcd_server import EtcdServer


async def test_embedded_is_the_default(tmp_path: Path) -> None:
    settings = StoreSettings.from_env({"ESPLANADE_STORE_PATH": str(tmp_path / "s.db")})
    assert settings.backend == "embedded" and settings.synchronous == "FULL"
    store = build_store(settings)
    assert isinstance(store, EmbeddedStore)
    async with store:
        assert await store.put("/x", b"1") == 2


@pytest.mark.etcd
async def test_etcd_with_tls_from_settings(etcd_tls_server: EtcdServer) -> None:
    tls = etcd_tls_server.client_tls
    assert tls is not None
    settings = StoreSettings.from_env(
        {
            "ESPLANADE_STORE": "etcd",
            "ESPLANADE_ETCD_ENDPOINTS": f" https://{etcd_tls_server.endpoint} ",
            "ESPLANADE_ETCD_CA_FILE": str(tls.ca),
            "ESPLANADE_ETCD_CERT_FILE": str(tls.cert),
            "ESPLANADE_ETCD_KEY_FILE": str(tls.key),
            "ESPLANADE_STORE_TIMEOUT": "2.5",
        }
    )
    store = build_store(settings)
    assert isinstance(store, EtcdStore) and store.timeout == 2.5
    async with store:
        assert await store.ping() >= 1


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"ESPLANADE_STORE": "zookeeper"}, "ESPLANADE_STORE"),
        ({"ESPLANADE_STORE": "etcd"}, "ESPLANADE_ETCD_ENDPOINTS"),
        ({"ESPLANADE_STORE": "etcd", "ESPLANADE_ETCD_ENDPOINTS": "etcd"}, "ESPLANADE_ETCD_ENDPOINTS"),
        (
            {"ESPLANADE_STORE": "etcd", "ESPLANADE_ETCD_ENDPOINTS": "a:1", "ESPLANADE_ETCD_CERT_FILE": "c"},
            "ESPLANADE_ETCD_KEY_FILE",
        ),
        ({"ESPLANADE_STORE_TIMEOUT": "soon"}, "ESPLANADE_STORE_TIMEOUT"),
        ({"ESPLANADE_STORE_TIMEOUT": "0"}, "ESPLANADE_STORE_TIMEOUT"),
        ({"ESPLANADE_STORE_SYNCHRONOUS": "OFF"}, "ESPLANADE_STORE_SYNCHRONOUS"),
    ],
)
def test_bad_settings_name_the_setting(env: dict[str, str], setting: str) -> None:
    with pytest.raises(StoreSettingsError, match=setting):
        StoreSettings.from_env(env)


async def test_unusable_embedded_path_is_store_unavailable(tmp_path: Path) -> None:
    from esplanade.store.base import StoreUnavailable

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = build_store(StoreSettings(path=str(blocker / "state.db")))
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
