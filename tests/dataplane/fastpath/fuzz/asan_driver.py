"""Drive an AddressSanitizer build of `_espfast` through the Python binding with hypothesis.

Run by test_sanitizer_fuzz.py in a subprocess with LD_PRELOAD=<ASan runtime>,
PYTHONMALLOC=malloc (so every Python buffer is a malloc block ASan watches) and
`ESPFAST_ASAN_MODULE=<path of the instrumented module>`. It loads that module in place of
the normal one, then throws random batches at every entry point: list and buffer+spans
inputs, bad spans, bad slot indices, malformed filter tables, tiny flow tables, TUN frames,
ESP payloads of C and Python slots; ESP results are checked against the Python core. Runs
for `seconds` (argv[1]); any sanitizer report aborts the process with a non-zero status.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import os
import socket
import struct
import sys
import time
from array import array
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

HOT_PATH_MODULE = "esplanade.dataplane.fastpath._espfast"


def load_instrumented() -> Any:
    path = os.environ["ESPFAST_ASAN_MODULE"]
    loader = importlib.machinery.ExtensionFileLoader(HOT_PATH_MODULE, path)
    spec = importlib.util.spec_from_file_location(HOT_PATH_MODULE, path, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules[HOT_PATH_MODULE] = module
    return module


MODULE = load_instrumented()

from esplanade.dataplane.esp import InboundSa, OutboundSa  # noqa: E402
from esplanade.dataplane.fastpath import CompiledEspBatch, PacketBatch, PythonEspBatch, load_compiled  # noqa: E402
from esplanade.dataplane.fastpath.tun_frames import coalesce_frames, split_frames  # noqa: E402
from esplanade.ipsec.sa import Lifetime, SecurityAssociation, TfcPolicy  # noqa: E402
from esplanade.ipsec.selectors import TrafficSelector  # noqa: E402
from esplanade.ipsec.transforms import (  # noqa: E402
    ENCR_AES_CBC_128,
    ENCR_AES_GCM_16_128,
    ENCR_CHACHA20_POLY1305,
    INTEG_HMAC_SHA2_256_128,
    Direction,
)
from esplanade.policy.filters import PacketFilter  # noqa: E402

assert load_compiled()[0] is MODULE, "the instrumented module did not replace the normal one"
assert MODULE.build_info()["sanitized"] == 1


def associations(spi: int, encr: Any, esn: bool, window: int, lifetime: Lifetime) -> tuple[Any, Any]:
    common: dict[str, Any] = {
        "spi": spi,
        "src": "192.0.2.1",
        "dst": "198.51.100.2",
        "encr": encr,
        "encr_key": bytes(range(encr.keymat_bytes)),
        "integ": INTEG_HMAC_SHA2_256_128 if encr is ENCR_AES_CBC_128 else None,
        "integ_key": bytes(32) if encr is ENCR_AES_CBC_128 else b"",
        "esn": esn,
        "replay_window": window,
        "lifetime": lifetime,
        "tfc": TfcPolicy(pad_to=spi % 3 * 50),
        "local_ts": (TrafficSelector.from_network("10.0.0.0/24"),) if spi % 2 else (),
        "remote_ts": (TrafficSelector.from_network("10.0.0.0/16"),) if spi % 2 else (),
    }
    return SecurityAssociation(direction=Direction.OUT, **common), SecurityAssociation(direction=Direction.IN, **common)


def inner(version: int, proto: int, payload: bytes, damage: int) -> bytes:
    l4 = struct.pack("!HH", 1000, 53) + payload
    if version == 4:
        packet = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, 64, proto, 0, b"\n\0\0\1", b"\n\0\0\2") + l4
    else:
        a = bytes(15) + b"\x01"
        packet = struct.pack("!IHBB16s16s", 0x60000000, len(l4), proto, 64, a, a) + l4
    return packet[: len(packet) - damage] if damage < len(packet) else packet


packets = st.lists(
    st.builds(
        inner,
        st.sampled_from([4, 6]),
        st.sampled_from([6, 17, 1, 47]),
        st.binary(max_size=300),
        st.sampled_from([0] * 8 + [1, 5, 30]),
    ),
    max_size=40,
)


FILTER_RULES = [TrafficSelector.from_network("10.0.0.0/30"), TrafficSelector.from_network("::/0", 6)]
DELIVERED = [0]


def spans_for(items: list[bytes], junk: list[int]) -> tuple[bytearray, bytearray, int]:
    data = bytearray(b"".join(items))
    words = array("I")
    at = 0
    for item in items:
        words.extend((at, len(item), 0))
        at += len(item)
    words.extend(junk)  # extra words: past `count`, or spans running off the end when counted
    return data, bytearray(words.tobytes()), len(items) + len(junk) // 3


def raw_spans(payloads: list[bytes], junk: list[int], esn: bool, window: int, lifetime: Lifetime) -> None:
    """Buffer + spans with junk words at the end, into a throwaway table (it consumes state)."""
    counters = PythonEspBatch().table_counters
    table = MODULE.InboundTable(counters)
    out_a, in_a = associations(0x100, ENCR_AES_GCM_16_128, esn, window, lifetime)
    key = in_a.encr_key
    table.add(MODULE.Slot(InboundSa(in_a, 0.0), False, 1, key[:16], key[16:], in_a.spi, esn))
    data, spans, count = spans_for(payloads, junk)
    with contextlib.suppress(ValueError):  # a span past the end of the buffer: refused before anything runs
        MODULE.decrypt_batch(table, data, spans, count, 2.0, bytearray(), bytearray(), MODULE.FlowTable(1))
    del out_a


@given(
    batch=packets,
    esn=st.booleans(),
    window=st.sampled_from([0, 32, 64, 1024]),
    lifetime=st.sampled_from([Lifetime(), Lifetime(soft_packets=3, hard_packets=7), Lifetime(hard_bytes=900)]),
    which=st.lists(st.integers(0, 3), max_size=45),
    junk=st.lists(st.integers(0, 1 << 20), max_size=6),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=20),
    use_spans=st.booleans(),
)
@settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def esp_batches(
    batch: list[bytes],
    esn: bool,
    window: int,
    lifetime: Lifetime,
    which: list[int],
    junk: list[int],
    flips: list[tuple[int, int]],
    use_spans: bool,
) -> None:
    kinds = [ENCR_AES_GCM_16_128, ENCR_CHACHA20_POLY1305, ENCR_AES_CBC_128, ENCR_AES_GCM_16_128]
    results = []
    for core in (CompiledEspBatch(MODULE, flow_capacity=16), PythonEspBatch(flow_capacity=16)):
        inbound = []
        for k, encr in enumerate(kinds):
            out_a, in_a = associations(0x100 + k, encr, esn, window, lifetime)
            core.install_outbound(OutboundSa(out_a, 0.0, reserved_upto=1 << 20, random_bytes=lambda n: bytes(n)), out_a)
            sa = InboundSa(in_a, 0.0)
            inbound.append(sa)
            core.install_inbound(sa, in_a, core.identity_filter(PacketFilter(FILTER_RULES)))
        sel = array("H", (which + [0] * len(batch))[: len(batch)])
        esp = core.encrypt(batch, 1.0, sel)
        payloads = esp.to_list() * 2
        for at, value in flips:
            if payloads:
                victim = bytearray(payloads[at % len(payloads)])
                if victim:
                    victim[at % len(victim)] = value
                    payloads.append(bytes(victim))
        if use_spans and isinstance(core, CompiledEspBatch):
            raw_spans(payloads, junk, esn, window, lifetime)
        payloads += [b"\xff", b"\x00\x00\x00\x00ike"]
        got = core.decrypt(PacketBatch.from_packets(payloads) if use_spans else payloads, 2.0, non_esp=[])
        esp.gso_runs(1 + len(junk), 1 + sum(junk) % 70000)
        results.append((esp.to_list(), got.to_list(), [s.replay.top for s in inbound], core.drain_flows()))
    assert results[0][:2] == results[1][:2], "compiled and Python cores disagree"
    DELIVERED[0] += len(results[0][1])


@given(
    frames=st.lists(st.binary(max_size=3000), max_size=20),
    merge_udp=st.booleans(),
    junk=st.lists(st.integers(), max_size=6),
)
@settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def tun_frames(frames: list[bytes], merge_udp: bool, junk: list[int]) -> None:
    tso = [struct.pack("<BBHHHH", 1, 1, 0, 1 + len(f) % 700, 20, 16) + inner(4, 6, f, 0) for f in frames]
    split, _ = split_frames(frames + tso)
    coalesce_frames(split, merge_udp)
    coalesce_frames(frames, merge_udp)
    data, spans, count = spans_for(frames, [j & 0xFFFFFFFF for j in junk])
    with contextlib.suppress(ValueError):
        MODULE.gso_runs(spans, count, 1 + len(frames), 1 + len(data))
    gro = PacketBatch.from_segments(data, len(data), 1 + (junk[0] if junk else 7) % 1500)
    coalesce_frames(gro, merge_udp)
    table = array("H", junk[:3] or [0]).tobytes() if all(0 <= j < 1 << 16 for j in junk[:3]) else b"\0\0"
    offset = (junk[1] if len(junk) > 1 else 0) & 0xFFFFF
    for call in (
        lambda: MODULE.split_frames(data, spans, count, bytearray(), bytearray()),
        lambda: MODULE.coalesce(data, spans, count, merge_udp, bytearray(), bytearray()),
        lambda: MODULE.clamp_mss(data, spans, count, 1398, 1378),
        lambda: MODULE.select_by_tag(spans, count, table),
        lambda: MODULE.segment_spans(len(data), 1 + (junk[0] if junk else 7) % 1500, 0, offset),
    ):
        with contextlib.suppress(ValueError, IndexError):
            call()
    syn = [inner(4, 6, f, 0) for f in frames] + [inner(6, 6, f, 0) for f in frames]
    clamp_data, clamp_spans, clamp_count = spans_for(syn, [])
    MODULE.clamp_mss(clamp_data, clamp_spans, clamp_count, 536, 1220)
    # the UDP room's send and receive loops, on loopback: junk spans, junk destinations
    rx, tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind(("127.0.0.1", 0))
        rx.setsockopt(17, 104, 1)  # UDP_GRO
        port = rx.getsockname()[1]
        dest = struct.pack("=H", socket.AF_INET) + port.to_bytes(2, "big") + bytes((127, 0, 0, 1)) + bytes(8)
        good = spans_for([f[:1400] for f in frames], [])
        for dests in ((dest,), (dest, None, b"\x02")):
            with contextlib.suppress(ValueError, TypeError):
                MODULE.send_runs(tx.fileno(), good[0], good[1], good[2], dests, bool(junk), 1 + len(junk), 65000)
            with contextlib.suppress(ValueError, TypeError):
                MODULE.send_runs(tx.fileno(), data, spans, count, dests, True, 64, 65000)
        reads, room = 1 + len(junk) % 8, 1 + (junk[0] if junk else 9) % 70000
        MODULE.recv_gro(rx.fileno(), bytearray(), bytearray(), reads, room, {0x01010101})
    finally:
        rx.close()
        tx.close()
    # the TUN room's read and write loops, on a pipe: frames in, the same frames out
    read_end, write_end = os.pipe()
    try:
        os.set_blocking(read_end, False)
        os.set_blocking(write_end, False)
        written, errnos = MODULE.write_frames(write_end, data, spans_for(frames, [])[1], len(frames))
        assert written + len(errnos) == len(frames)
        buf, out_spans = bytearray(), bytearray()
        got, _ = MODULE.read_frames(read_end, buf, out_spans, 1 + len(junk), 1 + (junk[-1] if junk else 100) % 5000)
        assert got <= 1 + len(junk)
        with contextlib.suppress(ValueError):
            MODULE.write_frames(write_end, data, spans, count)
    finally:
        os.close(read_end)
        os.close(write_end)
    pumps(frames, junk)


def keyed_core() -> CompiledEspBatch:
    core = CompiledEspBatch(MODULE, flow_capacity=16)
    for k, encr in enumerate([ENCR_AES_GCM_16_128, ENCR_AES_CBC_128]):
        out_a, in_a = associations(0x200 + k, encr, False, 64, Lifetime())
        core.install_outbound(
            OutboundSa(out_a, 0.0, reserved_upto=(1 << 32) - 1, random_bytes=lambda n: bytes(n)), out_a
        )
        core.install_inbound(InboundSa(in_a, 0.0), in_a)
    return core


KEYED = keyed_core()


def pumps(frames: list[bytes], junk: list[int]) -> None:
    """pump_out and pump_in on a datagram socketpair (the TUN) and loopback UDP: junk frames, a
    cache taught junk, junk datagrams, an empty and a keyed core."""
    cache = MODULE.SlotCache()
    for f in frames:
        with contextlib.suppress(ValueError):
            cache.learn(f, 0, len(f), (junk[0] if junk else 0) & 0xFFF)
        cache.lookup(f, 0, len(f))
    kernel, datapath = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx, tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for s in (kernel, datapath, rx, tx):
            s.setblocking(False)
        rx.bind(("127.0.0.1", 0))
        rx.setsockopt(17, 104, 1)  # UDP_GRO
        port = rx.getsockname()[1]
        dest = struct.pack("=H", socket.AF_INET) + port.to_bytes(2, "big") + bytes((127, 0, 0, 1)) + bytes(8)
        slots = KEYED.slot_tuple if junk and junk[0] % 2 else ()
        for f in frames:
            with contextlib.suppress(OSError):
                kernel.send(f)
        b = [bytearray() for _ in range(8)]
        mss = (1398, 1378) if len(junk) % 2 else (-1, -1)
        with contextlib.suppress(ValueError, IndexError, RuntimeError):
            MODULE.pump_out(
                datapath.fileno(),
                b[0],
                b[1],
                1 + len(junk),
                1 + (junk[-1] if junk else 100) % 70000,
                cache,
                b[2],
                b[3],
                *mss,
                slots,
                1.0,
                None,
                b[4],
                b[5],
                tx.fileno(),
                (dest,) * len(slots),
                bool(junk),
                1 + len(junk),
                65000,
            )
        for f in frames:
            with contextlib.suppress(OSError):
                tx.sendto(f, ("127.0.0.1", port))
        if junk and len(frames) > 1:  # authentic ESP of both slots among the junk
            for payload in KEYED.encrypt(frames, 1.0, array("H", [k % 2 for k in range(len(frames))])).to_list():
                tx.sendto(payload, ("127.0.0.1", port))
        MODULE.pump_in(
            rx.fileno(),
            b[0],
            b[1],
            1 + len(junk) % 8,
            1 + (junk[0] if junk else 9) % 70000,
            {0x01010101, 0x200, 0x201},
            KEYED.inbound_table,
            1.0,
            KEYED.flows,
            b[2],
            b[3],
            *mss,
            bool(junk),
            b[6],
            b[7],
            kernel.fileno(),
        )
    finally:
        for s in (kernel, datapath, rx, tx):
            s.close()


@given(tables=st.lists(st.tuples(*[st.integers(-2, 300)] * 2, *[st.binary(max_size=40)] * 7), max_size=4))
@settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def filter_tables(tables: list[tuple[Any, ...]]) -> None:
    f = MODULE.Filter()
    try:
        f.load(tables)
    except (ValueError, TypeError, OverflowError):
        return
    for probe in (inner(4, 6, b"x", 0), inner(6, 17, b"", 0)):
        f.allows_packet(probe)


def main() -> int:
    end = time.monotonic() + float(sys.argv[1])
    rounds = 0
    while time.monotonic() < end:
        esp_batches()
        tun_frames()
        filter_tables()
        rounds += 1
    print(f"asan driver: {rounds} rounds, {DELIVERED[0]} packets delivered, no finding")
    return 0


if __name__ == "__main__":
    sys.exit(main())
