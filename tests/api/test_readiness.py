"""/readyz: ready while the store answers; the other services' health is reported, not gating."""

from __future__ import annotations

import httpx

from tests.api.stack import ApiStack
from tests.conditions import wait_until


def test_a_service_down_is_reported_but_keeps_the_api_ready_and_its_calls_answer_503(fresh_stack: ApiStack) -> None:
    stack = fresh_stack
    ready = httpx.get(stack.url + "/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "ready": True,
        "checks": {"store": "SERVING", "keyexchange": "SERVING", "dataplane": "SERVING", "policy": "SERVING"},
    }

    with stack.client() as admin:
        gateway = {"remote_addrs": ["192.0.2.9"], "psk": "ready-secret-1"}
        assert admin.put("/api/v1/connections/gw", json=gateway).is_success
    keyexchange_server = stack.servers[1]
    stack.run(lambda: keyexchange_server.stop(0))
    wait_until(
        lambda: httpx.get(stack.url + "/readyz").json()["checks"]["keyexchange"].startswith("unreachable"),
        what="/readyz reports keyexchange unreachable",
    )
    ready = httpx.get(stack.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    with stack.client() as admin:
        # what does not need keyexchange still works; a call into it answers 503
        assert admin.put("/api/v1/groups/ops", json={"description": "operators"}).is_success
        assert admin.get("/api/v1/connections/gw").is_success
        started = admin.post("/api/v1/connections/gw/initiate", json={})
        assert started.status_code == 503 and started.headers["retry-after"] == "5"
        assert "keyexchange" in started.json()["detail"]


def test_the_store_down_makes_the_api_unready(fresh_stack: ApiStack) -> None:
    stack = fresh_stack
    stack.run(stack.store.close)
    ready = httpx.get(stack.url + "/readyz")
    assert ready.status_code == 503
    assert ready.json()["ready"] is False and ready.json()["checks"]["store"].startswith("unreachable")
