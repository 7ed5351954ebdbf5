"""Connection configuration: swanctl-like parsing, proposal strings, errors that name the field."""

from __future__ import annotations

import pytest

from esplanade.ipsec.transforms import ENCR_AES_CBC_256, ENCR_CHACHA20_POLY1305, KeId, PrfId, ProtocolId, TransformType
from esplanade.keyexchange.config import ConnectionConfig
from esplanade.keyexchange.ikev2.errors import ConfigError
from esplanade.keyexchange.ikev2.proposals import ProposalSpec, ProposalSyntaxError, select
from tests.keyexchange.peers import conn


def test_proposal_strings() -> None:
    p = ProposalSpec.parse("aes256-sha256-modp2048", ProtocolId.IKE)
    assert p.encr == (ENCR_AES_CBC_256,) and p.prf == (PrfId.HMAC_SHA2_256,) and p.ke == (KeId.MODP2048,)
    c = ProposalSpec.parse("chacha20poly1305-prfsha256-x25519", ProtocolId.IKE)
    assert c.encr == (ENCR_CHACHA20_POLY1305,) and c.ke == (KeId.CURVE25519,) and not c.integ
    q = ProposalSpec.parse("aes256gcm16-prfsha256-ecp256-ke1_mlkem768", ProtocolId.IKE)
    assert q.additional_ke == ((TransformType.ADDKE1, (KeId.ML_KEM_768,)),)
    e = ProposalSpec.parse("aes256gcm16-ecp256", ProtocolId.ESP)
    assert e.ke == (KeId.ECP256,) and e.prf == ()


@pytest.mark.parametrize(
    ("text", "msg"),
    [
        ("aes256gcm16-sha256-prfsha256-ecp256", "AEAD"),
        ("aes256-prfsha256-ecp256", "integrity"),
        ("aes256gcm16-prfsha256", "key exchange"),
        ("aes256gcm16-ecp256", "PRF"),
        ("blowfish-sha256-modp2048", "unknown algorithm 'blowfish'"),
        ("aes256gcm16-prfsha256-ecp256-ke9_mlkem768", "ke1..ke7"),
    ],
)
def test_bad_proposals(text: str, msg: str) -> None:
    with pytest.raises(ProposalSyntaxError, match=msg):
        ProposalSpec.parse(text, ProtocolId.IKE)


def test_pq_config_adds_classic_fallback() -> None:
    cfg = ConnectionConfig.from_dict("c", conn("a", proposals=["aes256gcm16-prfsha256-ecp256-ke1_mlkem768"]))
    assert len(cfg.proposals) == 2
    assert cfg.proposals[0].additional_ke and not cfg.proposals[1].additional_ke
    # a peer that knows no ADDKE transforms (strongSwan 5.9.8) can still pick the classic one
    classic_only = ProposalSpec.parse("aes256gcm16-prfsha256-ecp256", ProtocolId.IKE)
    offered = [p.to_proposal(i + 1, b"") for i, p in enumerate(cfg.proposals)]
    suite = select(offered[1:], [classic_only])
    assert suite is not None and suite.number == 2


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"proposals": ["aes256gcm16"]}, "connections.c.proposals"),
        ({"version": 1}, "connections.c.version"),
        ({"local_addrs": ["not-an-ip"]}, "connections.c.local_addrs"),
        ({"child_rekey_time": "1h", "child_life_time": "30m"}, "connections.c.children.net.life_time"),
        ({"child_mode": "beet"}, "connections.c.children.net.mode"),
        ({"child_esp_proposals": ["aes256gcm16-sha256"]}, "connections.c.children.net.esp_proposals"),
        ({"child_local_ts": "10.0.0.0/33"}, "connections.c.children.net.local_ts"),
        ({"dpd_delay": "soon"}, "connections.c.dpd_delay"),
        ({"psk": ""}, "connections.c.psk"),
        ({"pools": ["nope"]}, "connections.c.pools"),
        ({"mobike": True}, "connections.c.mobike"),
        ({"surprise": 1}, "connections.c.surprise"),
        ({"fragment_size": 100}, "connections.c.fragment_size"),
    ],
)
def test_config_errors_name_the_field(over: dict, field: str) -> None:
    with pytest.raises(ConfigError) as exc:
        ConnectionConfig.from_dict("c", conn("a", **over))
    assert exc.value.field == field


def test_durations_and_defaults() -> None:
    cfg = ConnectionConfig.from_dict("c", conn("a", dpd_delay="30s", rekey_time="2h", child_rekey_time="20m"))
    assert cfg.dpd_delay == 30 and cfg.rekey_time == 7200 and cfg.over_time == 720
    child = cfg.child("net")
    assert child.rekey_time == 1200 and child.life_time == pytest.approx(1320) and child.rand_time == pytest.approx(120)


def test_secrets_never_in_repr() -> None:
    cfg = ConnectionConfig.from_dict("c", conn("a"))
    assert b"in-memory-test-psk" not in repr(cfg).encode()
    assert "in-memory-test-psk" not in repr(cfg)
