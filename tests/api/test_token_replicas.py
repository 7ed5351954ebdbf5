"""Two API replicas over one real etcd: a token revoked, re-scoped or expired through one
replica stops working on the other at once, not after the other's token cache ran out."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from esplanade.api.auth import Scope, token_document
from esplanade.store import schema
from tests.api.stack import ApiStack
from tests.conditions import wait_until
from tests.etcd_server import EtcdServer

pytestmark = pytest.mark.etcd

LONG_CACHE = {"token_cache_seconds": 600.0}  # only the watch can explain a prompt refusal


def status_with(url: str, token: str) -> int:
    return httpx.get(url + "/api/v1/sas", headers={"Authorization": f"Bearer {token}"}).status_code


def test_a_token_revoked_on_one_replica_is_refused_on_the_other_at_once(
    tmp_path: Path, etcd_server: EtcdServer
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        ApiStack(tmp_path / "a", etcd_endpoint=etcd_server.endpoint, api_settings=LONG_CACHE) as first,
        ApiStack(tmp_path / "b", etcd_endpoint=etcd_server.endpoint, api_settings=LONG_CACHE) as second,
        first.client() as admin,
    ):
        created = admin.post("/api/v1/tokens", json={"name": "ci", "scope": "operator"})
        assert created.status_code == 201
        token, token_id = created.json()["token"], created.json()["id"]
        assert status_with(second.url, token) == 200  # verified and cached by the second replica
        assert status_with(second.url, token) == 200
        assert admin.delete(f"/api/v1/tokens/{token_id}").status_code == 204
        wait_until(lambda: status_with(second.url, token) == 401, timeout=5, what="revoked on the other replica")


def test_a_token_rewritten_in_the_store_is_read_again(tmp_path: Path, etcd_server: EtcdServer) -> None:
    """A record changed behind the API (rotated bootstrap token, scope lowered by a restore)."""
    with ApiStack(tmp_path, etcd_endpoint=etcd_server.endpoint, api_settings=LONG_CACHE) as stack:
        token = stack.tokens["admin"]
        with stack.client() as admin:
            assert admin.get("/api/v1/tokens").status_code == 200
            listed = admin.get("/api/v1/tokens").json()["items"]
        token_id = next(item["id"] for item in listed if item["name"] == "test-admin")
        lowered = token_document("test-admin", Scope.READ_ONLY, token)

        async def lower() -> None:
            await stack.store.put(schema.api_token(token_id), json.dumps(lowered).encode())

        stack.run(lower)
        wait_until(
            lambda: (
                httpx.get(stack.url + "/api/v1/tokens", headers={"Authorization": f"Bearer {token}"}).status_code == 403
            ),
            timeout=5,
            what="the lowered scope applied",
        )


def test_a_cached_token_stops_at_its_expiry(tmp_path: Path, etcd_server: EtcdServer) -> None:
    with ApiStack(tmp_path, etcd_endpoint=etcd_server.endpoint, api_settings=LONG_CACHE) as stack:
        with stack.client() as admin:
            expires = time.time() + 1.5
            created = admin.post("/api/v1/tokens", json={"name": "short", "scope": "read-only", "expires_at": expires})
            assert created.status_code == 201, created.text
        token = created.json()["token"]
        assert status_with(stack.url, token) == 200  # cached now, with 600 s left on the cache
        wait_until(lambda: time.time() > expires, timeout=5, what="the expiry passed")
        assert status_with(stack.url, token) == 401
