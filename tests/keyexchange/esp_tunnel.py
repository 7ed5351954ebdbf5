"""Test-only userspace ESP tunnel: TUN device + ESP-in-UDP (RFC 3948) on the shell's 4500 socket.

Just enough of RFC 4303 to carry pings and TCP against strongSwan's kernel-libipsec: tunnel
mode, AES-GCM-16 (RFC 4106), ChaCha20-Poly1305 (RFC 7634), AES-CBC + HMAC-SHA2 (RFC 4868),
no ESN, a 64-packet replay window. Not the production dataplane.
"""

from __future__ import annotations

import fcntl
import hmac
import os
import struct
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from esplanade.ipsec.sa import SecurityAssociation
from esplanade.ipsec.transforms import EncrId

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


@dataclass
class EspState:
    sa: SecurityAssociation
    seq: int = 0
    highest: int = 0
    window: int = 0
    aead: AESGCM | ChaCha20Poly1305 | None = None
    salt: bytes = b""
    packets: int = 0
    bytes: int = 0
    child_id: str = ""

    def __post_init__(self) -> None:
        sa = self.sa
        assert sa.encr is not None
        key = sa.encr_key[: sa.encr.key_bytes]
        self.salt = sa.encr_key[sa.encr.key_bytes :]
        if sa.encr.encr_id == EncrId.AES_GCM_16:
            self.aead = AESGCM(key)
        elif sa.encr.encr_id == EncrId.CHACHA20_POLY1305:
            self.aead = ChaCha20Poly1305(key)

    def encrypt(self, inner: bytes, next_header: int) -> bytes:
        sa = self.sa
        assert sa.encr is not None
        self.seq += 1
        hdr = struct.pack("!II", sa.spi, self.seq)
        block = 4 if self.aead is not None else 16
        pad = (-(len(inner) + 2)) % block
        plain = inner + bytes(range(1, pad + 1)) + bytes((pad, next_header))
        self.packets += 1
        self.bytes += len(inner)
        if self.aead is not None:
            iv = struct.pack("!Q", self.seq)
            return hdr + iv + self.aead.encrypt(self.salt + iv, plain, hdr)
        iv = os.urandom(16)
        enc = Cipher(algorithms.AES(sa.encr_key), modes.CBC(iv)).encryptor()
        body = hdr + iv + enc.update(plain) + enc.finalize()
        assert sa.integ is not None
        return body + hmac.digest(sa.integ_key, body, sa.integ.hash_name)[: sa.integ.icv_bytes]

    def decrypt(self, pkt: bytes) -> tuple[bytes, int] | None:
        sa = self.sa
        assert sa.encr is not None
        if len(pkt) < 8 + sa.encr.iv_bytes + 16:
            return None
        seq = struct.unpack("!I", pkt[4:8])[0]
        if not self._replay_ok(seq):
            return None
        try:
            if self.aead is not None:
                iv = pkt[8:16]
                plain = self.aead.decrypt(self.salt + iv, pkt[16:], pkt[:8])
            else:
                assert sa.integ is not None
                n = sa.integ.icv_bytes
                if not hmac.compare_digest(hmac.digest(sa.integ_key, pkt[:-n], sa.integ.hash_name)[:n], pkt[-n:]):
                    return None
                dec = Cipher(algorithms.AES(sa.encr_key), modes.CBC(pkt[8:24])).decryptor()
                plain = dec.update(pkt[24:-n]) + dec.finalize()
        except Exception:
            return None
        self._replay_mark(seq)
        pad, nh = plain[-2], plain[-1]
        self.packets += 1
        self.bytes += len(plain) - pad - 2
        return plain[: -pad - 2], nh

    def _replay_ok(self, seq: int) -> bool:
        if seq == 0:
            return False
        if seq > self.highest:
            return True
        off = self.highest - seq
        return off < 64 and not (self.window >> off) & 1

    def _replay_mark(self, seq: int) -> None:
        if seq > self.highest:
            self.window = ((self.window << (seq - self.highest)) | 1) & ((1 << 64) - 1)
            self.highest = seq
        else:
            self.window |= 1 << (self.highest - seq)


@dataclass
class EspTunnel:
    """Inbound SAs by SPI; the newest outbound SA carries traffic (make-before-break)."""

    tun_fd: int
    send_udp: object  # Callable[[bytes, Address, Address], None]
    inbound: dict[int, EspState] = field(default_factory=dict)
    outbound: list[EspState] = field(default_factory=list)
    drops: int = 0

    def install_inbound(self, sa: SecurityAssociation, child_id: str) -> None:
        self.inbound[sa.spi] = EspState(sa, child_id=child_id)

    def install_outbound(self, sa: SecurityAssociation, child_id: str) -> None:
        self.outbound = [o for o in self.outbound if o.child_id != child_id]
        self.outbound.append(EspState(sa, child_id=child_id))

    def remove_child(self, child_id: str) -> None:
        self.outbound = [o for o in self.outbound if o.child_id != child_id]
        for spi in [s for s, st in self.inbound.items() if st.child_id == child_id]:
            del self.inbound[spi]

    def on_tun_readable(self) -> None:
        while True:
            try:
                pkt = os.read(self.tun_fd, 65535)
            except BlockingIOError:
                return
            if not self.outbound:
                self.drops += 1
                continue
            st = self.outbound[-1]
            nh = 4 if pkt[0] >> 4 == 4 else 41
            esp = st.encrypt(pkt, nh)
            assert st.sa.encap is not None
            self.send_udp(esp, (st.sa.src, st.sa.encap.src_port), (st.sa.dst, st.sa.encap.dst_port))  # type: ignore[operator]

    def on_esp(self, data: bytes, local: tuple[str, int], remote: tuple[str, int]) -> None:
        if len(data) < 8:
            return
        spi = struct.unpack("!I", data[:4])[0]
        st = self.inbound.get(spi)
        if st is None:
            self.drops += 1
            return
        out = st.decrypt(data)
        if out is None:
            self.drops += 1
            return
        inner, nh = out
        if nh in (4, 41):
            os.write(self.tun_fd, inner)
