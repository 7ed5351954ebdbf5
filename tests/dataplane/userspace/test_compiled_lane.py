"""The compiled lane of the crypto room: `EspTransform` with `hot_path` compiled, its batch doors
(`seal_frames` for TUN TSO frames, `open_segments` for UDP GRO reads) and the wire format it
shares with the Python lanes. Packet-for-packet agreement with the engine is in
test_esp_transform.py (every test there runs on both hot paths)."""

from __future__ import annotations

import pytest

from esplanade.dataplane.fastpath import PacketBatch
from esplanade.dataplane.fastpath.tun_frames import split_frames
from esplanade.dataplane.userspace.esp_transform import EspTransform
from esplanade.dataplane.userspace.segmentation import coalesce_for_tun
from esplanade.dataplane.userspace.transform import WorkerContext
from tests.dataplane.compiled_module import requires_compiled
from tests.dataplane.userspace.esp_pairs import (
    A_ADDR,
    B_ADDR,
    SPI_AB,
    SPI_BA,
    Keys,
    control,
    install_message,
    keyed_pair,
    make_transform,
)
from tests.dataplane.userspace.packet_builders import tcp_segments, udp_datagrams

pytestmark = requires_compiled

A_HOST, B_HOST = "10.1.0.5", "10.2.0.9"


def a_to_b(count: int = 4, size: int = 400) -> list[bytes]:
    return udp_datagrams(count, size, src=A_HOST, dst=B_HOST)


def drops(transform: EspTransform) -> dict[str, object]:
    return dict(transform.handle_control("counters", {}, 0.0)["drops"])  # type: ignore[arg-type]


def sa_counters(transform: EspTransform) -> dict[tuple[str, int], tuple[int, int, int]]:
    reply = transform.handle_control("counters", {}, 0.0)
    return {(s["direction"], s["spi"]): (s["packets"], s["bytes"], s["top"]) for s in reply["sas"]}  # type: ignore[index, union-attr]


def test_status_says_which_hot_path_runs_and_why() -> None:
    compiled = make_transform(hot_path="compiled").status()
    assert compiled["hot_path"]["active"] == "compiled"  # type: ignore[index]
    python = make_transform(hot_path="python").status()
    assert python["hot_path"] == {  # type: ignore[comparison-overlap]
        "requested": "python",
        "active": "python",
        "reason": "dataplane.hot_path is python",
        "build": {},
    }
    assert python["compiled"] is None


def _tso_frames(count: int, size: int) -> tuple[list[bytes], list[bytes]]:
    """TCP segments a->b and the TSO frames (virtio_net_hdr + super-packet) the TUN would hand over."""
    segments = tcp_segments(count, size, src=A_HOST, dst=B_HOST)
    return segments, coalesce_for_tun(segments)


def test_tso_frames_sealed_in_one_call_open_as_one_gro_read() -> None:
    a, b = keyed_pair(Keys(), hot_path="compiled")
    segments, frames = _tso_frames(40, 1200)
    assert len(frames) == 1
    packets, dropped = split_frames(frames)
    assert dropped == 0 and packets.to_list() == segments
    sealed = a.seal_frames(frames, packets, 1.0)
    assert sealed.handoffs == [] and sealed.datagrams == []
    assert sealed.endpoints == [(B_ADDR, 4500)]
    runs = sealed.esp.gso_runs(64, 65507)
    assert len(runs) == 1 and runs[0][3] == 40  # one GSO send
    offset, length, segment, _, _ = runs[0]
    buf = bytearray(65536)
    buf[:length] = sealed.esp.data[offset : offset + length]
    inner = b.open_segments(PacketBatch.from_segments(buf, length, segment), segment, length, 1.0)
    assert inner is not None and inner.to_list() == segments
    assert sa_counters(b)[("in", SPI_AB)][:2] == (40, sum(map(len, segments)))


def test_gro_reads_the_compiled_door_cannot_take_whole_go_datagram_by_datagram() -> None:
    a, b = keyed_pair(Keys(), hot_path="compiled")
    esp = [d[1] for d in a.outbound_batch(a_to_b(3, 300), 1.0)]
    for mixed in (
        [esp[0], (SPI_BA + 7).to_bytes(4, "big") + esp[1][4:], esp[2]],  # a foreign SPI in the middle
        [esp[0], esp[1], b"\x00\x00\x00\x00ike"],  # IKE glued to the end
        [esp[0], esp[1], b"\xff"],  # a keep-alive
    ):
        data = bytearray(b"".join(mixed))
        batch = PacketBatch.from_segments(data, len(data), len(esp[0]))
        assert b.open_segments(batch, len(esp[0]), len(data), 1.0) is None
    other_worker = make_transform(context=WorkerContext(1, 2), hot_path="compiled")
    control(other_worker, "install_sa", **install_message(Keys(), "b", owner=1))
    data = bytearray(b"".join(esp))
    batch = PacketBatch.from_segments(data, len(data), len(esp[0]))
    owned_by = SPI_AB % 2
    assert (other_worker.open_segments(batch, len(esp[0]), len(data), 1.0) is None) == (owned_by != 1)


def test_a_frame_without_policy_is_dropped_and_the_rest_of_the_read_still_leaves() -> None:
    a, b = keyed_pair(Keys(), hot_path="compiled")
    _, frames = _tso_frames(10, 500)
    stray = coalesce_for_tun(udp_datagrams(1, 100, src=A_HOST, dst="10.99.0.1"))
    frames = stray + frames + stray
    packets, _ = split_frames(frames)
    sealed = a.seal_frames(frames, packets, 1.0)
    assert sealed.esp.count == 10
    assert drops(a) == {"no_policy": 2}
    delivered = [((A_ADDR, 4500), bytes(p)) for p in sealed.esp]
    assert len(b.inbound_batch(delivered, 1.0)) == 10


@pytest.mark.parametrize("sender", ["python", "compiled"])
def test_the_two_hot_paths_speak_the_same_wire_format(sender: str) -> None:
    receiver = "compiled" if sender == "python" else "python"
    a, b = keyed_pair(Keys(), hot_path=sender, hot_path_b=receiver)
    packets = a_to_b(5, 700) + tcp_segments(4, 1300, src=A_HOST, dst=B_HOST)
    datagrams = a.outbound_batch(packets, 1.0)
    assert b.inbound_batch([((A_ADDR, 4500), d[1]) for d in datagrams], 1.0) == packets
    back = b.outbound_batch(udp_datagrams(3, 200, src=B_HOST, dst=A_HOST), 1.0)
    assert len(a.inbound_batch([((B_ADDR, 4500), d[1]) for d in back], 1.0)) == 3
