"""Store documents of policy objects: round trip, canonical bytes, and refusal of bad ones."""

from __future__ import annotations

import pytest

from esplanade.policy.decode import encode_document, object_from_document, object_to_document
from esplanade.policy.model import KIND_OF
from esplanade.policy.policy_file import load_policy_yaml
from esplanade.policy.problems import PolicyError
from tests.policy.test_diff import CURRENT


def test_every_object_round_trips_through_its_document() -> None:
    model = load_policy_yaml(CURRENT)
    for obj in model.objects():
        doc = object_to_document(obj)
        again = object_from_document(KIND_OF[type(obj)], doc, revision=42)
        assert again == obj and again.revision == 42


def test_documents_encode_canonically() -> None:
    assert encode_document({"b": 1, "a": [1, 2]}) == b'{"a":[1,2],"b":1}'


def test_bad_documents_name_every_problem() -> None:
    with pytest.raises(PolicyError) as info:
        object_from_document(
            "resources",
            {"id": "x", "destination": "10.0.0.0/8", "protocol": "tcp", "ports": [0, True, 70000], "site": 5},
        )
    assert [str(p) for p in info.value.problems] == [
        "ports[1]: resource 'x': invalid port 'True': use a number or a range like 8000-8080",
        "ports[2]: resource 'x': port 70000 is out of range (0-65535)",
        "site: resource 'x': 'site' must be a string",
    ]
    with pytest.raises(PolicyError):
        object_from_document("rules", ["not", "a", "mapping"])
    with pytest.raises(ValueError, match="unknown policy object kind"):
        object_from_document("widgets", {})
