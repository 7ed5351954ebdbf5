"""The `store` fixture: every contract test runs on both backends."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from esplanade.store.base import Store
from esplanade.store.embedded import EmbeddedStore
from esplanade.store.etcd import EtcdStore
from tests.etcd_server import EtcdServer


@dataclass
class Backend:
    """How to open (another) store on the same data, and what stands behind it."""

    name: str
    open: Callable[[], Store]
    etcd: EtcdServer | None = None
    path: Path | None = None


@pytest.fixture(params=["embedded", pytest.param("etcd", marks=pytest.mark.etcd)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "embedded":
        path = tmp_path / "state.db"
        return Backend("embedded", lambda: EmbeddedStore(path), path=path)
    server: EtcdServer = request.getfixturevalue("etcd_server")
    return Backend("etcd", lambda: EtcdStore([server.endpoint], timeout=3.0), etcd=server)


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    opened = backend.open()
    await opened.connect()
    try:
        yield opened
    finally:
        await opened.close()
