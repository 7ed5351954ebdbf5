"""The TUN room: a layer-3 TUN device (IFF_TUN | IFF_NO_PI), optionally with a virtio_net_hdr
in front of every packet (IFF_VNET_HDR) and several queues (IFF_MULTI_QUEUE), one per worker.

Each queue is its own file descriptor; the kernel picks the queue of an outgoing packet
(a packet the host routes into the TUN) by flow hash, remembering the queue on which the
flow was last *written* by us (tun_automq_select_queue / tun_flow_update), so replies
follow the worker that wrote the flow's inbound packets.

`TUNSETOFFLOAD` decides what the kernel may hand us: with TUN_F_CSUM partial checksums,
with TSO4/TSO6 TCP super-packets, with USO4|USO6 (kernel 6.2+, both or EINVAL) UDP
super-packets. Without it we get ordinary, checksummed packets of at most the MTU. Writes
may always carry a GSO header; that is how merged TCP segments go back to the kernel.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntFlag

from esplanade.dataplane.fastpath.hot_path import load_compiled
from esplanade.dataplane.fastpath.packet_batch import PacketBatch
from esplanade.dataplane.userspace.vnet_header import PLAIN_VNET_HDR, VNET_HDR_LEN

TUN_DEVICE_PATH = "/dev/net/tun"

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNGETFEATURES = 0x800454CF
TUNSETOFFLOAD = 0x400454D0
TUNGETIFF = 0x800454D2
TUNSETVNETHDRSZ = 0x400454D8
TUNSETQUEUE = 0x400454D9

IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
IFF_VNET_HDR = 0x4000

IFNAMSIZ = 16
_IFREQ = struct.Struct("16sH22x")

MAX_FRAME = 65535 + VNET_HDR_LEN


class TunOffload(IntFlag):
    NONE = 0
    CSUM = 0x01
    TSO4 = 0x02
    TSO6 = 0x04
    TSO_ECN = 0x08
    UFO = 0x10
    USO4 = 0x20
    USO6 = 0x40


class TunError(OSError):
    """The TUN device could not be created or configured as asked."""


@dataclass(frozen=True, slots=True)
class TunSettings:
    name: str
    queues: int = 1
    vnet_hdr: bool = True
    multi_queue: bool = True

    def flags(self) -> int:
        flags = IFF_TUN | IFF_NO_PI
        if self.vnet_hdr:
            flags |= IFF_VNET_HDR
        if self.multi_queue:
            flags |= IFF_MULTI_QUEUE
        return flags


def _ifreq(name: str, flags: int) -> bytes:
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ:
        raise TunError(errno.EINVAL, f"interface name {name!r} must have 1..{IFNAMSIZ - 1} bytes")
    return _IFREQ.pack(raw, flags)


def supported_features() -> int:
    """The IFF_* flags this kernel's TUN driver accepts (TUNGETFEATURES)."""
    fd = os.open(TUN_DEVICE_PATH, os.O_RDWR | os.O_CLOEXEC)
    try:
        buf = fcntl.ioctl(fd, TUNGETFEATURES, b"\x00" * 4)
        return int(struct.unpack("I", buf)[0])
    finally:
        os.close(fd)


class TunQueue:
    """One queue (file descriptor) of a TUN device: batched, non-blocking reads and writes.

    Drops are counted by reason in `drops`; no OSError escapes `read_batch`/`write_batch`.
    """

    def __init__(self, fd: int, name: str, vnet_hdr: bool, read_size: int) -> None:
        self.fd = fd
        self.name = name
        self.vnet_hdr = vnet_hdr
        self.read_size = read_size
        self.drops: Counter[str] = Counter()
        self.frames_read = 0
        self.frames_written = 0
        self._frame_buf: bytearray | None = None  # read_frames' buffer, reused
        self._frame_spans = bytearray()

    def fileno(self) -> int:
        return self.fd

    def set_read_size(self, size: int) -> None:
        self.read_size = min(MAX_FRAME, max(size, 1280 + VNET_HDR_LEN))

    def read_batch(self, limit: int) -> list[bytes]:
        """Up to `limit` frames (with the vnet header when enabled), stopping when the queue is empty."""
        frames: list[bytes] = []
        read = os.read
        fd, size = self.fd, self.read_size
        for _ in range(limit):
            try:
                frame = read(fd, size)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError as exc:
                # EBADFD while the device goes away, EIO, ...: count and let the caller wait again
                self.drops[f"read_{errno.errorcode.get(exc.errno or 0, 'error')}"] += 1
                break
            if frame:
                frames.append(frame)
        self.frames_read += len(frames)
        return frames

    def write_batch(self, frames: Iterable[bytes | memoryview]) -> int:
        """Write every frame (bytes, or views into one buffer such as a `PacketBatch`'s); return
        how many the kernel took. Failures are counted drops."""
        write = os.write
        fd = self.fd
        written = 0
        for frame in frames:
            try:
                write(fd, frame)
                written += 1
            except InterruptedError:
                try:
                    write(fd, frame)
                    written += 1
                except OSError as exc:
                    self._count_write_error(exc)
            except OSError as exc:  # EINVAL (bad header), EAGAIN/ENOBUFS (queue full), EIO (link down)
                self._count_write_error(exc)
        self.frames_written += written
        return written

    def read_frames(self, limit: int) -> PacketBatch:
        """`read_batch` in one compiled call: up to `limit` frames back to back in a buffer this
        queue reuses (the batch is valid until the next call), no Python object per frame."""
        module = load_compiled()[0]
        if module is None:
            return PacketBatch.from_packets(self.read_batch(limit))
        if self._frame_buf is None:
            self._frame_buf, self._frame_spans = bytearray(), bytearray()
        count, err = module.read_frames(self.fd, self._frame_buf, self._frame_spans, limit, self.read_size)
        self.count_reads(count, err)
        return PacketBatch(self._frame_buf, self._frame_spans, count)

    def count_reads(self, count: int, err: int) -> None:
        """read_frames' bookkeeping (also run after `_espfast.pump_out`)."""
        if err:
            self.drops[f"read_{errno.errorcode.get(err, 'error')}"] += 1
        self.frames_read += count

    def write_frames(self, frames: PacketBatch) -> int:
        """`write_batch` for a `PacketBatch` of frames, one compiled call."""
        module = load_compiled()[0]
        if module is None:
            return self.write_batch(frames)
        written, errnos = module.write_frames(self.fd, frames.data, frames.spans, frames.count)
        return self.count_writes(written, errnos)

    def count_writes(self, written: int, errnos: list[int]) -> int:
        """write_frames' bookkeeping (also run after `_espfast.pump_in`)."""
        for err in errnos:
            self.drops[f"write_{errno.errorcode.get(err, 'error')}"] += 1
        self.frames_written += written
        return int(written)

    def write_packets(self, packets: list[bytes]) -> int:
        """Write plain IP packets (a zero vnet header is added when the device uses one)."""
        if self.vnet_hdr:
            return self.write_batch([PLAIN_VNET_HDR + p for p in packets])
        return self.write_batch(packets)

    def _count_write_error(self, exc: OSError) -> None:
        self.drops[f"write_{errno.errorcode.get(exc.errno or 0, 'error')}"] += 1

    def set_offload(self, offloads: TunOffload) -> None:
        """TUNSETOFFLOAD for the whole device; raises TunError (EINVAL: unsupported combination)."""
        try:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, int(offloads))
        except OSError as exc:
            raise TunError(exc.errno, f"TUNSETOFFLOAD {offloads!r} refused on {self.name}: {exc.strerror}") from None

    def detach(self) -> None:
        """Stop receiving traffic on this queue while keeping the device alive (TUNSETQUEUE)."""
        try:
            fcntl.ioctl(self.fd, TUNSETQUEUE, _ifreq(self.name, IFF_DETACH_QUEUE))
        except OSError as exc:
            raise TunError(exc.errno, f"cannot detach queue of {self.name}: {exc.strerror}") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class TunDevice:
    """A TUN device and its queues. Closing every queue removes the device (it is not persistent)."""

    def __init__(self, settings: TunSettings, queues: list[TunQueue]) -> None:
        self.settings = settings
        self.queues = queues

    @property
    def name(self) -> str:
        return self.settings.name

    @classmethod
    def create(cls, settings: TunSettings, read_size: int = 1500 + VNET_HDR_LEN) -> TunDevice:
        if settings.queues < 1:
            raise TunError(errno.EINVAL, "a TUN device needs at least one queue")
        if settings.queues > 1 and not settings.multi_queue:
            raise TunError(errno.EINVAL, "several queues need IFF_MULTI_QUEUE")
        queues: list[TunQueue] = []
        try:
            for _ in range(settings.queues):
                queues.append(cls._open_queue(settings, read_size))
        except BaseException:
            for q in queues:
                q.close()
            raise
        return cls(settings, queues)

    @staticmethod
    def _open_queue(settings: TunSettings, read_size: int) -> TunQueue:
        fd = os.open(TUN_DEVICE_PATH, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, TUNSETIFF, _ifreq(settings.name, settings.flags()))
            if settings.vnet_hdr:
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
            os.set_blocking(fd, False)
        except OSError as exc:
            os.close(fd)
            raise TunError(exc.errno, f"cannot open TUN {settings.name}: {exc.strerror}") from None
        return TunQueue(fd, settings.name, settings.vnet_hdr, read_size)

    def set_offload(self, offloads: TunOffload) -> None:
        self.queues[0].set_offload(offloads)

    def close(self) -> None:
        for q in self.queues:
            q.close()
