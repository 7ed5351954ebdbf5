"""The sans-IO ESP/AH engine of the dataplane (RFC 4303, 4302, 3948, 4106, 7634, 3602, 4868).

Modules: `sa_state` (per-SA state), `cipher_suites` (transforms), `replay` (anti-replay
window), `esp_codec` / `ah` (encapsulation), `natt` (ESP-in-UDP), `packet` (parsing),
`ip_headers` (outer headers, transport-mode placement), `spd` (policy lookup, SPI table),
`events`, `counters`, `engine` (the per-packet and batch entry points).
"""

from esplanade.dataplane.esp.counters import DropReason, TrafficCounters
from esplanade.dataplane.esp.engine import (
    decrypt,
    decrypt_batch,
    decrypt_demux_batch,
    encrypt,
    encrypt_batch,
    make_dummy,
    protect,
    protect_batch,
    unprotect,
    unprotect_batch,
)
from esplanade.dataplane.esp.events import (
    EspEvent,
    ExpiryReason,
    HardExpire,
    PersistReplayFloor,
    ReserveSequence,
    SequenceExhausted,
    SoftExpire,
)
from esplanade.dataplane.esp.natt import UdpPayloadKind, classify_udp_payload, nat_keepalive
from esplanade.dataplane.esp.packet import FlowKey, parse_flow
from esplanade.dataplane.esp.sa_state import InboundSa, OutboundSa, ReplayPersistence, SequenceReservation
from esplanade.dataplane.esp.spd import InboundSaTable, Spd, SpdDecision

__all__ = [
    "DropReason",
    "EspEvent",
    "ExpiryReason",
    "FlowKey",
    "HardExpire",
    "InboundSa",
    "InboundSaTable",
    "OutboundSa",
    "PersistReplayFloor",
    "ReplayPersistence",
    "ReserveSequence",
    "SequenceExhausted",
    "SequenceReservation",
    "SoftExpire",
    "Spd",
    "SpdDecision",
    "TrafficCounters",
    "UdpPayloadKind",
    "classify_udp_payload",
    "decrypt",
    "decrypt_batch",
    "decrypt_demux_batch",
    "encrypt",
    "encrypt_batch",
    "make_dummy",
    "nat_keepalive",
    "parse_flow",
    "protect",
    "protect_batch",
    "unprotect",
    "unprotect_batch",
]
