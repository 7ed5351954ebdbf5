"""Micro-benchmark of the ESP batch room: compiled loop vs pure Python, µs per packet.

    .venv/bin/python -m bench.esp_fastpath [--size 1400] [--batch 64] [--rounds 100]

AES-GCM-16-128, tunnel mode, IPv4 inner TCP packets of `--size` bytes, batches of `--batch`,
with the identity packet filter (a handful of rules) and flow accounting on, as the
datapath runs them. Encrypt takes the batch as a list of bytes (TUN reads); decrypt takes it
as a list (recvmmsg) and as one buffer plus spans (a UDP GRO read). Also: TSO splitting of a
64 KiB super-packet and GRO merging of 44 segments (C only), and the per-batch cost of
mirroring the Python SA state (the intercept of time over batch size). Prints one JSON
record per line: {"name", "value", "unit"}. Time is process CPU time, best of 5 (the
machine is shared).
"""

from __future__ import annotations

import argparse
import json
import struct
import time
from array import array
from collections.abc import Callable

from bench.records import Figure
from esplanade.dataplane.esp import InboundSa, OutboundSa, decrypt_batch
from esplanade.dataplane.fastpath import (
    CompiledEspBatch,
    EspBatchCore,
    PacketBatch,
    PythonEspBatch,
    load_compiled,
)
from esplanade.dataplane.fastpath.tun_frames import coalesce_frames, split_frames
from esplanade.ipsec.sa import SecurityAssociation
from esplanade.ipsec.selectors import TrafficSelector
from esplanade.ipsec.transforms import ENCR_AES_GCM_16_128, Direction
from esplanade.policy.filters import PacketFilter

REPEATS = 5


def inner_packet(size: int, seq: int = 0) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, 0, 0x4000, 64, 6, 0, b"\x0a\x01\x00\x01", b"\x0a\x02\x00\x01")
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 1, 0x50, 0x10, 512, 0, 0)
    return header + tcp + bytes(size - 40)


def associations() -> tuple[SecurityAssociation, SecurityAssociation]:
    common: dict[str, object] = {
        "spi": 0x1000,
        "src": "192.0.2.1",
        "dst": "198.51.100.2",
        "encr": ENCR_AES_GCM_16_128,
        "encr_key": bytes(range(20)),
        "replay_window": 1024,
    }
    out = SecurityAssociation(direction=Direction.OUT, **common)  # type: ignore[arg-type]
    inb = SecurityAssociation(direction=Direction.IN, **common)  # type: ignore[arg-type]
    return out, inb


def identity_rules() -> PacketFilter:
    return PacketFilter(
        [
            TrafficSelector.from_network("10.2.0.0/24", 6, 22, 22),
            TrafficSelector.from_network("10.2.0.0/24", 6, 5201, 5201),
            TrafficSelector.from_network("10.2.0.0/16", 17, 53, 53),
            TrafficSelector.from_network("10.3.0.0/16"),
            TrafficSelector.from_network("2001:db8::/32", 6, 443, 443),
        ]
    )


def best_us(run: Callable[[], None], packets: int) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.process_time()
        run()
        best = min(best, time.process_time() - t0)
    return best / packets * 1e6


def measure_core(make: Callable[[], EspBatchCore], batch: list[bytes], rounds: int) -> dict[str, float]:
    out_a, in_a = associations()
    n = len(batch) * rounds

    encryptor = make()
    sender = OutboundSa(out_a, 0.0, reserved_upto=1 << 40)
    encryptor.install_outbound(sender, out_a)

    def enc() -> None:
        for _ in range(rounds):
            encryptor.encrypt(batch, 0.0)

    wire = [encryptor.encrypt(batch, 0.0) for _ in range(rounds)]
    as_lists = [w.to_list() for w in wire]

    def decrypt(inputs: list[list[bytes]] | list[PacketBatch]) -> Callable[[], None]:
        def run() -> None:
            core = make()
            core.install_inbound(InboundSa(in_a, 0.0), in_a, core.identity_filter(identity_rules()))
            for item in inputs:
                got = core.decrypt(item, 0.0)
                assert len(got) == len(batch)
            core.drain_flows()

        return run

    return {
        "encrypt": best_us(enc, n),
        "decrypt": best_us(decrypt(as_lists), n),
        "decrypt_spans": best_us(decrypt(wire), n),
    }


def engine_only(batch: list[bytes], rounds: int) -> float:
    """The bare pure-Python engine (decrypt_batch, no filter, no flows), for reference."""
    out_a, in_a = associations()
    core = PythonEspBatch()
    core.install_outbound(OutboundSa(out_a, 0.0, reserved_upto=1 << 40), out_a)
    wire = [core.encrypt(batch, 0.0).to_list() for _ in range(rounds)]

    def run() -> None:
        receiver = InboundSa(in_a, 0.0)
        for item in wire:
            decrypt_batch(receiver, item, 0.0)

    return best_us(run, len(batch) * rounds)


def per_batch_overhead(module: object, size: int) -> tuple[float, float]:
    """(µs per batch, µs per packet) from a fit over batch sizes: what mirroring the state costs."""
    out_a, _ = associations()
    points = []
    for count in (1, 2, 4, 8, 16, 32, 64):
        core = CompiledEspBatch(module)  # type: ignore[arg-type]
        core.install_outbound(OutboundSa(out_a, 0.0, reserved_upto=1 << 40), out_a)
        batch = [inner_packet(size)] * count
        rounds = 4096 // count

        def run(core: CompiledEspBatch = core, batch: list[bytes] = batch, rounds: int = rounds) -> None:
            for _ in range(rounds):
                core.encrypt(batch, 0.0)

        points.append((count, best_us(run, rounds)))  # µs per batch
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    return mean_y - slope * mean_x, slope


def replay_copy_cost(words: int) -> float:
    """µs per batch the alternative design would pay: copying the replay words in and out."""
    blocks = list(range(words))

    def run() -> None:
        for _ in range(1000):
            list(array("Q", blocks))

    return best_us(run, 1000)


def segmentation(rounds: int) -> dict[str, float]:
    payload = 65535 - 40 - 20
    packet = inner_packet(40 + payload)
    frame = struct.pack("<BBHHHH", 1, 1, 40, 1448, 20, 16) + packet
    split, _ = split_frames([frame])
    segments = split.to_list()

    def run_split() -> None:
        for _ in range(rounds):
            split_frames([frame])

    def run_merge() -> None:
        for _ in range(rounds):
            coalesce_frames(segments)

    n = rounds * len(segments)
    return {"split": best_us(run_split, n), "merge": best_us(run_merge, n), "segments": float(len(segments))}


def run(size: int = 1400, batch_size: int = 64, rounds: int = 100) -> list[Figure]:
    module, why = load_compiled()
    if module is None:
        raise RuntimeError(f"the compiled loop is not available: {why}")
    batch = [inner_packet(size, i * size) for i in range(batch_size)]
    compiled = measure_core(lambda: CompiledEspBatch(module), batch, rounds)
    python = measure_core(PythonEspBatch, batch, max(10, rounds // 5))
    bare = engine_only(batch, max(10, rounds // 5))
    fixed, per_packet = per_batch_overhead(module, size)
    seg = segmentation(rounds)
    group = f"ESP batch room, AES-GCM-128, {batch_size} x {size} B, filter + flows"
    figures = []
    for key, label in (
        ("encrypt", "encrypt"),
        ("decrypt", "decrypt (list)"),
        ("decrypt_spans", "decrypt (buffer+spans)"),
    ):
        figures.append(
            Figure(
                f"esp_fastpath {label}",
                compiled[key],
                "us/packet",
                peer="pure Python",
                peer_value=python[key],
                higher_is_better=False,
                group=group,
            )
        )
    figures += [
        Figure(
            "esp_fastpath python engine decrypt_batch (no filter, no flows)",
            bare,
            "us/packet",
            higher_is_better=False,
            group=group,
        ),
        Figure(
            "esp_fastpath per-batch fixed cost (state mirror, call)",
            fixed,
            "us/batch",
            higher_is_better=False,
            group=group,
        ),
        Figure(
            "esp_fastpath per-packet marginal cost (encrypt)",
            per_packet,
            "us/packet",
            higher_is_better=False,
            group=group,
        ),
        Figure(
            "esp_fastpath replay words copy-sync, W=1024 (not used)",
            replay_copy_cost(17),
            "us/batch",
            higher_is_better=False,
            group=group,
        ),
        Figure(
            "esp_fastpath replay words copy-sync, W=65536 (not used)",
            replay_copy_cost(1025),
            "us/batch",
            higher_is_better=False,
            group=group,
        ),
        Figure(
            f"esp_fastpath TSO split 64 KiB into {seg['segments']:.0f}",
            seg["split"],
            "us/segment",
            higher_is_better=False,
            group=group,
        ),
        Figure(
            f"esp_fastpath GRO merge {seg['segments']:.0f} segments",
            seg["merge"],
            "us/segment",
            higher_is_better=False,
            group=group,
        ),
    ]
    return figures


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1400)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=100)
    args = ap.parse_args()
    for figure in run(args.size, args.batch, args.rounds):
        record: dict[str, object] = {"name": figure.name, "value": round(figure.value, 4), "unit": figure.unit}
        if figure.peer_value is not None:
            record["python"] = round(figure.peer_value, 4)
            record["speedup"] = round(figure.peer_value / figure.value, 1)
        print(json.dumps(record))


if __name__ == "__main__":
    main()
