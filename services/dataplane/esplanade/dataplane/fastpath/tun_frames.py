"""TSO/USO splitting of TUN frames and GRO-style merging for TUN writes, in C.

The same rules as the userspace datapath's pure-Python `segmentation` module
(`split_super_packet`, `coalesce_for_tun`): splitting a virtio_net_hdr super-packet (GSO
TCPV4/TCPV6/UDP_L4) into gso_size segments with their IPv4 ID, total length, header checksum
and TCP/UDP checksums, completing NEEDS_CSUM checksums, and merging consecutive TCP segments
(and UDP datagrams, `merge_udp`) of one flow into one frame with a GSO header and the
pseudo-header sum in the checksum field. Checksums follow RFC 1071 with end-around carry, as
Linux and scapy compute them: where the sum of non-zero data is a multiple of 0xFFFF the
field is 0x0000 (the pure-Python reference's modulo arithmetic writes the equivalent 0xFFFF;
both verify).

Frames the C code cannot split (short, unknown GSO type, UFO, offsets outside the packet, an
IPv4 header length below 5 words or a TCP data offset below 5) are counted in `dropped`.
"""

from __future__ import annotations

from esplanade.dataplane.fastpath.hot_path import HotPathUnavailable, load_compiled
from esplanade.dataplane.fastpath.packet_batch import PacketBatch, PacketsIn


def _module() -> object:
    module, why = load_compiled()
    if module is None:
        raise HotPathUnavailable(why)
    return module


def split_frames(frames: PacketsIn) -> tuple[PacketBatch, int]:
    """TUN frames (virtio_net_hdr + packet) -> wire packets (tags: frame index), and frames dropped."""
    module = _module()
    data, spans = bytearray(), bytearray()
    if isinstance(frames, PacketBatch):
        n, dropped = module.split_frames(frames.data, frames.spans, frames.count, data, spans)  # type: ignore[attr-defined]
    else:
        n, dropped = module.split_frames(frames, None, -1, data, spans)  # type: ignore[attr-defined]
    return PacketBatch(data, spans, n), dropped


def clamp_mss(packets: PacketBatch, mss_v4: int, mss_v6: int) -> int:
    """Lower the MSS option of every TCP SYN / SYN-ACK in the batch in place (checksum updated,
    RFC 1624), as `userspace.mtu.MssClamp` does packet by packet; returns how many changed."""
    module = _module()
    clamped: int = module.clamp_mss(packets.data, packets.spans, packets.count, mss_v4, mss_v6)  # type: ignore[attr-defined]
    return clamped


def coalesce_frames(packets: PacketsIn, merge_udp: bool = False) -> PacketBatch:
    """Inner packets -> TUN frames (virtio_net_hdr + packet), mergeable runs merged (tags: first packet)."""
    module = _module()
    data, spans = bytearray(), bytearray()
    if isinstance(packets, PacketBatch):
        n = module.coalesce(packets.data, packets.spans, packets.count, merge_udp, data, spans)  # type: ignore[attr-defined]
    else:
        n = module.coalesce(packets, None, -1, merge_udp, data, spans)  # type: ignore[attr-defined]
    return PacketBatch(data, spans, n)
