"""The failure limit and the audit trail see the real client behind a trusted reverse proxy,
and only there: from any other peer X-Forwarded-For is ignored, so a client cannot pick the
address it is limited by."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from tests.api.stack import ApiStack

LIMIT = {"auth_failures_per_minute": 3}


def failed_statuses(url: str, forwarded_for: str, attempts: int) -> list[int]:
    headers = {"Authorization": "Bearer nope", "X-Forwarded-For": forwarded_for}
    return [httpx.get(url + "/api/v1/connections", headers=headers).status_code for _ in range(attempts)]


def test_behind_a_trusted_proxy_each_client_has_its_own_failure_limit(tmp_path: Path) -> None:
    with ApiStack(tmp_path, api_settings={**LIMIT, "trusted_proxies": ["127.0.0.0/8"]}) as stack:
        assert failed_statuses(stack.url, "203.0.113.5", 4) == [401, 401, 401, 429]
        assert failed_statuses(stack.url, "198.51.100.7", 1) == [401]  # another client: not blocked
        with stack.client() as admin:
            forwarded = {"X-Forwarded-For": "198.51.100.9"}
            created = admin.post("/api/v1/tokens", json={"name": "ci", "scope": "read-only"}, headers=forwarded)
            assert created.status_code == 201  # a change: audited, with the client's address
            records = admin.get("/api/v1/audit", params={"limit": 1000}).json()["items"]
    assert any(r.get("source") == "198.51.100.9" for r in records), json.dumps(records[-3:])


def test_from_an_untrusted_peer_forwarded_headers_are_ignored(tmp_path: Path) -> None:
    with ApiStack(tmp_path, api_settings={**LIMIT, "trusted_proxies": ["192.0.2.0/24"]}) as stack:
        assert failed_statuses(stack.url, "203.0.113.5", 3) == [401, 401, 401]
        # a new X-Forwarded-For does not buy a fresh limit: the peer itself is limited
        assert failed_statuses(stack.url, "198.51.100.7", 1) == [429]
