"""An IKE SA moves to another dispatcher (another keyexchange instance) through `to_state` /
`from_state` and goes on: rekeys and DPD from either side, message IDs intact."""

from __future__ import annotations

import json
import random

import pytest

from esplanade.keyexchange.config import ConnectionConfig
from esplanade.keyexchange.ikev2.dispatcher import IkeDispatcher
from esplanade.keyexchange.ikev2.events import ChildSaRekeyed, IkeSaDeleted, IkeSaRekeyed
from esplanade.keyexchange.ikev2.ike_sa import IkeSa, IkeState
from esplanade.keyexchange.ikev2.ike_sa_state import IV_COUNTER_SKIP, NotQuiescent, StateError
from esplanade.store.sealing import Keyring, Sealer
from tests.keyexchange.memnet import MemNet, Node
from tests.keyexchange.peers import assert_children_paired, conn, established

WALL = 1_700_000_000.0


def plain_seal(field: str, value: bytes) -> str:
    return value.hex()


def plain_open(field: str, value: str) -> bytes:
    return bytes.fromhex(value)


def move(net: MemNet, node: Node, side: str) -> IkeSa:
    """Capture the node's IKE SA, forget it there, restore it into a fresh dispatcher that replaces the node's."""
    old_engine = node.engine
    sa = next(iter(old_engine.sas.values()))
    document = json.loads(json.dumps(sa.to_state(net.now, WALL, plain_seal)))
    old_engine.release(sa.id)
    assert not old_engine.sas
    config = ConnectionConfig.from_dict("ab", conn(side))
    successor = IkeDispatcher([config], rng=random.Random(7), now=net.now, id_prefix="other-")
    restored = IkeSa.from_state(document, config, successor.hooks, net.now + 5, WALL + 5, plain_open)
    successor.adopt(restored, net.now)
    node.engine = successor
    assert restored.next_request_id == sa.next_request_id and restored.next_peer_id == sa.next_peer_id
    assert restored.keys == sa.keys and restored.children.keys() == sa.children.keys()
    return restored


@pytest.mark.parametrize("moved", ["a", "b"])
@pytest.mark.parametrize("starter", ["a", "b"])
def test_a_moved_ike_sa_rekeys_its_child_and_itself_from_either_side(moved: str, starter: str) -> None:
    net, a, b, _ike, _child = established()
    node = a if moved == "a" else b
    restored = move(net, node, moved)
    x = a if starter == "a" else b
    sa = next(iter(x.engine.sas.values()))
    x.engine.rekey_child(sa.id, next(iter(sa.children)), net.now)
    net.run()
    assert len(a.of(ChildSaRekeyed)) == 1 and len(b.of(ChildSaRekeyed)) == 1
    assert_children_paired(a, b)
    sa = next(iter(x.engine.sas.values()))
    x.engine.rekey_ike(sa.id, net.now)
    net.run()
    for n in (a, b):
        assert n.of(IkeSaRekeyed) and n.of(IkeSaDeleted)
        assert len(n.engine.sas) == 1
        assert next(iter(n.engine.sas.values())).state == IkeState.ESTABLISHED
    assert_children_paired(a, b)
    assert restored.state == IkeState.DELETED  # replaced by its rekeyed successor


def test_dpd_after_a_move_keeps_the_message_ids_and_never_reuses_an_sk_iv() -> None:
    net, a, b, _ike, _child = established()
    before = next(iter(a.engine.sas.values()))
    sent_iv = before.out_cipher.iv_counter if before.out_cipher else 0
    restored = move(net, a, "a")
    assert restored.out_cipher is not None and restored.out_cipher.iv_counter == sent_iv + IV_COUNTER_SKIP
    peer = next(iter(b.engine.sas.values()))
    peer_expects = peer.next_peer_id
    a.engine.dpd(restored.id, net.now)
    net.run()
    assert peer.next_peer_id == peer_expects + 1  # the peer accepted our next message ID
    assert restored.state == IkeState.ESTABLISHED and restored.outstanding is None
    b.engine.dpd(peer.id, net.now)  # and the peer's requests are answered in order
    net.run()
    assert peer.outstanding is None and restored.next_peer_id == peer.next_request_id


def test_the_document_round_trips_and_holds_no_key_bytes() -> None:
    net, a, _b, _ike, _child = established()
    sa = next(iter(a.engine.sas.values()))
    sealer = Sealer(Keyring.generate()).bind("/esplanade/v1/sas/ike/x")
    document = sa.to_state(net.now, WALL, sealer.seal)
    text = json.dumps(document)
    assert sa.keys is not None
    for secret in (sa.keys.sk_d, sa.keys.sk_ei, sa.keys.sk_pr, next(iter(sa.children.values())).keys.encr_i):
        assert secret.hex() not in text
    config = ConnectionConfig.from_dict("ab", conn("a"))
    successor = IkeDispatcher([config], rng=random.Random(7), now=net.now)
    restored = IkeSa.from_state(json.loads(text), config, successor.hooks, net.now, WALL, sealer.open)
    again = restored.to_state(net.now, WALL, sealer.seal)
    assert restored.keys == sa.keys
    assert again["iv_counters"][0] == document["iv_counters"][0] + IV_COUNTER_SKIP
    strip = {"keys", "children", "iv_counters"}  # sealed fields carry fresh nonces each time
    assert {k: v for k, v in again.items() if k not in strip} == {k: v for k, v in document.items() if k not in strip}
    assert [c["spi_in"] for c in again["children"]] == [c["spi_in"] for c in document["children"]]


def test_mid_exchange_and_malformed_states_are_refused() -> None:
    net, a, _b, _ike, _child = established()
    sa = next(iter(a.engine.sas.values()))
    a.engine.dpd(sa.id, net.now)  # request in flight
    with pytest.raises(NotQuiescent):
        sa.to_state(net.now, WALL, plain_seal)
    net.run()
    document = sa.to_state(net.now, WALL, plain_seal)
    config = ConnectionConfig.from_dict("ab", conn("a"))
    successor = IkeDispatcher([config], rng=random.Random(7), now=net.now)
    for broken in ({**document, "version": 99}, {**document, "suite": {"transforms": []}}, {"id": "x"}):
        with pytest.raises(StateError):
            IkeSa.from_state(broken, config, successor.hooks, net.now, WALL, plain_open)
    other = ConnectionConfig.from_dict("other", conn("a"))
    with pytest.raises(StateError):
        IkeSa.from_state(document, other, successor.hooks, net.now, WALL, plain_open)
