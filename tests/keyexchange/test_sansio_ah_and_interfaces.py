"""AH Child SAs (RFC 4302 negotiated per RFC 7296 §3.3), ESN and XFRM interface ids, in memory.

AH has no encryption transform: KEYMAT holds only the integrity keys, the records carry
protocol AH (never UDP-encapsulated), DELETE and REKEY_SA name protocol AH. `if_id_in` /
`if_id_out` of a child end up on its inbound / outbound SA for route-based VPNs.
"""

from __future__ import annotations

import pytest

from esplanade.ipsec.transforms import INTEG_HMAC_SHA2_256_128, IpProto, ProtocolId
from esplanade.keyexchange.config import ConfigError, ConnectionConfig
from esplanade.keyexchange.ikev2.events import ChildSaDeleted, ChildSaEstablished, ChildSaRekeyed, InstallInboundSa
from esplanade.keyexchange.ikev2.proposals import ProposalSpec, ProposalSyntaxError
from tests.keyexchange.peers import conn, pair

AH = {"child_esp_proposals": None, "child_ah_proposals": ["sha256"]}


def test_ah_proposal_strings() -> None:
    spec = ProposalSpec.parse("sha256-sha384-esn", ProtocolId.AH)
    assert spec.encr == () and len(spec.integ) == 2
    for bad in ("aes128-sha256", "esn", "sha256-prfsha256"):
        with pytest.raises(ProposalSyntaxError):
            ProposalSpec.parse(bad, ProtocolId.AH)
    with pytest.raises(ConfigError, match="ah_proposals"):
        ConnectionConfig.from_dict("x", conn("a", child_ah_proposals=["sha256"]))  # esp_proposals too


def test_ah_child_sa_established_rekeyed_and_deleted() -> None:
    net, a, b = pair(a_over=AH, b_over=AH)
    ike = a.engine.initiate("ab", net.now)
    net.run()
    (est_a,), (est_b,) = a.of(ChildSaEstablished), b.of(InstallInboundSa)
    for record in (est_a.record, est_b.record):
        for sa in (record.inbound, record.outbound):
            assert (sa.protocol, sa.encr, sa.integ) == (IpProto.AH, None, INTEG_HMAC_SHA2_256_128)
            assert sa.encap is None and len(sa.integ_key) == 32
            sa.validate()
    assert est_a.record.outbound.integ_key == est_b.record.inbound.integ_key
    assert est_a.record.inbound.integ_key == est_b.record.outbound.integ_key
    a.engine.rekey_child(ike, est_a.child_id, net.now)
    net.run()
    (rekeyed,) = a.of(ChildSaRekeyed)
    assert rekeyed.record.outbound.protocol == IpProto.AH
    # the peer only honours a DELETE (and a REKEY_SA) that names the protocol of its SA
    assert [e.child_id for e in a.of(ChildSaDeleted)] == [est_a.child_id]
    assert len(b.of(ChildSaDeleted)) == 1 and len(b.of(InstallInboundSa)) == 2
    a.engine.delete_child(ike, rekeyed.new_child_id, net.now)
    net.run()
    assert len(a.of(ChildSaDeleted)) == 2 and len(b.of(ChildSaDeleted)) == 2


def test_ah_against_esp_only_is_no_proposal_chosen() -> None:
    net, a, b = pair(a_over=AH)
    a.engine.initiate("ab", net.now)
    net.run()
    assert not a.of(ChildSaEstablished) and not b.of(InstallInboundSa)


def test_esn_and_interface_ids_reach_the_records() -> None:
    over = {"child_esp_proposals": ["aes256gcm16-esn"], "child_if_id_in": 42, "child_if_id_out": 43}
    net, a, b = pair(a_over=over, b_over={"child_esp_proposals": ["aes256gcm16-esn"]})
    a.engine.initiate("ab", net.now)
    net.run()
    (est,) = a.of(ChildSaEstablished)
    assert est.record.inbound.esn and est.record.outbound.esn
    assert (est.record.inbound.if_id, est.record.outbound.if_id) == (42, 43)
    (peer,) = b.of(InstallInboundSa)
    assert peer.record is not None and peer.record.inbound.if_id == 0
    with pytest.raises(ConfigError, match="if_id_in"):
        ConnectionConfig.from_dict("x", conn("a", child_if_id_in=-1))
