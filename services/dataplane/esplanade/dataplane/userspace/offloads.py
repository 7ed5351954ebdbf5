"""Which kernel offloads this host offers, found by trying them once at start-up.

Probed: the TUN driver's IFF_VNET_HDR and IFF_MULTI_QUEUE (TUNGETFEATURES); TUNSETOFFLOAD
with TUN_F_CSUM, with TSO4|TSO6, and with USO4|USO6 (kernel 6.2+; the kernel wants both
USO bits or neither, else EINVAL) on a throw-away TUN device; UDP_SEGMENT (GSO, 4.18+),
UDP_GRO (5.0+) and SO_ATTACH_REUSEPORT_CBPF on throw-away UDP sockets. Every probe that
fails is recorded with its errno and the datapath takes the plain path for that feature.

Which offloads the datapath then *uses* (`choose_features`) is a separate, documented
decision: in pure Python, TUN TSO/CSUM offloads cost more than they save (every super-packet
must be split and checksummed here at ~2.5 µs per 1400 bytes), so the default TUN offload
mode is NONE and speed comes from UDP GSO/GRO and from merged (GSO) writes into the TUN.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import asdict, dataclass, field
from enum import Enum

from esplanade.dataplane.userspace.socket_filters import SO_ATTACH_REUSEPORT_CBPF, attach, reuseport_spi_program
from esplanade.dataplane.userspace.tun import (
    IFF_MULTI_QUEUE,
    IFF_VNET_HDR,
    TunDevice,
    TunError,
    TunOffload,
    TunSettings,
    supported_features,
)
from esplanade.dataplane.userspace.udp_socket import SOL_UDP, UDP_GRO, UDP_SEGMENT

TSO_OFFLOADS = TunOffload.CSUM | TunOffload.TSO4 | TunOffload.TSO6
USO_OFFLOADS = TunOffload.USO4 | TunOffload.USO6


class TunOffloadMode(Enum):
    """What the kernel may hand us from the TUN."""

    NONE = "none"  # checksummed packets of at most the MTU (fastest in pure Python)
    CSUM = "csum"  # partial checksums, completed here
    TSO = "tso"  # TCP (and, where available, UDP) super-packets, split and checksummed here


@dataclass(slots=True)
class OffloadReport:
    kernel: str
    tun_vnet_hdr: bool = False
    tun_multi_queue: bool = False
    tun_csum: bool = False
    tun_tso: bool = False
    tun_uso: bool = False
    udp_gso: bool = False
    udp_gro: bool = False
    reuseport_cbpf: bool = False
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, "error")


def probe_tun_offloads(device: TunDevice, report: OffloadReport) -> None:
    """Try each TUNSETOFFLOAD combination on `device`, then leave offloads off."""
    for attr, flags in (
        ("tun_csum", TunOffload.CSUM),
        ("tun_tso", TSO_OFFLOADS),
        ("tun_uso", TunOffload.CSUM | USO_OFFLOADS),
    ):
        try:
            device.set_offload(flags)
            setattr(report, attr, True)
        except TunError as exc:
            report.notes.append(f"TUNSETOFFLOAD {flags!r}: {_errname(exc)}")
    try:
        device.set_offload(TunOffload.NONE)
    except TunError as exc:
        report.notes.append(f"TUNSETOFFLOAD 0: {_errname(exc)}")


def _probe_udp(report: OffloadReport) -> None:
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    except OSError as exc:
        report.notes.append(f"UDP socket: {_errname(exc)}")
        return
    with sock:
        for attr, option in (("udp_gso", UDP_SEGMENT), ("udp_gro", UDP_GRO)):
            try:
                sock.setsockopt(SOL_UDP, option, 0 if option == UDP_SEGMENT else 1)
                setattr(report, attr, True)
            except OSError as exc:
                report.notes.append(f"setsockopt SOL_UDP {option}: {_errname(exc)}")
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            attach(sock, SO_ATTACH_REUSEPORT_CBPF, reuseport_spi_program(2))
            report.reuseport_cbpf = True
    except OSError as exc:
        report.notes.append(f"SO_ATTACH_REUSEPORT_CBPF: {_errname(exc)}")


def detect_offloads(probe_tun: bool = True) -> OffloadReport:
    """Probe everything; `probe_tun` creates (and removes) a TUN device in this netns."""
    report = OffloadReport(kernel=os.uname().release)
    try:
        features = supported_features()
        report.tun_vnet_hdr = bool(features & IFF_VNET_HDR)
        report.tun_multi_queue = bool(features & IFF_MULTI_QUEUE)
    except OSError as exc:
        report.notes.append(f"/dev/net/tun: {_errname(exc)}")
        probe_tun = False
    if probe_tun and report.tun_vnet_hdr:
        name = f"espprobe{os.getpid() % 10_000_000}"[:15]
        try:
            device = TunDevice.create(TunSettings(name=name, queues=1, vnet_hdr=True, multi_queue=False))
        except TunError as exc:
            report.notes.append(f"probe TUN: {_errname(exc)}")
        else:
            try:
                probe_tun_offloads(device, report)
            finally:
                device.close()
    _probe_udp(report)
    return report


@dataclass(frozen=True, slots=True)
class DatapathFeatures:
    """The offloads the datapath actually uses, and why each is on or off."""

    vnet_hdr: bool
    tun_offload: TunOffload
    merge_tcp: bool
    merge_udp: bool
    udp_gso: bool
    udp_gro: bool
    multi_queue: bool
    reasons: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, object]:
        return {
            "vnet_hdr": self.vnet_hdr,
            "tun_offload": str(self.tun_offload),
            "merge_tcp": self.merge_tcp,
            "merge_udp": self.merge_udp,
            "udp_gso": self.udp_gso,
            "udp_gro": self.udp_gro,
            "multi_queue": self.multi_queue,
            "reasons": list(self.reasons),
        }


def choose_features(
    report: OffloadReport,
    *,
    want_offloads: bool = True,
    tun_mode: TunOffloadMode = TunOffloadMode.NONE,
    workers: int = 1,
) -> DatapathFeatures:
    """Combine what was asked for with what the kernel offers; fall back feature by feature."""
    reasons: list[str] = []
    vnet = want_offloads and report.tun_vnet_hdr
    if want_offloads and not report.tun_vnet_hdr:
        reasons.append("IFF_VNET_HDR unsupported: plain TUN writes, no merging")
    if not want_offloads:
        reasons.append("offloads disabled by configuration")
    offload = TunOffload.NONE
    if vnet and tun_mode is TunOffloadMode.CSUM:
        if report.tun_csum:
            offload = TunOffload.CSUM
        else:
            reasons.append("TUN_F_CSUM refused: TUN offloads off")
    elif vnet and tun_mode is TunOffloadMode.TSO:
        if report.tun_tso:
            offload = TSO_OFFLOADS
            if report.tun_uso:
                offload |= USO_OFFLOADS
            else:
                reasons.append("TUN_F_USO4|USO6 refused (kernel before 6.2): no UDP super-packets from the TUN")
        else:
            reasons.append("TUN TSO refused: TUN offloads off")
    merge_udp = vnet and report.tun_uso
    if vnet and not report.tun_uso:
        reasons.append("no TUN USO (kernel before 6.2): UDP packets written to the TUN one by one")
    gso = want_offloads and report.udp_gso
    gro = want_offloads and report.udp_gro
    if want_offloads and not report.udp_gso:
        reasons.append("UDP_SEGMENT refused: one sendmsg per ESP packet")
    if want_offloads and not report.udp_gro:
        reasons.append("UDP_GRO refused: one recvmsg per ESP packet")
    multi = workers > 1
    if multi and not report.tun_multi_queue:
        raise TunError(errno.EOPNOTSUPP, "several workers need IFF_MULTI_QUEUE, which this kernel lacks")
    return DatapathFeatures(
        vnet_hdr=vnet,
        tun_offload=offload,
        merge_tcp=vnet,
        merge_udp=merge_udp,
        udp_gso=gso,
        udp_gro=gro,
        multi_queue=multi,
        reasons=tuple(reasons),
    )
