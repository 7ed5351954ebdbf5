"""The key-handoff acknowledgement: timeouts fail the exchange cleanly; initiator rekeys
delete the old Child SA only once the new inbound SA is acknowledged."""

from __future__ import annotations

from esplanade.keyexchange.ikev2.constants import NotifyType
from esplanade.keyexchange.ikev2.events import (
    ChildSaDeleted,
    ChildSaEstablished,
    ChildSaRekeyed,
    IkeSaDeleted,
    InstallInboundSa,
    NegotiationFailed,
)
from tests.keyexchange.peers import pair


def test_ike_auth_without_ack_fails_cleanly() -> None:
    net, a, b = pair(install_timeout=5.0)
    b.auto_ack = False
    a.engine.initiate("ab", net.now)
    net.run()
    assert b.held_installs and not a.of(ChildSaEstablished)
    net.advance(5.1)
    failed = b.of(NegotiationFailed)
    assert failed and failed[0].notify == NotifyType.TEMPORARY_FAILURE
    assert "did not acknowledge" in failed[0].reason
    # the child whose inbound SA was handed over is announced gone (the shell removes it)
    assert [e.child_id for e in b.of(ChildSaDeleted)] == [b.held_installs[0].child_id]
    assert b.of(IkeSaDeleted) and not b.engine.sas
    # a late ack changes nothing
    b.engine.inbound_sa_installed(b.held_installs[0].ike_sa, b.held_installs[0].child_id, net.now)
    net.run()
    assert not a.of(ChildSaEstablished)


def test_create_child_without_ack_answers_temporary_failure() -> None:
    net, a, b = pair(install_timeout=5.0)
    ike = a.engine.initiate("ab", net.now)
    net.run()
    assert a.of(ChildSaEstablished)
    b.auto_ack = False
    child = a.of(ChildSaEstablished)[0].child_id
    a.engine.rekey_child(ike, child, net.now)
    net.run()
    assert len(b.held_installs) == 1
    net.advance(5.1)
    assert b.of(NegotiationFailed)[-1].notify == NotifyType.TEMPORARY_FAILURE
    new_child = b.held_installs[0].child_id
    assert new_child in [e.child_id for e in b.of(ChildSaDeleted)]
    # the IKE SA and the old Child SA stay; the initiator keeps its old SA and retries later
    assert len(b.engine.sas) == 1 and len(a.engine.sas) == 1
    assert not a.of(ChildSaRekeyed)
    assert child in a.engine.sas[ike].children and a.engine.sas[ike].children[child].state.value == "installed"
    b.auto_ack = True
    net.advance(6)
    assert a.of(ChildSaRekeyed)


def test_initiator_rekey_deletes_old_after_ack() -> None:
    net, a, b = pair(ack_initiator_installs=True)
    ike = a.engine.initiate("ab", net.now)
    net.run()
    old = a.of(ChildSaEstablished)[0].child_id
    a.engine.rekey_child(ike, old, net.now)
    net.run()
    rekeyed = a.of(ChildSaRekeyed)
    assert rekeyed and not a.of(ChildSaDeleted)  # the old SA stays until the new one is installed
    a.engine.inbound_sa_installed(ike, rekeyed[0].new_child_id, net.now)
    net.run()
    assert [e.child_id for e in a.of(ChildSaDeleted)] == [old]
    assert [e.child_id for e in b.of(ChildSaDeleted)] == [b.of(ChildSaEstablished)[0].child_id]


def test_initiator_rekey_without_ack_deletes_old_at_timeout() -> None:
    net, a, _b = pair(ack_initiator_installs=True, install_timeout=3.0)
    ike = a.engine.initiate("ab", net.now)
    net.run()
    old = a.of(ChildSaEstablished)[0].child_id
    a.engine.rekey_child(ike, old, net.now)
    net.run()
    assert not a.of(ChildSaDeleted)
    net.advance(3.1)
    assert [e.child_id for e in a.of(ChildSaDeleted)] == [old]
    assert a.engine.counters.get("dropped_internal_errors", 0) == 0


def test_install_event_ids_have_no_slash() -> None:
    net, a, b = pair(id_prefix="kx1-")
    a.engine.initiate("ab", net.now)
    net.run()
    ev = b.of(ChildSaEstablished)[0]
    assert ev.ike_sa.startswith("kx1-ike-") and "/" not in ev.child_id
    assert isinstance(b.of(InstallInboundSa)[0], InstallInboundSa)
