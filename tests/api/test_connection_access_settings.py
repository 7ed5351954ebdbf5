"""The connection settings of the access policy through the API: `access_narrowing` and
`unbound_peers` are written, shown back, validated, and reach keyexchange's connection config."""

from __future__ import annotations

import json

import pytest

from esplanade.keyexchange.connection_documents import connection_config
from esplanade.store import schema
from tests.api.stack import ApiStack

CONNECTION = {
    "remote_addrs": ["%any"],
    "local": {"id": "gw.example.com"},
    "remote": {"id": "%any"},
    "proposals": ["aes256gcm16-prfsha256-ecp256"],
    "children": {"net": {"local_ts": ["10.1.0.0/16"], "remote_ts": ["0.0.0.0/0"], "esp_proposals": ["aes256gcm16"]}},
    "psk": "psk-Zq8wV1mXr2Ls9Pt4Kd",
}


def test_access_settings_round_trip_and_reach_the_connection_config(stack: ApiStack) -> None:
    with stack.client() as client:
        body = {**CONNECTION, "access_narrowing": "networks", "unbound_peers": "negotiated"}
        assert client.put("/api/v1/connections/rw-settings", json=body).status_code in (200, 201)
        shown = client.get("/api/v1/connections/rw-settings").json()
        assert (shown["access_narrowing"], shown["unbound_peers"]) == ("networks", "negotiated")

        default = client.put("/api/v1/connections/rw-default", json=CONNECTION)
        assert default.status_code in (200, 201)
        assert client.get("/api/v1/connections/rw-default").json()["access_narrowing"] == "exact"

    stored = stack.store_dump(schema.prefix("config"))
    (document,) = [json.loads(v) for k, v in stored.items() if k.endswith("/rw-settings")]
    document["psk"] = str(CONNECTION["psk"]).encode()  # sealed at rest; keyexchange opens it
    config = connection_config("rw-settings", document, pools={})
    assert (config.access_narrowing, config.unbound_peers) == ("networks", "negotiated")


@pytest.mark.parametrize(("field", "value"), [("access_narrowing", "loose"), ("unbound_peers", "allow")])
def test_bad_access_settings_are_problems_naming_the_field(stack: ApiStack, field: str, value: str) -> None:
    with stack.client() as client:
        response = client.put("/api/v1/connections/rw-bad", json={**CONNECTION, field: value})
        assert response.status_code == 422
        assert field in response.text
        assert client.get("/api/v1/connections/rw-bad").status_code == 404
