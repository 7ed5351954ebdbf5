"""The NETLINK_XFRM struct layouts match the kernel's UAPI header, byte for byte."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
from pathlib import Path

import pytest

from esplanade.dataplane.kernel import xfrm_messages as xm
from esplanade.dataplane.kernel.xfrm_socket import (
    NLM_F_ACK_TLVS,
    NLM_F_CAPPED,
    NLMSG_ERROR,
    NetlinkHeader,
    decode_message,
    iter_messages,
    parse_error,
)

MESSAGE_STRUCTS = {
    "xfrm_usersa_info": xm.xfrm_usersa_info,
    "xfrm_usersa_id": xm.xfrm_usersa_id,
    "xfrm_aevent_id": xm.xfrm_aevent_id,
    "xfrm_userpolicy_info": xm.xfrm_userpolicy_info,
    "xfrm_userpolicy_id": xm.xfrm_userpolicy_id,
    "xfrm_user_acquire": xm.xfrm_user_acquire,
    "xfrm_user_expire": xm.xfrm_user_expire,
    "xfrm_user_polexpire": xm.xfrm_user_polexpire,
    "xfrm_user_mapping": xm.xfrm_user_mapping,
}
ATTRIBUTE_STRUCTS = {
    "xfrm_encap_tmpl": xm.xfrm_attributes.xfrm_encap_tmpl,
    "xfrm_replay_state": xm.xfrm_attributes.xfrm_replay_state,
    "xfrm_replay_state_esn": xm.xfrm_attributes.xfrm_replay_state_esn,
    "xfrm_mark": xm.xfrm_attributes.xfrm_mark,
    "xfrm_lifetime_cur": xm.xfrm_attributes.xfrm_lifetime_cur,
    "xfrm_userpolicy_type": xm.xfrm_attributes.xfrm_userpolicy_type,
    "xfrm_algo": xm.xfrm_attributes.xfrm_algo,
    "xfrm_algo_auth": xm.xfrm_attributes.xfrm_algo_auth,
    "xfrm_algo_aead": xm.xfrm_attributes.xfrm_algo_aead,
}


@pytest.mark.parametrize("name", sorted(MESSAGE_STRUCTS | ATTRIBUTE_STRUCTS))
def test_declared_fields_have_the_kernel_size(name: str) -> None:
    cls = (MESSAGE_STRUCTS | ATTRIBUTE_STRUCTS)[name]
    assert xm.struct_size(cls.fields) == xm.STRUCT_SIZES[name]


def test_template_size() -> None:
    assert xm.STRUCT_SIZES["xfrm_user_tmpl"] == xm.TEMPLATE_SIZE


def _offsets(fields: xm.Fields) -> dict[str, int]:
    out, offset = {}, 0
    for name, fmt in fields:
        out[name] = offset
        offset += struct.calcsize(fmt if fmt[0] in "<>=!@" else "=" + fmt)
    return out


# (C expression, our struct, our field) checked against the compiler's offsetof()
OFFSET_CHECKS = [
    ("xfrm_usersa_info", "sel.family", xm.xfrm_usersa_info, "sel_family"),
    ("xfrm_usersa_info", "sel.ifindex", xm.xfrm_usersa_info, "sel_ifindex"),
    ("xfrm_usersa_info", "id.spi", xm.xfrm_usersa_info, "id_spi"),
    ("xfrm_usersa_info", "saddr", xm.xfrm_usersa_info, "saddr"),
    ("xfrm_usersa_info", "lft.hard_add_expires_seconds", xm.xfrm_usersa_info, "lft_hard_add_expires_seconds"),
    ("xfrm_usersa_info", "curlft.packets", xm.xfrm_usersa_info, "curlft_packets"),
    ("xfrm_usersa_info", "stats.integrity_failed", xm.xfrm_usersa_info, "stats_integrity_failed"),
    ("xfrm_usersa_info", "reqid", xm.xfrm_usersa_info, "reqid"),
    ("xfrm_usersa_info", "family", xm.xfrm_usersa_info, "family"),
    ("xfrm_usersa_info", "flags", xm.xfrm_usersa_info, "flags"),
    ("xfrm_usersa_id", "proto", xm.xfrm_usersa_id, "proto"),
    ("xfrm_aevent_id", "flags", xm.xfrm_aevent_id, "flags"),
    ("xfrm_aevent_id", "reqid", xm.xfrm_aevent_id, "reqid"),
    ("xfrm_userpolicy_info", "priority", xm.xfrm_userpolicy_info, "priority"),
    ("xfrm_userpolicy_info", "share", xm.xfrm_userpolicy_info, "share"),
    ("xfrm_userpolicy_id", "dir", xm.xfrm_userpolicy_id, "dir"),
    ("xfrm_user_acquire", "sel.proto", xm.xfrm_user_acquire, "sel_proto"),
    ("xfrm_user_acquire", "policy.dir", xm.xfrm_user_acquire, "policy_dir"),
    ("xfrm_user_acquire", "seq", xm.xfrm_user_acquire, "seq"),
    ("xfrm_user_expire", "hard", xm.xfrm_user_expire, "hard"),
    ("xfrm_user_mapping", "new_sport", xm.xfrm_user_mapping, "new_sport"),
    ("xfrm_encap_tmpl", "encap_oa", xm.xfrm_attributes.xfrm_encap_tmpl, "encap_oa"),
    ("xfrm_replay_state_esn", "replay_window", xm.xfrm_attributes.xfrm_replay_state_esn, "replay_window"),
    ("xfrm_userpolicy_type", "reserved2", xm.xfrm_attributes.xfrm_userpolicy_type, "reserved2"),
]
TEMPLATE_OFFSET_CHECKS = ["family", "saddr", "reqid", "mode", "optional", "aalgos", "calgos"]


def test_sizes_and_offsets_match_the_uapi_header(tmp_path: Path) -> None:
    """Compile a probe against <linux/xfrm.h> (gcc, linux-libc-dev) and compare."""
    assert shutil.which("gcc"), "gcc is needed to check the struct layouts against <linux/xfrm.h>"
    assert Path("/usr/include/linux/xfrm.h").exists(), "linux-libc-dev provides <linux/xfrm.h>"
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/xfrm.h>", "int main(void) {"]
    for name in xm.STRUCT_SIZES:
        lines.append(f'printf("size {name} %zu\\n", sizeof(struct {name}));')
    for struct_name, member, _, field in OFFSET_CHECKS:
        lines.append(f'printf("offset {struct_name}.{field} %zu\\n", offsetof(struct {struct_name}, {member}));')
    for member in TEMPLATE_OFFSET_CHECKS:
        lines.append(f'printf("offset xfrm_user_tmpl.{member} %zu\\n", offsetof(struct xfrm_user_tmpl, {member}));')
    lines.append("return 0; }")
    source = tmp_path / "probe.c"
    source.write_text("\n".join(lines))
    subprocess.run(["gcc", "-o", str(tmp_path / "probe"), str(source)], check=True, capture_output=True)
    kernel = dict(
        (key, int(value))
        for kind, key, value in (
            line.split() for line in subprocess.check_output([tmp_path / "probe"], text=True).splitlines()
        )
    )
    for name, size in xm.STRUCT_SIZES.items():
        assert kernel[name] == size, name
    for struct_name, _, cls, field in OFFSET_CHECKS:
        assert _offsets(cls.fields)[field] == kernel[f"{struct_name}.{field}"], (struct_name, field)
    template = _offsets(xm.USER_TMPL_FIELDS)
    for member in TEMPLATE_OFFSET_CHECKS:
        assert template[member] == kernel[f"xfrm_user_tmpl.{member}"], member


def _encoded(msg: xm.nlmsg, msg_type: int = xm.XfrmMsgType.NEWSA) -> bytes:
    msg["header"] = {"type": msg_type, "flags": 0, "sequence_number": 1, "pid": 0}
    msg.encode()
    return bytes(msg.data)


def test_usersa_info_encodes_at_the_kernel_offsets_and_decodes_back() -> None:
    msg = xm.xfrm_usersa_info()
    msg.update(
        id_daddr=socket.inet_aton("192.0.2.2").ljust(16, b"\0"),
        id_spi=0x11223344,
        id_proto=50,
        saddr=socket.inet_aton("192.0.2.1").ljust(16, b"\0"),
        reqid=7,
        family=socket.AF_INET,
        mode=1,
        replay_window=32,
        flags=xm.XfrmStateFlag.AF_UNSPEC,
    )
    key = bytes(range(20))
    msg["attrs"] = [
        ("XFRMA_ALG_AEAD", {"alg_name": b"rfc4106(gcm(aes))", "alg_key_len": 160, "alg_icv_len": 128, "alg_key": key}),
        ("XFRMA_ENCAP", {"encap_type": 2, "encap_sport": 4500, "encap_dport": 4501, "encap_oa": bytes(16)}),
        ("XFRMA_IF_ID", 9),
        ("XFRMA_REPLAY_ESN_VAL", {"bmp_len": 2, "replay_window": 64, "bmp": [1, 2]}),
    ]
    data = _encoded(msg)
    body = data[16:]
    assert body[72:76] == bytes.fromhex("11223344")  # id.spi, network order
    assert struct.unpack_from("=H", body, 212)[0] == socket.AF_INET  # family
    assert body[215] == 32 and body[216] == xm.XfrmStateFlag.AF_UNSPEC
    aead_at = 224
    length, kind = struct.unpack_from("=HH", body, aead_at)
    assert (length, kind) == (4 + 72 + 20, xm.XfrmAttr.ALG_AEAD)
    assert body[aead_at + 4 + 72 : aead_at + 4 + 92] == key
    encap_at = aead_at + 96
    assert struct.unpack_from("=HH", body, encap_at) == (4 + 24, xm.XfrmAttr.ENCAP)
    assert body[encap_at + 6 : encap_at + 10] == struct.pack(">HH", 4500, 4501)

    decoded = decode_message(NetlinkHeader(len(data), xm.XfrmMsgType.NEWSA, 0, 1, 0), data)
    assert decoded is not None
    assert decoded["id_spi"] == 0x11223344 and decoded["reqid"] == 7
    aead = decoded.get_attr("XFRMA_ALG_AEAD")
    assert aead["alg_name"] == "rfc4106(gcm(aes))" and aead["alg_key"] == key and aead["alg_icv_len"] == 128
    assert decoded.get_attr("XFRMA_ENCAP")["encap_dport"] == 4501
    assert decoded.get_attr("XFRMA_IF_ID") == 9
    esn = decoded.get_attr("XFRMA_REPLAY_ESN_VAL")
    assert esn["bmp_len"] == 2 and esn["bmp"] == [1, 2] and esn["replay_window"] == 64


def test_algorithm_without_key_and_template_list_round_trip() -> None:
    msg = xm.xfrm_userpolicy_info()
    msg.update(dir=1, priority=5)
    templates = [
        {"id_daddr": bytes(16), "id_proto": 50, "family": 2, "saddr": bytes(16), "reqid": n, "mode": 1} for n in (1, 2)
    ]
    msg["attrs"] = [("XFRMA_TMPL", templates), ("XFRMA_MARK", {"v": 3, "m": 0xFF})]
    data = _encoded(msg, xm.XfrmMsgType.NEWPOLICY)
    length, _ = struct.unpack_from("=HH", data, 16 + 168)
    assert length == 4 + 2 * 64
    decoded = decode_message(NetlinkHeader(len(data), xm.XfrmMsgType.NEWPOLICY, 0, 1, 0), data)
    assert decoded is not None
    assert [t["reqid"] for t in decoded.get_attr("XFRMA_TMPL")] == [1, 2]
    assert decoded.get_attr("XFRMA_MARK") == {"v": 3, "m": 0xFF}

    sa = xm.xfrm_usersa_info()
    sa["attrs"] = [("XFRMA_ALG_CRYPT", {"alg_name": b"ecb(cipher_null)", "alg_key_len": 0, "alg_key": b""})]
    data = _encoded(sa)
    assert struct.unpack_from("=H", data, 16 + 224)[0] == 4 + 68
    decoded = decode_message(NetlinkHeader(len(data), xm.XfrmMsgType.NEWSA, 0, 1, 0), data)
    assert decoded is not None and decoded.get_attr("XFRMA_ALG_CRYPT")["alg_key"] == b""


def _error_message(code: int, text: str, capped: bool = True) -> bytes:
    echoed = struct.pack("=IHHII", 40, 0x10, 5, 9, 0)
    tlv_text = text.encode() + b"\0"
    tlv = struct.pack("=HH", 4 + len(tlv_text), 1) + tlv_text
    tlv += b"\0" * (-len(tlv) % 4)
    payload = struct.pack("=i", -code) + echoed + (b"" if capped else bytes(24)) + tlv
    flags = NLM_F_ACK_TLVS | (NLM_F_CAPPED if capped else 0)
    return struct.pack("=IHHII", 16 + len(payload), NLMSG_ERROR, flags, 9, 0) + payload


@pytest.mark.parametrize("capped", [True, False])
def test_extended_ack_text_is_read_from_error_messages(capped: bool) -> None:
    raw = _error_message(38, "Requested AEAD algorithm not found", capped)
    ((header, message),) = list(iter_messages(raw))
    assert parse_error(header, message) == (38, "Requested AEAD algorithm not found")


def test_truncated_or_malformed_datagrams_yield_no_message() -> None:
    good = _error_message(2, "x")
    assert len(list(iter_messages(good + good))) == 2
    assert list(iter_messages(good[:10])) == []
    assert list(iter_messages(struct.pack("=IHHII", 8, 2, 0, 0, 0))) == []  # length below the header
    assert list(iter_messages(struct.pack("=IHHII", 400, 2, 0, 0, 0))) == []  # longer than the datagram
