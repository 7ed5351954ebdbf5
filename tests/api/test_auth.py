"""Every operation x {no token, wrong token, read-only, operator, admin}, from a declared scope table."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from tests.api.stack import ApiStack

# operationId -> the scope it needs ("public": no token). The test fails on an operation
# missing here, so a new endpoint must declare who may call it.
REQUIRED_SCOPE: dict[str, str] = {
    "healthz_healthz_get": "public",
    "readyz_readyz_get": "public",
    "list_connections": "read-only",
    "create_connection": "admin",
    "get_connection": "read-only",
    "replace_connection": "admin",
    "delete_connection": "admin",
    "list_children": "read-only",
    "get_child": "read-only",
    "replace_child": "admin",
    "delete_child": "admin",
    "apply_policy": "admin",
    "diff_policy": "read-only",
    "export_policy": "read-only",
    "check_flow": "read-only",
    "what_if": "read-only",
    "get_compiled_policy": "read-only",
    "list_sas": "read-only",
    "get_sa": "read-only",
    "initiate": "operator",
    "terminate_sa": "operator",
    "rekey_sa": "operator",
    "terminate_child_sa": "operator",
    "rekey_child_sa": "operator",
    "get_counters": "read-only",
    "get_sa_counters": "read-only",
    "list_nodes": "read-only",
    "get_node": "read-only",
    "stream_events": "read-only",
    "create_token": "admin",
    "list_tokens": "admin",
    "get_token": "admin",
    "revoke_token": "admin",
    "list_audit": "read-only",
    "list_flows": "read-only",
    "get_status": "read-only",
}
for kind, singular in (
    ("identities", "identity"),
    ("groups", "group"),
    ("sites", "site"),
    ("resources", "resource"),
    ("rules", "rule"),
):
    REQUIRED_SCOPE |= {
        f"list_{kind}": "read-only",
        f"create_{singular}": "admin",
        f"get_{singular}": "read-only",
        f"replace_{singular}": "admin",
        f"delete_{singular}": "admin",
    }
for path, singular in (("pools", "pool"), ("certificates", "certificate"), ("cas", "ca"), ("crls", "crl")):
    REQUIRED_SCOPE |= {
        f"list_{path}": "read-only",
        f"create_{singular}": "admin",
        f"get_{singular}": "read-only",
        f"replace_{singular}": "admin",
        f"delete_{singular}": "admin",
    }
RANK = {"read-only": 0, "operator": 1, "admin": 2}
PATH_VALUES = {"token_id": "0123456789ab", "sa_id": "ike-404", "child_sa": "child-404"}


def operations(stack: ApiStack) -> list[tuple[str, str, str]]:
    spec = httpx.get(stack.url + "/openapi.json").json()
    out = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            out.append((op["operationId"], method.upper(), path))
    return out


def expected(operation_id: str, caller: str) -> int | None:
    """The status a caller must get, or None for 'let through' (anything but 401/403/5xx)."""
    needed = REQUIRED_SCOPE[operation_id]
    if needed == "public":
        return None
    if caller in ("none", "wrong"):
        return 401
    return None if RANK[caller] >= RANK[needed] else 403


def test_scope_table_covers_every_operation(stack: ApiStack) -> None:
    ids = {op for op, _, _ in operations(stack)}
    assert ids - REQUIRED_SCOPE.keys() == set(), "operations without a declared scope"
    assert REQUIRED_SCOPE.keys() - ids == set(), "declared scopes of operations that do not exist"
    spec = httpx.get(stack.url + "/openapi.json").json()
    for ops in spec["paths"].values():
        for op in ops.values():
            declared = REQUIRED_SCOPE[op["operationId"]]
            assert op.get("x-required-scope", "public") == declared, op["operationId"]


@pytest.mark.parametrize("caller", ["none", "wrong", "read-only", "operator", "admin"])
def test_auth_matrix(stack: ApiStack, caller: str) -> None:
    headers: dict[str, str] = {}
    if caller == "wrong":
        headers["Authorization"] = "Bearer esp_0123456789ab_" + "A" * 43
    elif caller != "none":
        headers["Authorization"] = f"Bearer {stack.tokens[caller]}"
    wrong: list[str] = []
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        for operation_id, method, path in operations(stack):
            url = re.sub(r"\{(\w+)\}", lambda m: PATH_VALUES.get(m.group(1), "x404"), path)
            kwargs: dict[str, Any] = {"headers": headers}
            if method in ("POST", "PUT"):
                kwargs["json"] = {}
            if operation_id == "stream_events":
                kwargs["params"] = {"limit": 0}
                if expected(operation_id, caller) is None:
                    with client.stream(method, url, **kwargs) as response:
                        status = response.status_code
                    if status != 200:
                        wrong.append(f"{operation_id} {caller}: {status}")
                    continue
            response = client.request(method, url, **kwargs)
            want = expected(operation_id, caller)
            if want is None:
                ok = response.status_code not in (401, 403) and response.status_code < 500
            else:
                ok = response.status_code == want
                if ok and want == 401:
                    ok = response.headers.get("www-authenticate", "").startswith("Bearer")
            if ok and response.status_code >= 400:
                ok = response.headers["content-type"].startswith("application/problem+json")
            if not ok:
                wrong.append(
                    f"{operation_id} ({method} {url}) as {caller}: {response.status_code} {response.text[:200]}"
                )
    assert not wrong, "\n".join(wrong)


def test_auth_failures_are_rate_limited(tmp_path: Any) -> None:
    with (
        ApiStack(tmp_path, api_settings={"auth_failures_per_minute": 5}) as stack,
        httpx.Client(base_url=stack.url) as client,
    ):
        statuses = [
            client.get("/api/v1/connections", headers={"Authorization": "Bearer nope"}).status_code for _ in range(6)
        ]
        assert statuses == [401] * 5 + [429]
        blocked = client.get("/api/v1/connections", headers={"Authorization": f"Bearer {stack.tokens['admin']}"})
        assert blocked.status_code == 429
        assert blocked.headers["content-type"].startswith("application/problem+json")
        assert int(blocked.headers["retry-after"]) > 0


def test_revoked_token_is_refused_at_once(stack: ApiStack) -> None:
    with stack.client() as admin:
        created = admin.post("/api/v1/tokens", json={"name": "ci", "scope": "operator"})
        assert created.status_code == 201
        token = created.json()["token"]
        assert admin.get(f"/api/v1/tokens/{created.json()['id']}").json()["scope"] == "operator"
        mine = httpx.get(stack.url + "/api/v1/sas", headers={"Authorization": f"Bearer {token}"})
        assert mine.status_code == 200
        assert admin.delete(f"/api/v1/tokens/{created.json()['id']}").status_code == 204
        again = httpx.get(stack.url + "/api/v1/sas", headers={"Authorization": f"Bearer {token}"})
        assert again.status_code == 401
        listed = admin.get("/api/v1/tokens").json()["items"]
        assert all("hash" not in t and "salt" not in t and "token" not in t for t in listed)
