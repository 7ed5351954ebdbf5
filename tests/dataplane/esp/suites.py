"""SA pairs for the tests: every transform, with the matching scapy names."""

from __future__ import annotations

from dataclasses import dataclass

from esplanade.ipsec.sa import SecurityAssociation, UdpEncap
from esplanade.ipsec.selectors import TrafficSelector
from esplanade.ipsec.transforms import (
    ENCR_AES_CBC_128,
    ENCR_AES_CBC_256,
    ENCR_AES_GCM_16_128,
    ENCR_AES_GCM_16_256,
    ENCR_CHACHA20_POLY1305,
    ENCR_NULL,
    INTEG_HMAC_SHA2_256_128,
    INTEG_HMAC_SHA2_384_192,
    INTEG_HMAC_SHA2_512_256,
    Direction,
    EncrAlgorithm,
    IntegAlgorithm,
    IpProto,
    Mode,
)


@dataclass(frozen=True)
class Suite:
    name: str
    protocol: IpProto
    encr: EncrAlgorithm | None
    integ: IntegAlgorithm | None
    scapy_crypt: str | None
    scapy_auth: str | None

    @property
    def encr_key_bytes(self) -> int:
        return self.encr.keymat_bytes if self.encr else 0

    @property
    def integ_key_bytes(self) -> int:
        return self.integ.key_bytes if self.integ else 0


_SCAPY_AUTH = {
    INTEG_HMAC_SHA2_256_128: "SHA2-256-128",
    INTEG_HMAC_SHA2_384_192: "SHA2-384-192",
    INTEG_HMAC_SHA2_512_256: "SHA2-512-256",
}
_HMACS = (INTEG_HMAC_SHA2_256_128, INTEG_HMAC_SHA2_384_192, INTEG_HMAC_SHA2_512_256)

ESP_SUITES = [
    Suite("aes128gcm16", IpProto.ESP, ENCR_AES_GCM_16_128, None, "AES-GCM", None),
    Suite("aes256gcm16", IpProto.ESP, ENCR_AES_GCM_16_256, None, "AES-GCM", None),
    Suite("chacha20poly1305", IpProto.ESP, ENCR_CHACHA20_POLY1305, None, "CHACHA20-POLY1305", None),
    *(
        Suite(f"{e.name}-{i.name}", IpProto.ESP, e, i, "AES-CBC", _SCAPY_AUTH[i])
        for e in (ENCR_AES_CBC_128, ENCR_AES_CBC_256)
        for i in _HMACS
    ),
    *(Suite(f"null-{i.name}", IpProto.ESP, ENCR_NULL, i, "NULL", _SCAPY_AUTH[i]) for i in _HMACS),
]
AH_SUITES = [Suite(f"ah-{i.name}", IpProto.AH, None, i, None, _SCAPY_AUTH[i]) for i in _HMACS]
SUITES = {s.name: s for s in ESP_SUITES + AH_SUITES}

ADDRESSES = {4: ("192.0.2.1", "198.51.100.2"), 6: ("2001:db8::1", "2001:db8:ffff::2")}


def sa_pair(
    suite: Suite,
    *,
    encr_key: bytes,
    integ_key: bytes,
    spi: int = 0x1000,
    mode: Mode = Mode.TUNNEL,
    version: int = 4,
    esn: bool = False,
    natt: bool = False,
    replay_window: int = 64,
    local_ts: tuple[TrafficSelector, ...] = (),
    remote_ts: tuple[TrafficSelector, ...] = (),
    **extra: object,
) -> tuple[SecurityAssociation, SecurityAssociation]:
    """(outbound at A, inbound at B) of one SA from A to B."""
    a, b = ADDRESSES[version]
    common: dict[str, object] = {
        "spi": spi,
        "protocol": suite.protocol,
        "mode": mode,
        "encr": suite.encr,
        "encr_key": encr_key,
        "integ": suite.integ,
        "integ_key": integ_key,
        "esn": esn,
        "encap": UdpEncap() if natt else None,
        "replay_window": replay_window,
        **extra,
    }
    out = SecurityAssociation(
        direction=Direction.OUT,
        src=a,
        dst=b,
        local_ts=local_ts,
        remote_ts=remote_ts,
        **common,  # type: ignore[arg-type]
    )
    inb = SecurityAssociation(
        direction=Direction.IN,
        src=a,
        dst=b,
        local_ts=remote_ts,
        remote_ts=local_ts,
        **common,  # type: ignore[arg-type]
    )
    return out, inb
