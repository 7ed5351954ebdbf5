"""A batch of packets in one buffer: what the batch loops take and return.

`data` holds the packets back to back; `spans` holds, per packet, three native u32 words:
offset into `data`, length, and a tag (the outbound slot index for ESP payloads, the SPI for
decrypted inner packets, the source frame for split packets, the first packet for merged
TUN frames). `data` is exactly the packets, so a batch of equal-sized ESP payloads can go to
a UDP socket as one GSO send (`data`, segment size = the common length).

Each batch owns its buffers: the next batch never overwrites them.

For the UDP room: `gso_runs()` plans the GSO sends of a result (runs of contiguous,
equal-sized payloads with one tag: one sendmsg each, straight from `data`), and
`from_segments()` turns a UDP GRO read (one buffer, one segment size) into a batch without
slicing it.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

SPAN_WORDS = 3
SPAN_BYTES = 4 * SPAN_WORDS

BytesLike = bytes | bytearray | memoryview


class PacketBatch:
    __slots__ = ("_words", "count", "data", "spans")

    def __init__(self, data: bytearray, spans: bytearray, count: int) -> None:
        if count * SPAN_BYTES > len(spans):
            raise ValueError("count exceeds the spans")
        self.data = data
        self.spans = spans
        self.count = count
        self._words: memoryview | None = None

    @classmethod
    def empty(cls) -> PacketBatch:
        return cls(bytearray(), bytearray(), 0)

    @classmethod
    def from_segments(cls, data: bytearray, nbytes: int, segment: int, tag: int = 0) -> PacketBatch:
        """A GRO read: `nbytes` of `data` holding datagrams of `segment` bytes (the last may be shorter)."""
        spans = segment_spans(nbytes, segment, tag)
        if nbytes > len(data):
            raise ValueError("bad GRO segment layout")
        return cls(data, spans, len(spans) // SPAN_BYTES)

    @classmethod
    def from_packets(cls, packets: Iterable[BytesLike], tags: Iterable[int] | None = None) -> PacketBatch:
        """Copy packets into one buffer (tags default to 0)."""
        parts = [bytes(p) for p in packets]
        tag_list = list(tags) if tags is not None else [0] * len(parts)
        if len(tag_list) != len(parts):
            raise ValueError("one tag per packet")
        words = array("I")
        at = 0
        for part, tag in zip(parts, tag_list, strict=True):
            words.extend((at, len(part), tag))
            at += len(part)
        return cls(bytearray(b"".join(parts)), bytearray(words.tobytes()), len(parts))

    def _span_words(self) -> memoryview:
        if self._words is None:
            self._words = memoryview(self.spans).cast("I")
        return self._words

    def __len__(self) -> int:
        return self.count

    def span(self, i: int) -> tuple[int, int, int]:
        """(offset, length, tag) of packet `i`."""
        if not 0 <= i < self.count:
            raise IndexError(i)
        w = self._span_words()
        j = SPAN_WORDS * i
        return w[j], w[j + 1], w[j + 2]

    def packet(self, i: int) -> memoryview:
        offset, length, _ = self.span(i)
        return memoryview(self.data)[offset : offset + length]

    def __iter__(self) -> Iterator[memoryview]:
        view = memoryview(self.data)
        w = self._span_words()
        for j in range(0, SPAN_WORDS * self.count, SPAN_WORDS):
            yield view[w[j] : w[j] + w[j + 1]]

    def gso_runs(self, max_segments: int = 64, max_bytes: int = 65000) -> list[tuple[int, int, int, int, int]]:
        """(offset, length, segment size, count, tag) per UDP GSO send: contiguous packets with one tag,
        all of the first one's size but a shorter last one, at most `max_segments` and `max_bytes`."""
        module = _compiled()
        if module is not None:
            runs: list[tuple[int, int, int, int, int]] = module.gso_runs(
                self.spans, self.count, max_segments, max_bytes
            )
            return runs
        out: list[tuple[int, int, int, int, int]] = []
        w = self._span_words()
        i = 0
        while i < self.count:
            offset, size, tag = w[3 * i], w[3 * i + 1], w[3 * i + 2]
            total, end, j = size, offset + size, i + 1
            while j < self.count and j - i < max_segments:
                o, n, t = w[3 * j], w[3 * j + 1], w[3 * j + 2]
                if t != tag or o != end or n > size or total + n > max_bytes:
                    break
                total, end, j = total + n, end + n, j + 1
                if n < size:
                    break
            out.append((offset, total, size, j - i, tag))
            i = j
        return out

    def spans_list(self) -> list[tuple[int, int, int]]:
        """(offset, length, tag) of every packet."""
        w = self._span_words()
        return [(w[j], w[j + 1], w[j + 2]) for j in range(0, SPAN_WORDS * self.count, SPAN_WORDS)]

    def tags(self) -> list[int]:
        w = self._span_words()
        return [w[j + 2] for j in range(0, SPAN_WORDS * self.count, SPAN_WORDS)]

    def to_list(self) -> list[bytes]:
        """Copies of the packets as bytes (for shells that keep packets past the next batch)."""
        data = self.data
        w = self._span_words()
        return [bytes(data[w[j] : w[j] + w[j + 1]]) for j in range(0, SPAN_WORDS * self.count, SPAN_WORDS)]

    def __repr__(self) -> str:
        return f"PacketBatch(count={self.count}, bytes={len(self.data)})"


PacketsIn = Sequence[BytesLike] | PacketBatch


def segment_spans(nbytes: int, segment: int, tag: int = 0, offset: int = 0) -> bytearray:
    """Spans of the datagrams of one GRO read lying at `offset` of its buffer (`segment` bytes each,
    the last may be shorter); several reads into one buffer make one batch by concatenating these."""
    if segment < 1 or nbytes < 0 or offset < 0:
        raise ValueError("bad GRO segment layout")
    module = _compiled()
    if module is not None:
        spans: bytearray = module.segment_spans(nbytes, segment, tag, offset)
        return spans
    words = array("I")
    for at in range(0, nbytes, segment):
        words.extend((offset + at, min(segment, nbytes - at), tag))
    return bytearray(words.tobytes())


_LOADER: list[Callable[[], tuple[Any, str]]] = []  # hot_path.load_compiled, once imported


def _compiled() -> Any:
    if not _LOADER:  # imported late: hot_path imports this module
        from esplanade.dataplane.fastpath.hot_path import load_compiled

        _LOADER.append(load_compiled)
    return _LOADER[0]()[0]
