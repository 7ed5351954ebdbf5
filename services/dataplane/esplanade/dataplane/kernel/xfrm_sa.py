"""Kernel SAs: `SecurityAssociation` -> `XfrmSa` -> `xfrm_usersa_info` (and back from dumps).

`XfrmSa` is the exact content of one kernel SA as Esplanade programs it, in plain Python
values. `to_message()` builds the XFRM_MSG_NEWSA/UPDSA request; `from_message()` decodes a
GETSA/dump reply into the same type, so "what went in" and "what the kernel holds" compare
with `==`. Keys are `repr=False` and never part of error messages.

Mapping decisions (the same KEYMAT layout as the userspace engine, so the wire matches):
- AEAD (AES-GCM-16, ChaCha20-Poly1305): XFRMA_ALG_AEAD, key = `encr_key` (cipher key ||
  4-byte salt, RFC 4106 §8.1 / RFC 7634 §2), ICV 128 bits.
- AES-CBC and NULL: XFRMA_ALG_CRYPT with `encr_key` (NULL: no key) plus
  XFRMA_ALG_AUTH_TRUNC with `integ_key` and the RFC truncation (128/192/256 bits).
- AH: XFRMA_ALG_AUTH_TRUNC only.
- Anti-replay: windows up to 32 packets without ESN use the legacy `replay_window` byte;
  ESN or larger windows use XFRMA_REPLAY_ESN_VAL (bitmap up to 4096 packets), as strongSwan
  does. The kernel (6.1) requires a non-zero window with ESN even on outbound SAs, so an
  outbound ESN SA with window 0 gets 32 (the sender never checks it).
- Tunnel mode: selector left unspecified with XFRM_STATE_AF_UNSPEC, so one SA carries
  IPv4 and IPv6 inner traffic. Transport mode: the selector of the one traffic-selector
  pair when there is exactly one and it fits one kernel selector, else "any" of the family.
- Lifetimes: 0 ("no limit") is XFRM_INF for bytes and packets and 0 for seconds. Seconds
  count from `created_at`: an SA installed late (restart, failover) gets what is left.
- ESP-in-UDP: XFRMA_ENCAP UDP_ENCAP_ESPINUDP with the ports of this SA's direction
  (`src_port` is the UDP source port of packets from `src`).
- Sequence numbers at install (`initial_replay`): the NEWSA request itself carries them
  (XFRMA_REPLAY_ESN_VAL / XFRMA_REPLAY_VAL; the kernel copies them in `xfrm_state_construct`),
  so an outbound SA reinstalled from the sequence ledger never sends a single packet with a
  lower number, and an inbound one starts with its replay floor already in the window.
  `replay_thresh` / `etimer_thresh` (XFRMA_REPLAY_THRESH / XFRMA_ETIMER_THRESH, jiffies) ask
  for XFRM_MSG_NEWAE events on the AEVENTS group. These three describe how the SA starts,
  not what it is: they take no part in `==` and dumps leave them unset.
"""

from __future__ import annotations

import math
import socket
from dataclasses import dataclass, field, replace
from typing import Any

from esplanade.dataplane.backend import InvalidArgument, Unsupported
from esplanade.dataplane.kernel.xfrm_messages import (
    UDP_ENCAP_ESPINUDP,
    XFRM_ALG_NAME_LEN,
    XFRM_INF,
    XFRMA_REPLAY_ESN_MAX,
    XfrmMode,
    XfrmStateFlag,
    xfrm_aevent_id,
    xfrm_usersa_id,
    xfrm_usersa_info,
)
from esplanade.dataplane.kernel.xfrm_selector import (
    SelectorError,
    XfrmSelector,
    family_of,
    kernel_selectors,
    pack_address,
    unpack_address,
)
from esplanade.ipsec.sa import SecurityAssociation
from esplanade.ipsec.transforms import Direction, IpProto, Mode

LEGACY_REPLAY_MAX = 32  # the legacy replay bitmap is one u32
ESN_REPLAY_MAX = XFRMA_REPLAY_ESN_MAX  # bits of bitmap the kernel accepts
OUTBOUND_ESN_WINDOW = 32


@dataclass(frozen=True, slots=True)
class XfrmAlgorithm:
    """One of xfrm_algo / xfrm_algo_auth / xfrm_algo_aead. `bits` is the ICV or truncation length."""

    name: str
    key: bytes = field(repr=False)
    bits: int = 0


@dataclass(frozen=True, slots=True)
class XfrmEncap:
    """xfrm_encap_tmpl: ESP-in-UDP ports (host order) of this SA's direction."""

    sport: int
    dport: int
    encap_type: int = UDP_ENCAP_ESPINUDP


@dataclass(frozen=True, slots=True)
class XfrmLifetime:
    """xfrm_lifetime_cfg. XFRM_INF means no byte/packet limit; 0 seconds means no time limit."""

    soft_bytes: int = XFRM_INF
    hard_bytes: int = XFRM_INF
    soft_packets: int = XFRM_INF
    hard_packets: int = XFRM_INF
    soft_add_seconds: int = 0
    hard_add_seconds: int = 0
    soft_use_seconds: int = 0
    hard_use_seconds: int = 0

    _FIELDS = (
        ("soft_bytes", "soft_byte_limit"),
        ("hard_bytes", "hard_byte_limit"),
        ("soft_packets", "soft_packet_limit"),
        ("hard_packets", "hard_packet_limit"),
        ("soft_add_seconds", "soft_add_expires_seconds"),
        ("hard_add_seconds", "hard_add_expires_seconds"),
        ("soft_use_seconds", "soft_use_expires_seconds"),
        ("hard_use_seconds", "hard_use_expires_seconds"),
    )

    def to_fields(self, prefix: str) -> dict[str, int]:
        return {f"{prefix}{c_name}": getattr(self, name) for name, c_name in self._FIELDS}

    @classmethod
    def from_fields(cls, msg: Any, prefix: str) -> XfrmLifetime:
        return cls(**{name: int(msg[f"{prefix}{c_name}"]) for name, c_name in cls._FIELDS})


@dataclass(frozen=True, slots=True, order=True)
class XfrmSaId:
    """What identifies a kernel SA: destination, SPI, protocol (and the address family)."""

    dst: str
    spi: int
    proto: int

    @property
    def family(self) -> int:
        return family_of(self.dst)

    def to_message(self) -> xfrm_usersa_id:
        msg = xfrm_usersa_id()
        msg.update(daddr=pack_address(self.dst), spi=self.spi, family=self.family, proto=self.proto)
        return msg

    def __str__(self) -> str:
        proto = IpProto(self.proto).name.lower() if self.proto in (50, 51) else str(self.proto)
        return f"SA {proto} spi {self.spi:#010x} to {self.dst}"


@dataclass(frozen=True, slots=True)
class XfrmSa:
    """The content of one kernel SA (request side; dumps decode to the same type)."""

    src: str
    dst: str
    spi: int
    proto: int
    mode: int
    reqid: int
    selector: XfrmSelector
    aead: XfrmAlgorithm | None = None
    crypt: XfrmAlgorithm | None = None
    auth: XfrmAlgorithm | None = None
    esn: bool = False
    replay_window: int = 0
    flags: int = 0  # XFRM_STATE_* other than ESN
    extra_flags: int = 0
    encap: XfrmEncap | None = None
    lifetime: XfrmLifetime = XfrmLifetime()
    mark: tuple[int, int] | None = None  # (value, mask)
    if_id: int = 0
    tfcpad: int = 0
    initial_replay: XfrmReplayState | None = field(default=None, compare=False)
    replay_thresh: int = field(default=0, compare=False)  # NEWAE every this many packets (0: kernel default)
    etimer_thresh: int | None = field(default=None, compare=False)  # NEWAE timer, jiffies (0: none)

    @property
    def family(self) -> int:
        return family_of(self.dst)

    def same_keyed_sa(self, other: XfrmSa) -> bool:
        """Equal in everything but the lifetime: the same SA, installed earlier (its seconds
        lifetimes were computed then) or by a predecessor of this process."""
        return replace(self, lifetime=other.lifetime) == other

    @property
    def id(self) -> XfrmSaId:
        return XfrmSaId(self.dst, self.spi, self.proto)

    @property
    def uses_replay_esn(self) -> bool:
        """XFRMA_REPLAY_ESN_VAL (bitmap) instead of the legacy one-word replay window."""
        return self.esn or self.replay_window > LEGACY_REPLAY_MAX

    def __str__(self) -> str:
        return f"{self.id} from {self.src} (reqid {self.reqid})"

    # -- encoding -----------------------------------------------------------------------
    def to_message(self) -> xfrm_usersa_info:
        msg = xfrm_usersa_info()
        flags = self.flags | (XfrmStateFlag.ESN if self.esn else 0)
        msg.update(self.selector.to_fields("sel_"))
        msg.update(self.lifetime.to_fields("lft_"))
        msg.update(
            id_daddr=pack_address(self.dst),
            id_spi=self.spi,
            id_proto=self.proto,
            saddr=pack_address(self.src),
            reqid=self.reqid,
            family=self.family,
            mode=self.mode,
            replay_window=0 if self.uses_replay_esn else self.replay_window,
            flags=int(flags),
        )
        attrs: list[tuple[str, Any]] = []
        if self.aead is not None:
            attrs.append(("XFRMA_ALG_AEAD", _algo_value(self.aead, "alg_icv_len")))
        if self.crypt is not None:
            attrs.append(("XFRMA_ALG_CRYPT", _algo_value(self.crypt, None)))
        if self.auth is not None:
            attrs.append(("XFRMA_ALG_AUTH_TRUNC", _algo_value(self.auth, "alg_trunc_len")))
        start = self.initial_replay
        if self.uses_replay_esn:
            words = (self.replay_window + 31) // 32
            value: dict[str, Any] = {"bmp_len": words, "replay_window": self.replay_window, "bmp": [0] * words}
            if start is not None:
                value.update(oseq=start.oseq, seq=start.seq, oseq_hi=start.oseq_hi, seq_hi=start.seq_hi)
                value["bmp"] = (list(start.bitmap) + [0] * words)[:words]
            attrs.append(("XFRMA_REPLAY_ESN_VAL", value))
        elif start is not None:
            bitmap = start.bitmap[0] if start.bitmap else 0
            attrs.append(("XFRMA_REPLAY_VAL", {"oseq": start.oseq, "seq": start.seq, "bitmap": bitmap}))
        if self.replay_thresh:
            attrs.append(("XFRMA_REPLAY_THRESH", self.replay_thresh))
        if self.etimer_thresh is not None:
            attrs.append(("XFRMA_ETIMER_THRESH", self.etimer_thresh))
        if self.encap is not None:
            attrs.append(
                (
                    "XFRMA_ENCAP",
                    {
                        "encap_type": self.encap.encap_type,
                        "encap_sport": self.encap.sport,
                        "encap_dport": self.encap.dport,
                        "encap_oa": bytes(16),
                    },
                )
            )
        if self.mark is not None:
            attrs.append(("XFRMA_MARK", {"v": self.mark[0], "m": self.mark[1]}))
        if self.if_id:
            attrs.append(("XFRMA_IF_ID", self.if_id))
        if self.extra_flags:
            attrs.append(("XFRMA_SA_EXTRA_FLAGS", self.extra_flags))
        if self.tfcpad:
            attrs.append(("XFRMA_TFCPAD", self.tfcpad))
        msg["attrs"] = attrs
        return msg

    @classmethod
    def from_message(cls, msg: Any, prefix: str = "") -> XfrmSa:
        """Decode a usersa_info (a GETSA reply, a dump entry, or `state_*` of an expire)."""
        family = int(msg[f"{prefix}family"])
        flags = int(msg[f"{prefix}flags"])
        esn_attr = msg.get_attr("XFRMA_REPLAY_ESN_VAL")
        encap = msg.get_attr("XFRMA_ENCAP")
        mark = msg.get_attr("XFRMA_MARK")
        return cls(
            src=unpack_address(msg[f"{prefix}saddr"], family),
            dst=unpack_address(msg[f"{prefix}id_daddr"], family),
            spi=int(msg[f"{prefix}id_spi"]),
            proto=int(msg[f"{prefix}id_proto"]),
            mode=int(msg[f"{prefix}mode"]),
            reqid=int(msg[f"{prefix}reqid"]),
            selector=XfrmSelector.from_fields(msg, f"{prefix}sel_"),
            aead=_algo_from(msg.get_attr("XFRMA_ALG_AEAD"), "alg_icv_len"),
            crypt=_algo_from(msg.get_attr("XFRMA_ALG_CRYPT"), None),
            auth=_algo_from(msg.get_attr("XFRMA_ALG_AUTH_TRUNC"), "alg_trunc_len"),
            esn=bool(flags & XfrmStateFlag.ESN),
            replay_window=int(esn_attr["replay_window"]) if esn_attr else int(msg[f"{prefix}replay_window"]),
            flags=flags & ~XfrmStateFlag.ESN,
            extra_flags=int(msg.get_attr("XFRMA_SA_EXTRA_FLAGS") or 0),
            encap=(
                XfrmEncap(int(encap["encap_sport"]), int(encap["encap_dport"]), int(encap["encap_type"]))
                if encap
                else None
            ),
            lifetime=XfrmLifetime.from_fields(msg, f"{prefix}lft_"),
            mark=(int(mark["v"]), int(mark["m"])) if mark else None,
            if_id=int(msg.get_attr("XFRMA_IF_ID") or 0),
            tfcpad=int(msg.get_attr("XFRMA_TFCPAD") or 0),
        )


def _algo_value(alg: XfrmAlgorithm, bits_field: str | None) -> dict[str, Any]:
    value: dict[str, Any] = {
        "alg_name": alg.name.encode("ascii"),
        "alg_key_len": len(alg.key) * 8,
        "alg_key": alg.key,
    }
    if bits_field is not None:
        value[bits_field] = alg.bits
    return value


def _algo_from(attr: Any, bits_field: str | None) -> XfrmAlgorithm | None:
    if not attr:
        return None
    key_bytes = (int(attr["alg_key_len"]) + 7) // 8
    return XfrmAlgorithm(
        name=str(attr["alg_name"]),
        key=bytes(attr["alg_key"][:key_bytes]),
        bits=int(attr[bits_field]) if bits_field else 0,
    )


@dataclass(frozen=True, slots=True)
class XfrmReplayState:
    """Sequence numbers of one SA: `oseq` last sent; `seq` highest received; `bitmap` the window."""

    oseq: int = 0
    seq: int = 0
    oseq_hi: int = 0
    seq_hi: int = 0
    replay_window: int = 0
    bitmap: tuple[int, ...] = ()

    @property
    def last_sent(self) -> int:
        return self.oseq_hi << 32 | self.oseq

    @classmethod
    def sending_after(cls, last_sent: int) -> XfrmReplayState:
        """Outbound: the next packet carries `last_sent + 1` (the kernel increments first)."""
        return cls(oseq=last_sent & 0xFFFFFFFF, oseq_hi=last_sent >> 32)

    @classmethod
    def receiving_above(cls, floor: int, window: int) -> XfrmReplayState:
        """Inbound: every number at or below `floor` counts as received (a full window)."""
        words = max(1, (window + 31) // 32)
        return cls(seq=floor & 0xFFFFFFFF, seq_hi=floor >> 32, replay_window=window, bitmap=(0xFFFFFFFF,) * words)

    @property
    def highest_received(self) -> int:
        return self.seq_hi << 32 | self.seq

    @classmethod
    def from_attrs(cls, msg: Any) -> XfrmReplayState:
        esn = msg.get_attr("XFRMA_REPLAY_ESN_VAL")
        if esn:
            return cls(
                oseq=int(esn["oseq"]),
                seq=int(esn["seq"]),
                oseq_hi=int(esn["oseq_hi"]),
                seq_hi=int(esn["seq_hi"]),
                replay_window=int(esn["replay_window"]),
                bitmap=tuple(int(w) for w in esn["bmp"]),
            )
        legacy = msg.get_attr("XFRMA_REPLAY_VAL")
        if legacy:
            return cls(oseq=int(legacy["oseq"]), seq=int(legacy["seq"]), bitmap=(int(legacy["bitmap"]),))
        return cls()


@dataclass(frozen=True, slots=True)
class XfrmSaState:
    """An SA as dumped: its content plus what the kernel counts."""

    sa: XfrmSa
    bytes: int
    packets: int
    add_time: int
    use_time: int
    replay_dropped: int  # xfrm_stats.replay
    integrity_failed: int
    replay_window_failures: int  # xfrm_stats.replay_window
    replay: XfrmReplayState

    @classmethod
    def from_message(cls, msg: Any) -> XfrmSaState:
        return cls(
            sa=XfrmSa.from_message(msg),
            bytes=int(msg["curlft_bytes"]),
            packets=int(msg["curlft_packets"]),
            add_time=int(msg["curlft_add_time"]),
            use_time=int(msg["curlft_use_time"]),
            replay_dropped=int(msg["stats_replay"]),
            integrity_failed=int(msg["stats_integrity_failed"]),
            replay_window_failures=int(msg["stats_replay_window"]),
            replay=XfrmReplayState.from_attrs(msg),
        )


def aevent_id_message(sa_id: XfrmSaId, src: str, reqid: int, flags: int) -> xfrm_aevent_id:
    msg = xfrm_aevent_id()
    msg.update(
        sa_id_daddr=pack_address(sa_id.dst),
        sa_id_spi=sa_id.spi,
        sa_id_family=sa_id.family,
        sa_id_proto=sa_id.proto,
        saddr=pack_address(src),
        flags=flags,
        reqid=reqid,
    )
    return msg


# -- SecurityAssociation -> XfrmSa ------------------------------------------------------


def _remaining(limit: int, elapsed: float) -> int:
    return 0 if not limit else max(1, math.ceil(limit - elapsed))


def _kernel_lifetime(sa: SecurityAssociation, elapsed: float) -> XfrmLifetime:
    lt = sa.lifetime
    if lt.hard_seconds and elapsed >= lt.hard_seconds:
        raise InvalidArgument(
            f"SA spi {sa.spi:#010x}: its hard lifetime of {lt.hard_seconds}s ran out"
            f" {elapsed - lt.hard_seconds:.0f}s ago"
        )
    soft_seconds = _remaining(lt.soft_seconds, elapsed)
    hard_seconds = _remaining(lt.hard_seconds, elapsed)
    if soft_seconds and hard_seconds and soft_seconds >= hard_seconds:
        soft_seconds = max(1, hard_seconds - 1)
    return XfrmLifetime(
        soft_bytes=lt.soft_bytes or XFRM_INF,
        hard_bytes=lt.hard_bytes or XFRM_INF,
        soft_packets=lt.soft_packets or XFRM_INF,
        hard_packets=lt.hard_packets or XFRM_INF,
        soft_add_seconds=soft_seconds,
        hard_add_seconds=hard_seconds,
    )


def _transport_selector(sa: SecurityAssociation) -> XfrmSelector:
    family = family_of(sa.dst)
    if len(sa.local_ts) == 1 and len(sa.remote_ts) == 1:
        src, dst = (sa.local_ts[0], sa.remote_ts[0])
        if sa.direction == Direction.IN:
            src, dst = dst, src
        try:
            selectors = kernel_selectors(src, dst)
        except SelectorError:
            selectors = []
        if len(selectors) == 1 and selectors[0].family == family:
            return selectors[0]
    return XfrmSelector.any(family)


def _replay_window(sa: SecurityAssociation) -> int:
    window = sa.replay_window
    if sa.direction == Direction.OUT and sa.esn and window == 0:
        return OUTBOUND_ESN_WINDOW
    if window > ESN_REPLAY_MAX:
        raise Unsupported(
            f"SA spi {sa.spi:#010x}: replay window {window} exceeds the kernel's maximum of {ESN_REPLAY_MAX}"
        )
    if sa.esn and window == 0:
        raise Unsupported(f"SA spi {sa.spi:#010x}: the kernel cannot disable anti-replay on an ESN SA")
    return window


def _state_flags(sa: SecurityAssociation, tunnel: bool, family: int) -> XfrmStateFlag:
    flags = XfrmStateFlag.AF_UNSPEC if tunnel else XfrmStateFlag(0)
    if sa.protocol == IpProto.AH and family == socket.AF_INET:
        # RFC 4302 §3.3.3.2.1: the ICV of AH over IPv4 is padded to 32 bits; Linux pads to
        # 64 bits (right only for IPv6) unless told ALIGN4, as strongSwan and Libreswan do
        flags |= XfrmStateFlag.ALIGN4
    return flags


def xfrm_sa_from_association(sa: SecurityAssociation, *, reqid: int, elapsed: float = 0.0) -> XfrmSa:
    """The kernel SA for one direction of a Child SA; raises InvalidArgument/Unsupported."""
    try:
        sa.validate()
        src_family, dst_family = family_of(sa.src), family_of(sa.dst)
    except ValueError as exc:
        raise InvalidArgument(f"SA spi {sa.spi:#010x}: {exc}") from None
    if src_family != dst_family:
        raise InvalidArgument(f"SA spi {sa.spi:#010x}: outer addresses {sa.src} and {sa.dst} differ in family")
    if sa.tfc.dummy_interval_ms:
        raise Unsupported(f"SA spi {sa.spi:#010x}: kernel XFRM cannot send TFC dummy packets (RFC 4303 §2.6)")
    aead = crypt = auth = None
    if sa.encr is not None:
        if sa.encr.aead:
            aead = XfrmAlgorithm(sa.encr.kernel_name, sa.encr_key, sa.encr.icv_bytes * 8)
        else:
            crypt = XfrmAlgorithm(sa.encr.kernel_name, sa.encr_key)
    if sa.integ is not None:
        auth = XfrmAlgorithm(sa.integ.kernel_name, sa.integ_key, sa.integ.icv_bytes * 8)
    for alg in (aead, crypt, auth):
        if alg is not None and len(alg.name) >= XFRM_ALG_NAME_LEN:
            raise InvalidArgument(f"SA spi {sa.spi:#010x}: algorithm name {alg.name!r} too long for the kernel")
    tunnel = sa.mode == Mode.TUNNEL
    return XfrmSa(
        src=sa.src,
        dst=sa.dst,
        spi=sa.spi,
        proto=int(sa.protocol),
        mode=XfrmMode.TUNNEL if tunnel else XfrmMode.TRANSPORT,
        reqid=reqid,
        selector=XfrmSelector.unspecified() if tunnel else _transport_selector(sa),
        aead=aead,
        crypt=crypt,
        auth=auth,
        esn=sa.esn,
        replay_window=_replay_window(sa),
        flags=_state_flags(sa, tunnel, src_family),
        encap=XfrmEncap(sa.encap.src_port, sa.encap.dst_port) if sa.encap else None,
        lifetime=_kernel_lifetime(sa, elapsed),
        mark=(sa.mark, 0xFFFFFFFF) if sa.mark else None,
        if_id=sa.if_id,
        tfcpad=sa.tfc.pad_to if sa.protocol == IpProto.ESP else 0,
    )
