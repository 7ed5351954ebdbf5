"""pytest fixtures for a real etcd (see tests/etcd_server.py).

- `etcd_server`: a fresh etcd for one test (own ports, own data dir), stopped afterwards.
  Kill it (`etcd_server.kill()`) and `start()` it again on the same ports and data.
- `etcd_tls_server`: the same, serving TLS and demanding client certificates.
- `shared_etcd_server`: one etcd for the whole session, for suites that keep to their own
  key prefixes and never kill it (saves ~0.2 s a test). `wipe()` empties it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.etcd_server import EtcdServer


@pytest.fixture
def etcd_server(tmp_path: Path) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path / "etcd")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def shared_etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path_factory.mktemp("shared-etcd"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def etcd_tls_server(tmp_path: Path) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path / "etcd-tls", tls=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()
