"""`make bench` module: the userspace dataplane against strongSwan 5.9.8 kernel-libipsec and bare veth.

One run measures, side by side on fresh two-namespace test beds (see `bench.throughput`):
bare veth, the real dataplane service (userspace backend, AES-GCM-128, ESP-in-UDP, keyed over
its gRPC API) and strongSwan kernel-libipsec (same transform, keyed by its own IKEv2):
TCP throughput, 64-byte UDP packets/s, the RTT each adds over bare veth, and datapath CPU
per packet. Esplanade figures name strongSwan as their peer, strongSwan figures bare veth.

    ESPLANADE_BENCH_SECONDS (default 5)    length of each iperf3 run
    ESPLANADE_BENCH_TRANSFORMS             e.g. "aes128gcm16,aes256gcm16,chacha20poly1305"
    ESPLANADE_BENCH_REALTIME               SCHED_FIFO priority for both datapaths (default 0: off)
"""

from __future__ import annotations

import os

from bench.records import Figure
from bench.throughput import records, run_scenarios

GROUP = "dataplane"


def run() -> list[Figure]:
    seconds = int(os.environ.get("ESPLANADE_BENCH_SECONDS", "5"))
    realtime = int(os.environ.get("ESPLANADE_BENCH_REALTIME", "0"))
    transforms = [t for t in os.environ.get("ESPLANADE_BENCH_TRANSFORMS", "aes128gcm16").split(",") if t]
    scenarios = ["bare"]
    for transform in transforms:
        scenarios += [f"esplanade-{transform}", f"esplanade-python-{transform}", f"strongswan-{transform}"]
    results = run_scenarios(scenarios, seconds, realtime=realtime)
    missing = [s for s in scenarios if s not in results]
    if missing:
        raise RuntimeError(f"scenarios failed: {', '.join(missing)} (see the log above)")
    return [
        Figure(
            name=record["name"],
            value=float(record["value"]),
            unit=str(record["unit"]),
            peer=record.get("peer"),
            peer_value=record.get("peer_value"),
            higher_is_better=record["better"] == "higher",
            group=GROUP,
        )
        for record in records(results)
    ]
