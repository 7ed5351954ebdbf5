"""A Child SA crosses the dataplane's gRPC API whole: what governs it (`governed_by`) too, so a
manually installed governed SA fails closed like a negotiated one when its identity goes."""

from __future__ import annotations

import dataclasses

from esplanade.dataplane.proto_mapping import child_sa_from_proto, child_sa_to_proto
from tests.dataplane.child_sa_records import record


def test_a_child_sa_round_trips_with_keys_and_governed_by() -> None:
    governed = dataclasses.replace(record("manual", 0x1000), identity="alice", governed_by="alice")
    back = child_sa_from_proto(child_sa_to_proto(governed, with_keys=True))
    assert back == governed
    assert back.governed_by == "alice"


def test_a_message_without_governed_by_reads_as_not_governed() -> None:
    message = child_sa_to_proto(record("older", 0x2000), with_keys=True)
    message.ClearField("governed_by")
    assert child_sa_from_proto(message).governed_by == ""
