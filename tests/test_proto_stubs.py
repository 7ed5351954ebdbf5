"""The committed gRPC stubs are exactly what proto/generate.py makes from proto/esplanade/v1."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMMITTED = REPO / "lib" / "esplanade" / "v1"


def _generator() -> object:
    spec = importlib.util.spec_from_file_location("proto_generate", REPO / "proto" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_stubs_are_current(tmp_path: Path) -> None:
    generated = _generator().generate(tmp_path)  # type: ignore[attr-defined]
    fresh = {p.name: p.read_bytes() for p in generated}
    committed = {p.name: p.read_bytes() for p in COMMITTED.iterdir() if p.is_file()}
    stale = sorted(name for name in fresh.keys() | committed.keys() if fresh.get(name) != committed.get(name))
    assert not stale, f"stubs out of date, run `make proto`: {stale}"


def test_every_service_is_in_esplanade_v1() -> None:
    from esplanade.v1 import dataplane_pb2, keyexchange_pb2, policy_pb2

    services = {
        name for module in (dataplane_pb2, keyexchange_pb2, policy_pb2) for name in module.DESCRIPTOR.services_by_name
    }
    assert services == {"Dataplane", "KeyExchange", "Policy"}
    assert dataplane_pb2.DESCRIPTOR.package == "esplanade.v1"
