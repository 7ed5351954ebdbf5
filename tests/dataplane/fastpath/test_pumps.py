"""The per-wake-up pumps (`_espfast.pump_out`, `pump_in`) against the pure-Python engine.

A pump is the datapath's chain of compiled steps run from C. These tests feed it real
descriptors (a datagram socketpair stands for the TUN queue, loopback UDP sockets for the
outer socket) and compare what comes out with the pure-Python core fed the same packets:
ESP payloads and TUN frames byte for byte, and the SA state afterwards. The flow -> slot cache
must take exactly the frames whose SPD decision the transform caches.
"""

from __future__ import annotations

import errno
import os
import random
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from esplanade.dataplane.fastpath import PythonEspBatch
from esplanade.dataplane.fastpath.tun_frames import clamp_mss, coalesce_frames, split_frames
from tests.dataplane.esp.suites import sa_pair
from tests.dataplane.fastpath.test_tun_frames import (
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP,
    GSO_UDP_L4,
    NEEDS_CSUM,
    super_packets,
    tcp_flow,
    vnet,
)
from tests.dataplane.fastpath.twins import (
    AEAD_SUITES,
    both_cores,
    compiled_module,
    inbound,
    inbound_state,
    outbound,
    outbound_state,
)

MAX32 = (1 << 32) - 1
VNET = bytes(10)  # a plain frame's virtio_net_hdr
FRAME_MAX = 65536 + 10


def keys(seed: int) -> dict[str, bytes]:
    return {"encr_key": bytes((seed + i) % 256 for i in range(32)), "integ_key": b""}


@pytest.fixture
def tun_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(the kernel's end, the datapath's end) of a stand-in TUN queue: one datagram per frame."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def udp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    tx.bind(("127.0.0.1", 0))
    rx.bind(("127.0.0.1", 0))
    tx.setblocking(False)
    rx.setblocking(False)
    yield tx, rx
    tx.close()
    rx.close()


def sockaddr(sock: socket.socket) -> bytes:
    host, port = sock.getsockname()
    return struct.pack("=H", socket.AF_INET) + port.to_bytes(2, "big") + socket.inet_aton(host) + bytes(8)


def drain(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(1 << 17))
        except BlockingIOError:
            return out


def frames_of(seed: int) -> list[bytes]:
    """TSO frames of two TCP flows (IPv4, IPv6), a plain UDP frame and a plain ICMP frame."""
    rng = random.Random(seed)
    frames = coalesce_frames(tcp_flow(rng, v6=False, count=rng.randint(1, 30))).to_list()
    frames += coalesce_frames(tcp_flow(rng, v6=True, count=rng.randint(1, 30), sport=41000)).to_list()
    frames.append(VNET + bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=5, dport=6) / Raw(b"u" * 50)))
    frames.append(VNET + bytes(IP(src="10.0.0.1", dst="10.0.0.2", proto=1) / Raw(b"\x08\x00" + bytes(30))))
    return frames


def transform_key(frame: bytes) -> bytes | None:
    """EspTransform._decision_at's flow-cache key of a frame (None: not cached)."""
    buf, base, end = frame, 10, len(frame)
    n = end - base
    b0 = buf[base] if n >= 40 else 0
    if b0 == 0x45:
        if not buf[base + 6] & 0x3F and not buf[base + 7] and buf[base + 9] in (6, 17):
            return bytes([buf[base + 9]]) + buf[base + 12 : base + 24]
        return None
    if b0 >> 4 == 6 and n >= 44 and buf[base + 6] in (6, 17):
        return bytes([buf[base + 6]]) + buf[base + 8 : base + 44]
    return None


def pump_out(
    module: Any,
    core: Any,
    cache: Any,
    tun: socket.socket,
    udp: socket.socket,
    dest: bytes,
    mss: tuple[int, int] = (-1, -1),
) -> Any:
    bufs = [bytearray() for _ in range(6)]
    got = module.pump_out(
        tun.fileno(),
        bufs[0],
        bufs[1],
        64,
        FRAME_MAX,
        cache,
        bufs[2],
        bufs[3],
        *mss,
        core.slot_tuple,
        5.0,
        core.flows,
        bufs[4],
        bufs[5],
        udp.fileno(),
        (dest,) * len(core.slot_tuple),
        False,
        64,
        65000,
    )
    return got, bufs


# -- the cache -------------------------------------------------------------------------------------
@st.composite
def any_frames(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["v4", "v6", "junk"]))
    payload = draw(st.binary(max_size=30))
    proto = draw(st.sampled_from([6, 17, 1, 58, 132]))
    if kind == "v4":
        frag = draw(st.sampled_from([0, 0, 1, 0x2000]))
        ihl = draw(st.sampled_from([5, 5, 6]))
        dst = draw(st.sampled_from(["10.0.0.2", "10.0.0.3"]))
        ip = IP(src="10.0.0.1", dst=dst, proto=proto, ihl=ihl, frag=frag & 0x1FFF, flags=frag >> 13)
        packet = bytes(ip / Raw(bytes(20) + payload))
    elif kind == "v6":
        packet = bytes(IPv6(src="2001:db8::1", dst="2001:db8::2", nh=proto) / Raw(payload))
    else:
        packet = draw(st.binary(max_size=80))
    return draw(st.binary(min_size=0, max_size=10)).ljust(10, b"\0")[:10] + packet


@given(frames=st.lists(any_frames(), max_size=12), slots=st.lists(st.integers(0, 3), min_size=12, max_size=12))
@settings(max_examples=200, deadline=None)
def test_cache_takes_exactly_the_transforms_flow_keys(frames: list[bytes], slots: list[int]) -> None:
    cache = compiled_module().SlotCache()
    expected: dict[bytes, int] = {}
    for frame, slot in zip(frames, slots, strict=False):
        key = transform_key(frame)
        assert cache.learn(frame, 0, len(frame), slot) == (key is not None)
        if key is not None:
            expected[key] = slot
    for frame in frames:
        key = transform_key(frame)
        assert cache.lookup(frame, 0, len(frame)) == (expected[key] if key is not None else -1)
    assert len(cache) == len(expected)
    cache.clear()
    assert len(cache) == 0
    assert all(cache.lookup(f, 0, len(f)) == -1 for f in frames)


def test_cache_rejects_bad_spans() -> None:
    cache = compiled_module().SlotCache()
    for args in [(b"x" * 60, 10, 60, 0), (b"x" * 60, -1, 5, 0), (b"x" * 60, 0, 60, 0xFFFF), (b"x" * 60, 0, 60, -1)]:
        with pytest.raises(ValueError):
            cache.learn(*args)
    with pytest.raises(ValueError):
        cache.lookup(b"x" * 4, 2, 5)


# -- outbound --------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_pump_out_seals_known_flows_like_the_python_engine(
    seed: int, tun_pair: tuple[socket.socket, socket.socket], udp_pair: tuple[socket.socket, socket.socket]
) -> None:
    module = compiled_module()
    suite = AEAD_SUITES[seed % len(AEAD_SUITES)]
    out_a, _ = sa_pair(suite, encr_key=bytes(range(suite.encr_key_bytes)), integ_key=b"")
    compiled, python = both_cores()
    sa_c, sa_p = outbound(out_a, reserved_upto=MAX32), outbound(out_a, reserved_upto=MAX32)
    compiled.install_outbound(sa_c, out_a)
    python.install_outbound(sa_p, out_a)
    kernel, datapath = tun_pair
    tx, rx = udp_pair
    cache = module.SlotCache()
    frames = frames_of(seed)
    cached = [f for f in frames if transform_key(f) is not None]

    # nothing learned: the pump stops after the split, the packets wait for Python
    for frame in cached:
        kernel.send(frame)
    (nframes, err, npackets, dropped, _, _, sealed, used, sent, _, aside), bufs = pump_out(
        module, compiled, cache, datapath, tx, sockaddr(rx)
    )
    reference, ref_dropped = split_frames(cached)
    assert (nframes, err, sealed, used, sent, aside) == (len(cached), 0, -1, (), 0, [])
    assert (npackets, dropped) == (reference.count, ref_dropped)
    assert bytes(bufs[2]) == bytes(reference.data)
    assert drain(rx) == []

    # every flow learned: sealed and sent in the same call, as the Python engine seals them
    for frame in cached:
        assert cache.learn(frame, 0, len(frame), 0)
        kernel.send(frame)
    (nframes, err, npackets, dropped, _, _, sealed, used, sent, _, aside), bufs = pump_out(
        module, compiled, cache, datapath, tx, sockaddr(rx)
    )
    expected = python.encrypt(reference, 5.0)
    assert expected.count == reference.count > 0
    assert (nframes, sealed, used, sent, aside) == (len(cached), expected.count, (0,), expected.count, [])
    assert drain(rx) == expected.to_list()
    assert outbound_state(sa_c) == outbound_state(sa_p)
    assert compiled.drain_flows() == python.drain_flows()

    # one frame of an unknown flow sends the whole wake-up to Python
    for frame in frames:
        kernel.send(frame)
    (nframes, _, npackets, _, _, _, sealed, used, _, _, _), _ = pump_out(
        module, compiled, cache, datapath, tx, sockaddr(rx)
    )
    assert (nframes, sealed, used) == (len(frames), -1, ())
    assert drain(rx) == []


def test_pump_out_uses_each_frames_slot(
    tun_pair: tuple[socket.socket, socket.socket], udp_pair: tuple[socket.socket, socket.socket]
) -> None:
    module = compiled_module()
    suite = AEAD_SUITES[0]
    pairs = [sa_pair(suite, encr_key=bytes([k]) * suite.encr_key_bytes, integ_key=b"", spi=0x100 + k) for k in range(2)]
    compiled, python = both_cores()
    for core in (compiled, python):
        for out_a, _ in pairs:
            core.install_outbound(outbound(out_a, reserved_upto=MAX32), out_a)
    kernel, datapath = tun_pair
    tx, rx = udp_pair
    cache = module.SlotCache()
    frames = frames_of(3)[:3]  # IPv4 TCP, IPv6 TCP, IPv4 UDP
    slots = [1, 0, 1]
    for frame, slot in zip(frames, slots, strict=True):
        cache.learn(frame, 0, len(frame), slot)
        kernel.send(frame)
    (_, _, _, _, _, _, sealed, used, _, _, _), _ = pump_out(module, compiled, cache, datapath, tx, sockaddr(rx))
    packets, _ = split_frames(frames)
    which = bytearray(struct.pack(f"={packets.count}H", *(slots[tag] for tag in packets.tags())))
    expected = python.encrypt(packets, 5.0, which)
    assert expected.count == packets.count > 0
    assert sealed == expected.count and sorted(used) == [0, 1]
    assert drain(rx) == expected.to_list()


def test_pump_out_rejects_bad_arguments(tun_pair: tuple[socket.socket, socket.socket]) -> None:
    module = compiled_module()
    _, datapath = tun_pair
    b = [bytearray() for _ in range(6)]
    with pytest.raises(ValueError):  # read_frames' own checks
        module.pump_out(
            datapath.fileno(),
            b[0],
            b[1],
            0,
            FRAME_MAX,
            module.SlotCache(),
            b[2],
            b[3],
            -1,
            -1,
            (),
            0.0,
            None,
            b[4],
            b[5],
            -1,
            (),
            False,
            1,
            1,
        )
    with pytest.raises(TypeError):
        module.pump_out(
            datapath.fileno(),
            b[0],
            b[1],
            4,
            FRAME_MAX,
            object(),
            b[2],
            b[3],
            -1,
            -1,
            (),
            0.0,
            None,
            b[4],
            b[5],
            -1,
            (),
            False,
            1,
            1,
        )


@st.composite
def known_frames(draw: st.DrawFn) -> bytes:
    """A TUN frame of a flow the cache can know: a TSO/USO super-packet (any segment size, down to
    one byte, below the headers' length), a plain one with or without a partial checksum, a SYN
    (with payload under TSO: every segment clamped) or one the split drops (GSO_UDP)."""
    kind = draw(st.sampled_from(["super", "super", "plain", "syn", "syn_tso", "dropped"]))
    if kind in ("super", "plain", "dropped"):
        packet, mss, v6, udp = draw(super_packets())
    else:
        v6, udp, mss = draw(st.booleans()), False, draw(st.sampled_from([1, 100, 1400]))
        l4: Any = TCP(sport=40000, dport=5201, flags="S", options=[("NOP", None), ("MSS", 1460)])
        ip: Any = IPv6(src="2001:db8::1", dst="2001:db8::2") if v6 else IP(src="10.0.0.1", dst="10.0.0.2")
        payload = draw(st.binary(max_size=300)) if kind == "syn_tso" else b""
        packet = bytes(ip / l4 / Raw(payload))
    l3 = 40 if v6 else 20
    if kind == "dropped":
        return vnet(GSO_UDP, mss, l3, 6) + packet
    if kind in ("plain", "syn"):
        flags = draw(st.sampled_from([0, NEEDS_CSUM]))
        return vnet(GSO_NONE, 0, l3, 6 if udp else 16, flags=flags) + packet
    gso = GSO_UDP_L4 if udp else GSO_TCPV6 if v6 else GSO_TCPV4
    return vnet(gso, mss, l3, 6 if udp else 16) + packet


@given(
    frames=st.lists(known_frames().filter(lambda f: len(f) >= 54), min_size=1, max_size=6),  # a flow key
    slots=st.lists(st.integers(0, 1), min_size=6, max_size=6),
    clamp=st.booleans(),
)
@settings(max_examples=60, deadline=None)
def test_pump_out_split_in_place_seals_what_split_and_encrypt_seal(
    frames: list[bytes], slots: list[int], clamp: bool
) -> None:
    """Every frame known: the pump splits each frame in place and seals each packet before the
    next is built. The ESP payloads, counts, SA state and flows are those of split_frames, clamp_mss
    and the pure-Python engine's encrypt of the split packets."""
    module = compiled_module()
    suite = AEAD_SUITES[0]
    pairs = [sa_pair(suite, encr_key=bytes([k]) * suite.encr_key_bytes, integ_key=b"", spi=0x100 + k) for k in range(2)]
    compiled, python = both_cores()
    sas: dict[int, list[Any]] = {0: [], 1: []}
    for n, core in enumerate((compiled, python)):
        for out_a, _ in pairs:
            sa = outbound(out_a, reserved_upto=MAX32)
            sas[n].append(sa)
            core.install_outbound(sa, out_a)
    mss = (1300, 1280) if clamp else (-1, -1)
    kernel, datapath = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    tx, rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for sock in (kernel, datapath, tx, rx):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
            sock.setblocking(False)
        tx.bind(("127.0.0.1", 0))
        rx.bind(("127.0.0.1", 0))
        cache = module.SlotCache()
        for frame, slot in zip(frames, slots, strict=False):
            assert cache.learn(frame, 0, len(frame), slot)
        for frame in frames:  # a flow learnt twice takes its last slot, as in the pump
            kernel.send(frame)
        (nframes, err, npackets, dropped, _, clamped, sealed, used, sent, _, aside), _ = pump_out(
            module, compiled, cache, datapath, tx, sockaddr(rx), mss
        )
        packets, ref_dropped = split_frames(frames)
        ref_clamped = clamp_mss(packets, *mss) if clamp else 0
        frame_slots = [cache.lookup(f, 0, len(f)) for f in frames]
        which = bytearray(struct.pack(f"={packets.count}H", *(frame_slots[tag] for tag in packets.tags())))
        expected = python.encrypt(packets, 5.0, which)
        assert (nframes, err, npackets, dropped, clamped) == (len(frames), 0, packets.count, ref_dropped, ref_clamped)
        assert (sealed, sent, aside) == (expected.count, expected.count, [])
        assert sorted(used) == (sorted(set(frame_slots)) if packets.count else [])  # () when nothing to seal
        assert drain(rx) == expected.to_list()
        assert [outbound_state(sa) for sa in sas[0]] == [outbound_state(sa) for sa in sas[1]]
        assert compiled.drain_flows() == python.drain_flows()
    finally:
        for sock in (kernel, datapath, tx, rx):
            sock.close()


def test_pump_out_raises_a_failing_steps_own_error(
    tun_pair: tuple[socket.socket, socket.socket], udp_pair: tuple[socket.socket, socket.socket]
) -> None:
    """The pump calls the steps' C cores: a step that fails raises what its Python entry point
    raises (clamp, seal, send)."""
    module = compiled_module()
    suite = AEAD_SUITES[0]
    out_a, _ = sa_pair(suite, encr_key=bytes(range(suite.encr_key_bytes)), integ_key=b"")
    compiled, _ = both_cores()
    compiled.install_outbound(outbound(out_a, reserved_upto=MAX32), out_a)
    kernel, datapath = tun_pair
    tx, rx = udp_pair
    frame = frames_of(1)[0]
    cache = module.SlotCache()
    assert cache.learn(frame, 0, len(frame), 0)
    inbound_slot = module.Slot(object(), False, 1, bytes(16), bytes(4), 1, False)

    def run(mss: tuple[int, int], slots: tuple[object, ...], dests: tuple[object, ...]) -> Any:
        b = [bytearray() for _ in range(6)]
        kernel.send(frame)
        args = (datapath.fileno(), b[0], b[1], 64, FRAME_MAX, cache, b[2], b[3], *mss, slots, 5.0, None)
        return module.pump_out(*args, b[4], b[5], tx.fileno(), dests, False, 64, 65000)

    good = (compiled.slot_tuple, (sockaddr(rx),))
    with pytest.raises(ValueError, match="bad clamp_mss arguments"):
        run((1360, 1 << 16), *good)
    with pytest.raises(TypeError, match="slots must be initialised outbound Slots"):
        run((-1, -1), (inbound_slot,), good[1])
    with pytest.raises(TypeError, match="a destination is not a packed sockaddr"):
        run((-1, -1), good[0], (b"",))
    assert drain(rx) == []
    (nframes, err, npackets, _, _, _, sealed, used, sent, sends, aside) = run((-1, -1), *good)
    assert (nframes, err, used, aside) == (1, 0, (0,), [])
    assert sealed == sent == sends == npackets > 0
    assert len(drain(rx)) == sealed


# -- inbound ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_pump_in_writes_what_the_python_engine_opens(
    seed: int, tun_pair: tuple[socket.socket, socket.socket], udp_pair: tuple[socket.socket, socket.socket]
) -> None:
    module = compiled_module()
    rng = random.Random(seed)
    suite = AEAD_SUITES[seed % len(AEAD_SUITES)]
    out_a, in_a = sa_pair(suite, encr_key=bytes(range(suite.encr_key_bytes)), integ_key=b"", replay_window=64)
    compiled, python = both_cores()
    sa_c, sa_p = inbound(in_a), inbound(in_a)
    compiled.install_inbound(sa_c, in_a)
    python.install_inbound(sa_p, in_a)
    sender = PythonEspBatch()
    sender.install_outbound(outbound(out_a, reserved_upto=MAX32), out_a)
    inner = tcp_flow(rng, v6=seed % 2 == 1, count=rng.randint(1, 40))
    inner.append(bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=5, dport=6) / Raw(b"u" * 50)))
    esp = sender.encrypt(inner, 1.0).to_list()
    assert len(esp) == len(inner)
    datagrams = [*esp, esp[0], b"\x00\x00\x00\x00ike", rng.randbytes(40)]  # a replay, IKE, a forgery
    kernel, datapath = tun_pair
    tx, rx = udp_pair
    for d in datagrams:
        tx.sendto(d, rx.getsockname())
    b = [bytearray() for _ in range(6)]
    count, reads, _, odd, errnos, failure, ninner, _, written, write_errnos = module.pump_in(
        rx.fileno(),
        b[0],
        b[1],
        64,
        65536,
        {in_a.spi},
        compiled.inbound_table,
        5.0,
        compiled.flows,
        b[2],
        b[3],
        -1,
        -1,
        False,
        b[4],
        b[5],
        datapath.fileno(),
    )
    expected_inner = python.decrypt([d for d in datagrams if d[:4] == esp[0][:4]], 5.0)
    expected_frames = coalesce_frames(expected_inner)
    assert (failure, errnos, write_errnos) == (None, [], [])
    assert count == len(esp) + 1 and reads == len(datagrams)
    assert [at for at, *_ in odd] and len(odd) == 2  # IKE and the forgery (another SPI) stay Python's
    assert ninner == expected_inner.count == len(inner) and written == expected_frames.count
    assert drain(kernel) == expected_frames.to_list()
    assert inbound_state(sa_c) == inbound_state(sa_p)
    assert compiled.drain_flows() == python.drain_flows()
    assert compiled.table_counters == python.table_counters


def receiver_and_sender() -> tuple[Any, PythonEspBatch, int]:
    """A compiled core with one inbound AES-GCM SA, the Python engine sealing for it, its SPI."""
    suite = AEAD_SUITES[0]
    out_a, in_a = sa_pair(suite, encr_key=bytes(range(suite.encr_key_bytes)), integ_key=b"")
    compiled, _ = both_cores()
    compiled.install_inbound(inbound(in_a), in_a)
    sender = PythonEspBatch()
    sender.install_outbound(outbound(out_a, reserved_upto=MAX32), out_a)
    return compiled, sender, in_a.spi


def test_send_runs_refuses_a_run_that_would_read_past_its_buffer(
    udp_pair: tuple[socket.socket, socket.socket],
) -> None:
    """A run is sent whole (one GSO send): every span that joins it is bounds-checked, not only
    its first, so a later span past the end of the data is a ValueError, never an over-read."""
    module = compiled_module()
    tx, rx = udp_pair
    data = bytearray(b"e" * 150)
    spans = bytearray(struct.pack("=3I", 0, 100, 0) + struct.pack("=3I", 100, 100, 0))
    with pytest.raises(ValueError, match="runs past the end"):
        module.send_runs(tx.fileno(), data, spans, 2, (sockaddr(rx),), True, 64, 65000)
    assert drain(rx) == []
    spans[16:20] = struct.pack("=I", 50)  # the same run, inside the buffer: one GSO send of two
    assert module.send_runs(tx.fileno(), data, spans, 2, (sockaddr(rx),), True, 64, 65000)[:2] == (2, 1)


def test_pump_in_reports_a_failing_step_and_keeps_the_odd_reads(
    tun_pair: tuple[socket.socket, socket.socket], udp_pair: tuple[socket.socket, socket.socket]
) -> None:
    module = compiled_module()
    _, sender, spi = receiver_and_sender()
    tx, rx = udp_pair
    _, datapath = tun_pair
    for d in [*sender.encrypt([bytes(IP() / UDP() / Raw(b"x"))], 1.0).to_list(), b"\x00\x00\x00\x00ike"]:
        tx.sendto(d, rx.getsockname())
    b = [bytearray() for _ in range(6)]
    count, reads, _, odd, _, failure, ninner, _, written, _ = module.pump_in(
        rx.fileno(),
        b[0],
        b[1],
        8,
        65536,
        {spi},
        "not a table",
        5.0,
        None,
        b[2],
        b[3],
        -1,
        -1,
        False,
        b[4],
        b[5],
        datapath.fileno(),
    )
    assert isinstance(failure, TypeError)
    assert (count, reads, len(odd), ninner, written) == (1, 2, 1, 0, 0)


def test_pump_in_clamps_and_reports_failed_tun_writes(udp_pair: tuple[socket.socket, socket.socket]) -> None:
    """A SYN through the clamp, and TUN writes that fail: counted per frame, not a failure."""
    module = compiled_module()
    compiled, sender, spi = receiver_and_sender()
    syn = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=5, dport=6, flags="S", options=[("MSS", 1460)]))
    tx, rx = udp_pair
    for d in sender.encrypt([syn, bytes(IP() / UDP() / Raw(b"x"))], 1.0).to_list():
        tx.sendto(d, rx.getsockname())
    read_end, write_end = os.pipe()
    b = [bytearray() for _ in range(6)]
    try:
        count, reads, _, odd, _, failure, ninner, clamped, written, write_errnos = module.pump_in(
            rx.fileno(), b[0], b[1], 8, 65536, {spi}, compiled.inbound_table, 5.0, None, b[2], b[3],
            1300, 1280, False, b[4], b[5], read_end,
        )  # fmt: skip
    finally:
        os.close(read_end)
        os.close(write_end)
    assert failure is None
    assert (count, reads, odd, ninner, clamped, written) == (2, 2, [], 2, 1, 0)
    assert write_errnos == [errno.EBADF, errno.EBADF]
    assert struct.unpack_from("!H", b[2], 20 + 22)[0] == 1300  # the clamped MSS in the opened SYN
