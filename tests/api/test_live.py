"""Live operations against the fake keyexchange/dataplane, and the SSE event stream."""

from __future__ import annotations

import json
import threading

import httpx

from tests.api.stack import ApiStack
from tests.conditions import wait_until


def test_initiate_terminate_and_events(fresh_stack: ApiStack) -> None:
    stack = fresh_stack
    events: list[dict[str, object]] = []
    ready = threading.Event()

    def follow() -> None:
        headers = {"Authorization": f"Bearer {stack.tokens['read-only']}"}
        with httpx.stream(
            "GET",
            stack.url + "/api/v1/events",
            params={"limit": 4, "sources": "keyexchange,policy"},
            headers=headers,
            timeout=30,
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            for line in response.iter_lines():
                if line.startswith(": connected"):
                    ready.set()
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))

    follower = threading.Thread(target=follow)
    follower.start()
    assert ready.wait(10)
    wait_until(lambda: stack.keyexchange.watchers, what="the API subscribed to keyexchange events")
    with stack.client() as admin, stack.client("operator") as operator:
        admin.put("/api/v1/connections/live", json={"remote_addrs": ["192.0.2.9"], "psk": "live-secret-123"})
        started = operator.post("/api/v1/connections/live/initiate", json={})
        assert started.status_code == 202
        location = started.headers["location"]
        sa = operator.get(location).json()
        assert sa["state"] == "ESTABLISHED" and sa["children"][0]["bytes_out"] > 0
        assert operator.get(f"{location}/counters").json()["sas"]
        assert operator.post(f"{location}/terminate").status_code == 202
        assert operator.get(location).status_code == 404
    follower.join(15)
    kinds = [e["kind"] for e in events]
    assert "ike_up" in kinds and "child_up" in kinds and "ike_down" in kinds, kinds
