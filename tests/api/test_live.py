"""Live operations against the fake keyexchange/dataplane, and the SSE event stream."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx

from tests.api.stack import ApiStack
from tests.conditions import wait_until


def test_initiate_terminate_and_events_and_the_stream_ends_at_shutdown(tmp_path: Path) -> None:
    events: list[dict[str, object]] = []
    comments: list[str] = []
    ready = threading.Event()
    with ApiStack(tmp_path) as stack:

        def follow() -> None:
            headers = {"Authorization": f"Bearer {stack.tokens['read-only']}"}
            with httpx.stream(
                "GET",
                stack.url + "/api/v1/events",
                params={"sources": "keyexchange,policy"},
                headers=headers,
                timeout=30,
            ) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                for line in response.iter_lines():
                    if line.startswith(":"):
                        comments.append(line)
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
        wait_until(
            lambda: {"ike_up", "child_up", "ike_down"} <= {e["kind"] for e in events},
            what="ike_up, child_up and ike_down on the stream",
        )
        # the stream is still open here: shutting the server down must end it, not wait for it
    follower.join(10)
    assert not follower.is_alive()
    assert comments[-1] == ": server stopping", comments
    assert stack.server.lifespan.shutdown_event.is_set() and not stack.server.lifespan.error_occurred
