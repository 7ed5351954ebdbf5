"""NETLINK_XFRM messages as pyroute2 `nlmsg`/`nla` classes (UAPI: include/uapi/linux/xfrm.h).

pyroute2 0.9.7 knows the NETLINK_XFRM protocol number and nothing else, so the structs are
declared here. Every struct keeps the kernel's x86_64/arm64 layout: explicit padding fields
(`__pad*`, format `Nx`) stand where the C compiler inserts padding, including tail padding,
because the kernel parses the attribute chain at NLMSG_ALIGN(sizeof(struct)). The sizes
are pinned by `STRUCT_SIZES` (checked against `sizeof` from the UAPI header in the tests).

Addresses (`xfrm_address_t`) are 16 raw bytes: an IPv4 address fills the first four.
SPIs and ports are big-endian (`__be32`/`__be16`) and declared so; everything else is
host order. Field names follow the C names; embedded structs are flattened with a prefix
(`sel_daddr` is `sel.daddr`, `id_spi` is `id.spi`, `lft_soft_byte_limit` is
`lft.soft_byte_limit`).

The classes are data only. `xfrm_sa.py` and `xfrm_policy.py` map them from and to
Esplanade's records; `xfrm_socket.py` sends and receives them.
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag
from typing import Any, ClassVar

from pyroute2.netlink import nla, nlmsg

XFRM_INF = (1 << 64) - 1  # "no limit" in xfrm_lifetime_cfg
XFRM_ALG_NAME_LEN = 64
XFRMA_REPLAY_ESN_MAX = 4096  # bytes of bitmap the kernel accepts: 128 u32 = 4096 packets
UDP_ENCAP_ESPINUDP = 2  # RFC 3948 (linux/udp.h)
ALL_ALGORITHMS = 0xFFFFFFFF  # xfrm_user_tmpl.{a,e,c}algos: any algorithm


class XfrmMsgType(IntEnum):
    NEWSA = 0x10
    DELSA = 0x11
    GETSA = 0x12
    NEWPOLICY = 0x13
    DELPOLICY = 0x14
    GETPOLICY = 0x15
    ALLOCSPI = 0x16
    ACQUIRE = 0x17
    EXPIRE = 0x18
    UPDPOLICY = 0x19
    UPDSA = 0x1A
    POLEXPIRE = 0x1B
    FLUSHSA = 0x1C
    FLUSHPOLICY = 0x1D
    NEWAE = 0x1E
    GETAE = 0x1F
    REPORT = 0x20
    MIGRATE = 0x21
    NEWSADINFO = 0x22
    GETSADINFO = 0x23
    NEWSPDINFO = 0x24
    GETSPDINFO = 0x25
    MAPPING = 0x26
    SETDEFAULT = 0x27
    GETDEFAULT = 0x28


class XfrmGroup(IntEnum):
    """Multicast groups (enum xfrm_nlgroups): join with NETLINK_ADD_MEMBERSHIP."""

    ACQUIRE = 1
    EXPIRE = 2
    SA = 3
    POLICY = 4
    AEVENTS = 5
    REPORT = 6
    MIGRATE = 7
    MAPPING = 8


class XfrmMode(IntEnum):
    TRANSPORT = 0
    TUNNEL = 1
    ROUTEOPTIMIZATION = 2
    IN_TRIGGER = 3
    BEET = 4


class XfrmPolicyDir(IntEnum):
    IN = 0
    OUT = 1
    FWD = 2


class XfrmPolicyAction(IntEnum):
    ALLOW = 0
    BLOCK = 1


class XfrmPolicyFlag(IntFlag):
    LOCALOK = 1
    ICMP = 2


class XfrmPolicyType(IntEnum):
    MAIN = 0
    SUB = 1


class XfrmShare(IntEnum):
    ANY = 0
    SESSION = 1
    USER = 2
    UNIQUE = 3


class XfrmStateFlag(IntFlag):
    NOECN = 1
    DECAP_DSCP = 2
    NOPMTUDISC = 4
    WILDRECV = 8
    ICMP = 16
    AF_UNSPEC = 32
    ALIGN4 = 64
    ESN = 128


class XfrmSaExtraFlag(IntFlag):
    DONT_ENCAP_DSCP = 1
    OSEQ_MAY_WRAP = 2


class XfrmAeFlag(IntFlag):
    """xfrm_aevent_id.flags (enum xfrm_ae_ftype_t)."""

    RTHR = 1  # replay threshold
    RVAL = 2  # replay value
    LVAL = 4  # lifetime value
    ETHR = 8  # expiry timer threshold
    CR = 16  # event cause: replay update
    CE = 32  # event cause: timer expiry
    CU = 64  # event cause: policy update


class XfrmAttr(IntEnum):
    UNSPEC = 0
    ALG_AUTH = 1
    ALG_CRYPT = 2
    ALG_COMP = 3
    ENCAP = 4
    TMPL = 5
    SA = 6
    POLICY = 7
    SEC_CTX = 8
    LTIME_VAL = 9
    REPLAY_VAL = 10
    REPLAY_THRESH = 11
    ETIMER_THRESH = 12
    SRCADDR = 13
    COADDR = 14
    LASTUSED = 15
    POLICY_TYPE = 16
    MIGRATE = 17
    ALG_AEAD = 18
    KMADDRESS = 19
    ALG_AUTH_TRUNC = 20
    MARK = 21
    TFCPAD = 22
    REPLAY_ESN_VAL = 23
    SA_EXTRA_FLAGS = 24
    PROTO = 25
    ADDRESS_FILTER = 26
    PAD = 27
    OFFLOAD_DEV = 28
    SET_MARK = 29
    SET_MARK_MASK = 30
    IF_ID = 31
    MTIMER_THRESH = 32


Fields = tuple[tuple[str, str], ...]


def selector_fields(prefix: str) -> Fields:
    """struct xfrm_selector (56 bytes)."""
    return (
        (f"{prefix}daddr", "16s"),
        (f"{prefix}saddr", "16s"),
        (f"{prefix}dport", ">H"),
        (f"{prefix}dport_mask", ">H"),
        (f"{prefix}sport", ">H"),
        (f"{prefix}sport_mask", ">H"),
        (f"{prefix}family", "H"),
        (f"{prefix}prefixlen_d", "B"),
        (f"{prefix}prefixlen_s", "B"),
        (f"{prefix}proto", "B"),
        (f"__{prefix}pad", "3x"),
        (f"{prefix}ifindex", "i"),
        (f"{prefix}user", "I"),
    )


def lifetime_cfg_fields(prefix: str) -> Fields:
    """struct xfrm_lifetime_cfg (64 bytes)."""
    return tuple(
        (f"{prefix}{name}", "Q")
        for name in (
            "soft_byte_limit",
            "hard_byte_limit",
            "soft_packet_limit",
            "hard_packet_limit",
            "soft_add_expires_seconds",
            "hard_add_expires_seconds",
            "soft_use_expires_seconds",
            "hard_use_expires_seconds",
        )
    )


def lifetime_cur_fields(prefix: str) -> Fields:
    """struct xfrm_lifetime_cur (32 bytes)."""
    return tuple((f"{prefix}{name}", "Q") for name in ("bytes", "packets", "add_time", "use_time"))


def usersa_id_fields(prefix: str) -> Fields:
    """struct xfrm_usersa_id (24 bytes)."""
    return (
        (f"{prefix}daddr", "16s"),
        (f"{prefix}spi", ">I"),
        (f"{prefix}family", "H"),
        (f"{prefix}proto", "B"),
        (f"__{prefix}pad", "x"),
    )


def usersa_info_fields(prefix: str) -> Fields:
    """struct xfrm_usersa_info (224 bytes)."""
    return (
        *selector_fields(f"{prefix}sel_"),
        (f"{prefix}id_daddr", "16s"),
        (f"{prefix}id_spi", ">I"),
        (f"{prefix}id_proto", "B"),
        (f"__{prefix}id_pad", "3x"),
        (f"{prefix}saddr", "16s"),
        *lifetime_cfg_fields(f"{prefix}lft_"),
        *lifetime_cur_fields(f"{prefix}curlft_"),
        (f"{prefix}stats_replay_window", "I"),
        (f"{prefix}stats_replay", "I"),
        (f"{prefix}stats_integrity_failed", "I"),
        (f"{prefix}seq", "I"),
        (f"{prefix}reqid", "I"),
        (f"{prefix}family", "H"),
        (f"{prefix}mode", "B"),
        (f"{prefix}replay_window", "B"),
        (f"{prefix}flags", "B"),
        (f"__{prefix}pad", "7x"),
    )


def userpolicy_info_fields(prefix: str) -> Fields:
    """struct xfrm_userpolicy_info (168 bytes)."""
    return (
        *selector_fields(f"{prefix}sel_"),
        *lifetime_cfg_fields(f"{prefix}lft_"),
        *lifetime_cur_fields(f"{prefix}curlft_"),
        (f"{prefix}priority", "I"),
        (f"{prefix}index", "I"),
        (f"{prefix}dir", "B"),
        (f"{prefix}action", "B"),
        (f"{prefix}flags", "B"),
        (f"{prefix}share", "B"),
        (f"__{prefix}pad", "4x"),
    )


USER_TMPL_FIELDS: Fields = (
    ("id_daddr", "16s"),
    ("id_spi", ">I"),
    ("id_proto", "B"),
    ("__id_pad", "3x"),
    ("family", "H"),
    ("__family_pad", "2x"),
    ("saddr", "16s"),
    ("reqid", "I"),
    ("mode", "B"),
    ("share", "B"),
    ("optional", "B"),
    ("__pad", "x"),
    ("aalgos", "I"),
    ("ealgos", "I"),
    ("calgos", "I"),
)


def _defaults(fields: Fields) -> dict[str, Any]:
    """Zero for numbers, XFRM_INF for the lifetime limits, b'' for byte strings."""
    out: dict[str, Any] = {}
    for name, fmt in fields:
        if fmt.endswith("s"):
            out[name] = b""
        elif name.endswith(("_byte_limit", "_packet_limit")):
            out[name] = XFRM_INF
    return out


class _PackedStruct:
    """Packs a flat field list with struct, honouring per-field byte order (for arrays of structs)."""

    def __init__(self, fields: Fields) -> None:
        self.fields = fields
        self.codecs = [(name, struct.Struct(fmt if fmt[0] in "<>=!@" else "=" + fmt)) for name, fmt in fields]
        self.size = sum(codec.size for _, codec in self.codecs)

    def pack(self, values: dict[str, Any], defaults: dict[str, Any]) -> bytes:
        out = bytearray()
        for name, codec in self.codecs:
            if codec.format.endswith("x"):
                out += codec.pack()
            else:
                out += codec.pack(values.get(name, defaults.get(name, 0)))
        return bytes(out)

    def unpack(self, data: bytes | bytearray, offset: int) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, codec in self.codecs:
            if not codec.format.endswith("x"):
                (values[name],) = codec.unpack_from(data, offset)
            offset += codec.size
        return values


# -- attributes -------------------------------------------------------------------------


class _xfrm_algo_base(nla):
    """An algorithm NLA: fixed header fields followed by `alg_key_len` bits of key."""

    __slots__ = ()
    fields: ClassVar[Fields] = ()

    def ft_encode(self, offset: int) -> tuple[int, int]:
        offset, diff = super().ft_encode(offset)
        key = bytes(self.get("alg_key") or b"")
        self.data.extend(key)
        pad = -len(key) % 4
        self.data.extend(b"\0" * pad)
        return offset + len(key) + pad, diff + pad

    def decode(self) -> None:
        super().decode()
        start = self.offset + 4 + struct.calcsize("=" + "".join(fmt for _, fmt in self.fields))
        self["alg_name"] = bytes(self["alg_name"]).split(b"\0", 1)[0].decode("ascii", "replace")
        self["alg_key"] = bytes(self.data[start : self.offset + self.length])


class _xfrm_replay_esn_base(nla):
    """xfrm_replay_state_esn: 24 bytes, then `bmp_len` u32 words of bitmap."""

    __slots__ = ()

    def ft_encode(self, offset: int) -> tuple[int, int]:
        offset, diff = super().ft_encode(offset)
        words = list(self.get("bmp") or [0] * int(self.get("bmp_len") or 0))
        self.data.extend(struct.pack(f"={len(words)}I", *words))
        return offset + 4 * len(words), diff

    def decode(self) -> None:
        super().decode()
        start = self.offset + 4 + 24
        count = max(0, min(int(self["bmp_len"]), (self.offset + self.length - start) // 4))
        self["bmp"] = list(struct.unpack_from(f"={count}I", self.data, start))


_TMPL = _PackedStruct(USER_TMPL_FIELDS)
_TMPL_DEFAULTS = _defaults(USER_TMPL_FIELDS)


class _xfrm_tmpl_list_base(nla):
    """XFRMA_TMPL: one or more struct xfrm_user_tmpl back to back, without NLA headers."""

    __slots__ = ()
    fields: ClassVar[Fields] = ()

    def ft_encode(self, offset: int) -> tuple[int, int]:
        templates = self.get("value")
        for template in templates if isinstance(templates, list) else []:
            packed = _TMPL.pack(template, _TMPL_DEFAULTS)
            self.data.extend(packed)
            offset += len(packed)
        return offset, 0

    def decode(self) -> None:
        nla.decode(self)
        start, end = self.offset + 4, self.offset + self.length
        templates = []
        while start + _TMPL.size <= end:
            templates.append(_TMPL.unpack(self.data, start))
            start += _TMPL.size
        self["value"] = templates

    def getvalue(self) -> Any:
        return self.get("value")


class xfrm_attributes:
    """The XFRMA_* attribute chain shared by all XFRM messages."""

    nla_map = (
        (XfrmAttr.UNSPEC, "XFRMA_UNSPEC", "none"),
        (XfrmAttr.ALG_AUTH, "XFRMA_ALG_AUTH", "xfrm_algo"),
        (XfrmAttr.ALG_CRYPT, "XFRMA_ALG_CRYPT", "xfrm_algo"),
        (XfrmAttr.ALG_COMP, "XFRMA_ALG_COMP", "xfrm_algo"),
        (XfrmAttr.ENCAP, "XFRMA_ENCAP", "xfrm_encap_tmpl"),
        (XfrmAttr.TMPL, "XFRMA_TMPL", "xfrm_user_tmpl"),
        (XfrmAttr.SA, "XFRMA_SA", "cdata"),
        (XfrmAttr.POLICY, "XFRMA_POLICY", "cdata"),
        (XfrmAttr.SEC_CTX, "XFRMA_SEC_CTX", "cdata"),
        (XfrmAttr.LTIME_VAL, "XFRMA_LTIME_VAL", "xfrm_lifetime_cur"),
        (XfrmAttr.REPLAY_VAL, "XFRMA_REPLAY_VAL", "xfrm_replay_state"),
        (XfrmAttr.REPLAY_THRESH, "XFRMA_REPLAY_THRESH", "uint32"),
        (XfrmAttr.ETIMER_THRESH, "XFRMA_ETIMER_THRESH", "uint32"),
        (XfrmAttr.SRCADDR, "XFRMA_SRCADDR", "cdata"),
        (XfrmAttr.COADDR, "XFRMA_COADDR", "cdata"),
        (XfrmAttr.LASTUSED, "XFRMA_LASTUSED", "uint64"),
        (XfrmAttr.POLICY_TYPE, "XFRMA_POLICY_TYPE", "xfrm_userpolicy_type"),
        (XfrmAttr.MIGRATE, "XFRMA_MIGRATE", "cdata"),
        (XfrmAttr.ALG_AEAD, "XFRMA_ALG_AEAD", "xfrm_algo_aead"),
        (XfrmAttr.KMADDRESS, "XFRMA_KMADDRESS", "cdata"),
        (XfrmAttr.ALG_AUTH_TRUNC, "XFRMA_ALG_AUTH_TRUNC", "xfrm_algo_auth"),
        (XfrmAttr.MARK, "XFRMA_MARK", "xfrm_mark"),
        (XfrmAttr.TFCPAD, "XFRMA_TFCPAD", "uint32"),
        (XfrmAttr.REPLAY_ESN_VAL, "XFRMA_REPLAY_ESN_VAL", "xfrm_replay_state_esn"),
        (XfrmAttr.SA_EXTRA_FLAGS, "XFRMA_SA_EXTRA_FLAGS", "uint32"),
        (XfrmAttr.PROTO, "XFRMA_PROTO", "uint8"),
        (XfrmAttr.ADDRESS_FILTER, "XFRMA_ADDRESS_FILTER", "cdata"),
        (XfrmAttr.PAD, "XFRMA_PAD", "none"),
        (XfrmAttr.OFFLOAD_DEV, "XFRMA_OFFLOAD_DEV", "cdata"),
        (XfrmAttr.SET_MARK, "XFRMA_SET_MARK", "uint32"),
        (XfrmAttr.SET_MARK_MASK, "XFRMA_SET_MARK_MASK", "uint32"),
        (XfrmAttr.IF_ID, "XFRMA_IF_ID", "uint32"),
        (XfrmAttr.MTIMER_THRESH, "XFRMA_MTIMER_THRESH", "uint32"),
    )

    class xfrm_algo(_xfrm_algo_base):
        __slots__ = ()
        fields = (("alg_name", "64s"), ("alg_key_len", "I"))

    class xfrm_algo_auth(_xfrm_algo_base):
        __slots__ = ()
        fields = (("alg_name", "64s"), ("alg_key_len", "I"), ("alg_trunc_len", "I"))

    class xfrm_algo_aead(_xfrm_algo_base):
        __slots__ = ()
        fields = (("alg_name", "64s"), ("alg_key_len", "I"), ("alg_icv_len", "I"))

    class xfrm_encap_tmpl(nla):
        __slots__ = ()
        fields = (
            ("encap_type", "H"),
            ("encap_sport", ">H"),
            ("encap_dport", ">H"),
            ("__pad", "2x"),
            ("encap_oa", "16s"),
        )
        defaults = {"encap_oa": b""}

    class xfrm_user_tmpl(_xfrm_tmpl_list_base):
        __slots__ = ()

    class xfrm_lifetime_cur(nla):
        __slots__ = ()
        fields = lifetime_cur_fields("")

    class xfrm_replay_state(nla):
        __slots__ = ()
        fields = (("oseq", "I"), ("seq", "I"), ("bitmap", "I"))

    class xfrm_replay_state_esn(_xfrm_replay_esn_base):
        __slots__ = ()
        fields = (
            ("bmp_len", "I"),
            ("oseq", "I"),
            ("seq", "I"),
            ("oseq_hi", "I"),
            ("seq_hi", "I"),
            ("replay_window", "I"),
        )

    class xfrm_mark(nla):
        __slots__ = ()
        fields = (("v", "I"), ("m", "I"))

    class xfrm_userpolicy_type(nla):
        __slots__ = ()
        fields = (("type", "B"), ("__pad0", "x"), ("reserved1", "H"), ("reserved2", "B"), ("__pad1", "x"))


# -- messages ---------------------------------------------------------------------------


class xfrm_usersa_info(xfrm_attributes, nlmsg):
    """XFRM_MSG_NEWSA / UPDSA requests and GETSA replies; ALLOCSPI replies."""

    __slots__ = ()
    fields = usersa_info_fields("")
    defaults = _defaults(fields)


class xfrm_usersa_id(xfrm_attributes, nlmsg):
    """XFRM_MSG_DELSA / GETSA requests; DELSA notifications (with XFRMA_SA)."""

    __slots__ = ()
    fields = usersa_id_fields("")
    defaults = _defaults(fields)


class xfrm_aevent_id(xfrm_attributes, nlmsg):
    """XFRM_MSG_GETAE / NEWAE: replay state and current lifetime of one SA."""

    __slots__ = ()
    fields = (
        *usersa_id_fields("sa_id_"),
        ("saddr", "16s"),
        ("flags", "I"),
        ("reqid", "I"),
    )
    defaults = _defaults(fields)


class xfrm_userpolicy_info(xfrm_attributes, nlmsg):
    """XFRM_MSG_NEWPOLICY / UPDPOLICY requests and GETPOLICY replies."""

    __slots__ = ()
    fields = userpolicy_info_fields("")
    defaults = _defaults(fields)


class xfrm_userpolicy_id(xfrm_attributes, nlmsg):
    """XFRM_MSG_DELPOLICY / GETPOLICY requests (by selector+dir, or by index)."""

    __slots__ = ()
    fields = (*selector_fields("sel_"), ("index", "I"), ("dir", "B"), ("__pad", "3x"))
    defaults = _defaults(fields)


class xfrm_user_acquire(xfrm_attributes, nlmsg):
    """XFRM_MSG_ACQUIRE (group XFRMNLGRP_ACQUIRE): a policy wants an SA that is missing."""

    __slots__ = ()
    fields = (
        ("id_daddr", "16s"),
        ("id_spi", ">I"),
        ("id_proto", "B"),
        ("__id_pad", "3x"),
        ("saddr", "16s"),
        *selector_fields("sel_"),
        *userpolicy_info_fields("policy_"),
        ("aalgos", "I"),
        ("ealgos", "I"),
        ("calgos", "I"),
        ("seq", "I"),
    )
    defaults = _defaults(fields)


class xfrm_user_expire(xfrm_attributes, nlmsg):
    """XFRM_MSG_EXPIRE (group XFRMNLGRP_EXPIRE): a soft or hard lifetime ran out."""

    __slots__ = ()
    fields = (*usersa_info_fields("state_"), ("hard", "B"), ("__pad", "7x"))
    defaults = _defaults(fields)


class xfrm_user_polexpire(xfrm_attributes, nlmsg):
    """XFRM_MSG_POLEXPIRE: a policy lifetime ran out (Esplanade sets none)."""

    __slots__ = ()
    fields = (*userpolicy_info_fields("pol_"), ("hard", "B"), ("__pad", "7x"))
    defaults = _defaults(fields)


class xfrm_usersa_flush(xfrm_attributes, nlmsg):
    """XFRM_MSG_FLUSHSA: the kernel's u8 proto, padded to 4 bytes as the kernel aligns it."""

    __slots__ = ()
    fields = (("proto", "B"), ("__pad", "3x"))


class xfrm_user_mapping(xfrm_attributes, nlmsg):
    """XFRM_MSG_MAPPING: a NAT mapping of an ESP-in-UDP SA changed."""

    __slots__ = ()
    fields = (
        *usersa_id_fields("id_"),
        ("reqid", "I"),
        ("old_saddr", "16s"),
        ("new_saddr", "16s"),
        ("old_sport", ">H"),
        ("new_sport", ">H"),
    )
    defaults = _defaults(fields)


# Which class decodes a message of each type the kernel sends.
MESSAGE_CLASSES: dict[int, type[nlmsg]] = {
    XfrmMsgType.NEWSA: xfrm_usersa_info,
    XfrmMsgType.UPDSA: xfrm_usersa_info,
    XfrmMsgType.DELSA: xfrm_usersa_id,
    XfrmMsgType.NEWPOLICY: xfrm_userpolicy_info,
    XfrmMsgType.UPDPOLICY: xfrm_userpolicy_info,
    XfrmMsgType.DELPOLICY: xfrm_userpolicy_id,
    XfrmMsgType.ACQUIRE: xfrm_user_acquire,
    XfrmMsgType.EXPIRE: xfrm_user_expire,
    XfrmMsgType.POLEXPIRE: xfrm_user_polexpire,
    XfrmMsgType.NEWAE: xfrm_aevent_id,
    XfrmMsgType.FLUSHSA: xfrm_usersa_flush,
    XfrmMsgType.MAPPING: xfrm_user_mapping,
}

# sizeof() of each struct in include/uapi/linux/xfrm.h (x86_64), the payload the kernel expects.
STRUCT_SIZES: dict[str, int] = {
    "xfrm_usersa_info": 224,
    "xfrm_usersa_id": 24,
    "xfrm_aevent_id": 48,
    "xfrm_userpolicy_info": 168,
    "xfrm_userpolicy_id": 64,
    "xfrm_user_acquire": 280,
    "xfrm_user_expire": 232,
    "xfrm_user_polexpire": 176,
    "xfrm_user_tmpl": 64,
    "xfrm_encap_tmpl": 24,
    "xfrm_replay_state": 12,
    "xfrm_replay_state_esn": 24,
    "xfrm_mark": 8,
    "xfrm_lifetime_cur": 32,
    "xfrm_userpolicy_type": 6,
    "xfrm_algo": 68,
    "xfrm_algo_auth": 72,
    "xfrm_algo_aead": 72,
    "xfrm_user_mapping": 64,
}


def struct_size(fields: Fields) -> int:
    """The packed size of a field list (what pyroute2 writes for it)."""
    return sum(struct.calcsize(fmt if fmt[0] in "<>=!@" else "=" + fmt) for _, fmt in fields)


TEMPLATE_SIZE = _TMPL.size
