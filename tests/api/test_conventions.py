"""ETag/If-Match races, bad input (problems naming the field, store unchanged), secrets never shown."""

from __future__ import annotations

import datetime
import logging
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.api.stack import ApiStack

PSK = "psk-Zq8wV1mXr2Ls9Pt4Kd"
CONNECTION = {
    "remote_addrs": ["192.0.2.2"],
    "local": {"id": "gw1.example.com"},
    "remote": {"id": "gw2.example.com"},
    "children": {"net": {"local_ts": ["10.1.0.0/16"], "remote_ts": ["10.2.0.0/16"], "esp_proposals": ["aes256gcm16"]}},
}


def test_two_writers_with_one_etag_one_wins(stack: ApiStack) -> None:
    with stack.client() as client:
        created = client.put("/api/v1/connections/race", json={**CONNECTION, "psk": PSK})
        assert created.status_code in (200, 201)
        tag = created.headers["etag"]
    barrier = threading.Barrier(2)
    results: list[int] = []

    def writer(port: int) -> None:
        with stack.client() as client:
            body = {**CONNECTION, "remote_port": port}
            barrier.wait()
            results.append(client.put("/api/v1/connections/race", json=body, headers={"If-Match": tag}).status_code)

    threads = [threading.Thread(target=writer, args=(p,)) for p in (4500, 4501)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [200, 412]
    with stack.client() as client:
        final = client.get("/api/v1/connections/race")
        assert final.headers["etag"] != tag
        stale = client.delete("/api/v1/connections/race", headers={"If-Match": tag})
        assert stale.status_code == 412
        assert client.delete("/api/v1/connections/race", headers={"If-Match": final.headers["etag"]}).status_code == 204
        assert client.delete("/api/v1/connections/race").status_code == 404


def test_policy_objects_race_too(stack: ApiStack) -> None:
    with stack.client() as client:
        tag = client.put("/api/v1/groups/racers", json={"description": "v1"}).headers["etag"]
        first = client.put("/api/v1/groups/racers", json={"description": "v2"}, headers={"If-Match": tag})
        second = client.put("/api/v1/groups/racers", json={"description": "v3"}, headers={"If-Match": tag})
        assert (first.status_code, second.status_code) == (200, 412)
        again = client.put("/api/v1/groups/racers", json={"description": "v2"})
        assert again.status_code == 200 and again.json()["description"] == "v2"  # idempotent PUT


BAD_INPUTS: list[tuple[str, str, Any, str]] = [
    # (method, path, body (bytes: raw), field named in the problem)
    ("POST", "/api/v1/connections", b'{"name": "x", ', ""),
    ("POST", "/api/v1/connections", {"name": "bad", "local_port": "five hundred"}, "local_port"),
    ("POST", "/api/v1/connections", {"name": "bad", "colour": "blue"}, "colour"),
    ("POST", "/api/v1/connections", {"name": "bad", "remote_port": 70000}, "remote_port"),
    (
        "POST",
        "/api/v1/connections",
        {"name": "bad", "children": {"net": {"local_ts": ["10.0.0.0/33"]}}},
        "children.net.local_ts[0]",
    ),
    ("POST", "/api/v1/connections", {"name": "bad", "children": {"net": {"mode": "tunnnel"}}}, "children.net.mode"),
    ("POST", "/api/v1/connections", {"name": "bad", "proposals": ["bogus-x"]}, "proposals"),
    ("POST", "/api/v1/connections", {"name": "bad", "local": {"certs": ["missing"]}}, "local.certs[0]"),
    ("PUT", "/api/v1/connections/bad", {"fragment_size": 100}, "fragment_size"),
    ("POST", "/api/v1/identities", {"id": "bob", "groups": ["no-such-group"]}, "groups[0]"),
    ("POST", "/api/v1/identities", {"id": "bob", "kind": "robot"}, "kind"),
    ("POST", "/api/v1/resources", {"id": "r", "destination": "10.0.0.1", "site": "nowhere"}, "site"),
    ("POST", "/api/v1/pools", {"name": "p", "addrs": "10.0.0.0/40"}, "addrs"),
    ("POST", "/api/v1/tokens", {"name": "t", "scope": "root"}, "scope"),
    ("GET", "/api/v1/connections?limit=0", None, "query.limit"),
    ("GET", "/api/v1/connections?limt=5", None, "query.limt"),
    ("POST", "/api/v1/certificates", {"name": "c", "pem": "not a pem"}, "pem"),
]


@pytest.mark.parametrize(("method", "path", "body", "field"), BAD_INPUTS)
def test_bad_input_is_a_problem_naming_the_field(
    stack: ApiStack, method: str, path: str, body: Any, field: str
) -> None:
    before = stack.store_dump()
    with stack.client() as client:
        if isinstance(body, bytes):
            response = client.request(method, path, content=body, headers={"Content-Type": "application/json"})
        else:
            response = client.request(method, path, json=body)
    assert 400 <= response.status_code < 500, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["status"] == response.status_code
    if field:
        assert field in [e["field"] for e in problem["errors"]], problem
    assert stack.store_dump() == before


def test_oversized_body_is_413_and_changes_nothing(stack: ApiStack) -> None:
    before = stack.store_dump()
    with stack.client() as client:
        big = {
            "name": "big",
            "children": {f"c{i}": {"local_ts": ["10.0.0.0/8"] * 64} for i in range(64)} | {"x": "y" * 80_000},
        }
        response = client.post("/api/v1/connections", json=big)
        assert response.status_code == 413
        assert response.headers["content-type"].startswith("application/problem+json")

        def chunks() -> Any:
            for _ in range(100):
                yield b" " * 1024

        chunked = client.post("/api/v1/groups", content=chunks(), headers={"Content-Type": "application/json"})
        assert chunked.status_code == 413
    assert stack.store_dump() == before


def _certificate() -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gw1.example.com")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem


def test_secrets_never_come_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    cert_pem, key_pem = _certificate()
    key_body = key_pem.split("-----")[2].strip().splitlines()[1]  # a line of the key's base64
    seen: list[str] = []
    with ApiStack(tmp_path) as stack, stack.client() as client:

        def record(response: httpx.Response) -> httpx.Response:
            seen.append(response.text + str(response.headers))
            return response

        assert (
            record(client.post("/api/v1/connections", json={"name": "s", **CONNECTION, "psk": PSK})).status_code == 201
        )
        assert record(client.get("/api/v1/connections/s")).json()["psk"] == {"set": True}
        record(client.put("/api/v1/connections/s", json={**CONNECTION, "remote_port": 4500}))
        assert record(client.get("/api/v1/connections/s")).json()["psk"] == {"set": True}
        record(client.put("/api/v1/connections/s", json={**CONNECTION, "psk": PSK + "x"}))
        record(client.post("/api/v1/connections", json={"name": "s2", **CONNECTION, "psk": "short"}))
        created = record(
            client.post("/api/v1/certificates", json={"name": "gw1", "pem": cert_pem, "private_key": key_pem})
        )
        assert created.status_code == 201, created.text
        assert created.json()["private_key"] == {"set": True}
        record(client.get("/api/v1/certificates"))
        record(client.get("/api/v1/connections"))
        record(client.get("/api/v1/audit", params={"limit": 1000}))
        record(client.post("/api/v1/tokens", json={"name": "x", "scope": "admin"}))
        dump = stack.store_dump()
    for text in seen:
        assert PSK not in text and key_body not in text
    for value in dump.values():
        assert PSK.encode() not in value and key_body.encode() not in value
    journal = b"".join(p.read_bytes() for p in tmp_path.glob("audit.db*"))
    assert journal and PSK.encode() not in journal and key_body.encode() not in journal
    logs = "\n".join(r.getMessage() + str(r.args) for r in caplog.records)
    assert PSK not in logs and key_body not in logs
