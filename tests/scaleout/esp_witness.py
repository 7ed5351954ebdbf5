"""What a capture of the peer's underlay proves about the cluster's ESP senders.

The peer is where every tunnel ends, so its `ul0` sees every ESP packet any cluster node sent
toward it (and everything the peer sent). `EspRecord` keeps, per packet: capture time, the
sender's MAC (which node), SPI, sequence number, explicit IV, and the whole IP packet (for
replays).

`single_sender_violations` checks, per outbound SPI of the cluster, that the packets form
contiguous runs per sender and that each run's numbers all lie above every number of the runs
before it: the hand-over was clean (no two nodes sending under one SA at the same time) and
the successor started above everything its predecessor could have used.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

from tests.dataplane.e2e.underlay_capture import UnderlayCapture


@dataclass(frozen=True)
class EspRecord:
    time: float
    mac: str
    source: str
    destination: str
    spi: int
    seq: int
    iv: bytes
    packet: bytes


def esp_records(capture: UnderlayCapture) -> list[EspRecord]:
    out = []
    for when, frame in capture.timed_frames():
        if int.from_bytes(frame[12:14], "big") != 0x0800:
            continue
        packet = frame[14:]
        ihl = (packet[0] & 0x0F) * 4
        if packet[9] != 17 or int.from_bytes(packet[ihl + 2 : ihl + 4], "big") != 4500:
            continue
        esp = packet[ihl + 8 :]
        if len(esp) < 16 or esp[:4] == b"\x00\x00\x00\x00":
            continue  # keep-alive or IKE
        out.append(
            EspRecord(
                when,
                frame[6:12].hex(":"),
                ".".join(str(b) for b in packet[12:16]),
                ".".join(str(b) for b in packet[16:20]),
                int.from_bytes(esp[0:4], "big"),
                int.from_bytes(esp[4:8], "big"),
                esp[8:16],
                packet,
            )
        )
    return out


def repeated_nonces(records: list[EspRecord]) -> tuple[list[tuple[int, int]], list[tuple[int, bytes]]]:
    """(SPI, sequence) and (SPI, IV) pairs seen more than once."""
    seqs = Counter((r.spi, r.seq) for r in records)
    ivs = Counter((r.spi, r.iv) for r in records)
    return [k for k, n in seqs.items() if n > 1], [k for k, n in ivs.items() if n > 1]


def runs_by_sender(records: list[EspRecord], spi: int) -> list[tuple[str, list[int]]]:
    runs: list[tuple[str, list[int]]] = []
    for record in records:
        if record.spi != spi:
            continue
        if runs and runs[-1][0] == record.mac:
            runs[-1][1].append(record.seq)
        else:
            runs.append((record.mac, [record.seq]))
    return runs


def single_sender_violations(records: list[EspRecord], spis: list[int]) -> list[str]:
    problems = []
    for spi in spis:
        highest = 0
        seen_senders: dict[str, int] = defaultdict(int)
        for mac, seqs in runs_by_sender(records, spi):
            seen_senders[mac] += 1
            if min(seqs) <= highest:
                problems.append(f"SPI {spi:#x}: {mac} sent {min(seqs)} after {highest} was sent")
            highest = max(highest, max(seqs))
    return problems
