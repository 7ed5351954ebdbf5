"""`make bench` module: the userspace dataplane against strongSwan 5.9.8 kernel-libipsec and bare veth.

One run measures, side by side on fresh two-namespace test beds (see `bench.throughput`):
bare veth, the real dataplane service (userspace backend, AES-GCM-128, ESP-in-UDP, keyed over
its gRPC API) and strongSwan kernel-libipsec (same transform, keyed by its own IKEv2):
TCP throughput, 64-byte UDP packets/s, the RTT each adds over bare veth, and datapath CPU
per packet. Esplanade figures name strongSwan as their peer, strongSwan figures bare veth.

    ESPLANADE_BENCH_SECONDS (default 5)    length of each iperf3 run
    ESPLANADE_BENCH_TRANSFORMS             e.g. "aes128gcm16,aes256gcm16,chacha20poly1305"
    ESPLANADE_BENCH_REALTIME               SCHED_FIFO priority for both datapaths (default 0: off)
    ESPLANADE_BENCH_SAS                    Child SAs for the 1-vs-2-worker comparison (default 4, 0: skip)
    ESPLANADE_BENCH_ROUNDS                 complete same-run sets (default 3)

Single runs swing by +-15 % on a shared 2-vCPU machine, strongSwan's as much as ours, so the
side-by-side set is measured `ROUNDS` times, one whole set after another. The records are those
of the round whose Esplanade/strongSwan TCP ratio (first transform) is the median, so every
figure of one record set comes from the same minutes; `tcp_ratio_rounds.esplanade-<transform>
.{min,median,max}` give the spread of that ratio over all rounds.

Besides the side-by-side records, the first transform is measured with several Child SAs (one
iperf3 client each, inbound SPIs alternating parity) on 1 and on 2 workers:
`tcp_throughput.esplanade-<transform>-<n>sas-2workers` names the 1-worker figure as its peer.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from bench.records import Figure, ratio_spread
from bench.throughput import Result, records, run_esplanade, run_scenarios

GROUP = "dataplane"


def run() -> list[Figure]:
    seconds = int(os.environ.get("ESPLANADE_BENCH_SECONDS", "5"))
    realtime = int(os.environ.get("ESPLANADE_BENCH_REALTIME", "0"))
    transforms = [t for t in os.environ.get("ESPLANADE_BENCH_TRANSFORMS", "aes128gcm16").split(",") if t]
    scenarios = ["bare"]
    for transform in transforms:
        scenarios += [f"esplanade-{transform}", f"esplanade-python-{transform}", f"strongswan-{transform}"]
    rounds = max(1, int(os.environ.get("ESPLANADE_BENCH_ROUNDS", "3")))
    complete: list[dict[str, Result]] = []
    for _ in range(rounds):
        got = run_scenarios(scenarios, seconds, realtime=realtime)
        missing = [s for s in scenarios if s not in got]
        if missing:
            raise RuntimeError(f"scenarios failed: {', '.join(missing)} (see the log above)")
        complete.append(got)
    ratios = {t: [_tcp_ratio(r, t) for r in complete] for t in transforms}
    first = transforms[0] if transforms else ""
    results = sorted(complete, key=lambda r: _tcp_ratio(r, first) if first else 0.0)[len(complete) // 2]
    figures = [
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
    for transform, spread in ratios.items():
        figures += ratio_spread(f"tcp_ratio_rounds.esplanade-{transform}", spread, GROUP)
    sas = int(os.environ.get("ESPLANADE_BENCH_SAS", "4"))
    if sas > 0 and transforms:
        scenario = f"esplanade-{transforms[0]}"
        # one directory per run: the sites' embedded stores outlive a run, and a second run on
        # the first one's store finds its Child SAs already there (ALREADY_EXISTS)
        with tempfile.TemporaryDirectory(prefix="esplanade-bench-") as tmp:
            one = run_esplanade(scenario, seconds, 1, 1, Path(tmp, "1worker"), realtime, sas)
            two = run_esplanade(scenario, seconds, 1, 2, Path(tmp, "2workers"), realtime, sas)
        base = f"{scenario}-{sas}sas"
        figures.append(Figure(f"tcp_throughput.{base}-1worker", one.tcp_mbps, "Mbit/s", None, None, True, GROUP))
        figures.append(
            Figure(
                f"tcp_throughput.{base}-2workers", two.tcp_mbps, "Mbit/s", f"{base}-1worker", one.tcp_mbps, True, GROUP
            )
        )
        for label, result in (("1worker", one), ("2workers", two)):
            for side in ("sender", "receiver"):
                value = getattr(result, f"cpu_us_per_packet_{side}")
                if value is not None:
                    figures.append(
                        Figure(f"cpu_per_packet_{side}.{base}-{label}", value, "µs", None, None, False, GROUP)
                    )
    return figures


def _tcp_ratio(results: dict[str, Result], transform: str) -> float:
    """Esplanade's TCP throughput over strongSwan's in one same-run set."""
    ours, theirs = results[f"esplanade-{transform}"].tcp_mbps, results[f"strongswan-{transform}"].tcp_mbps
    return ours / theirs if theirs else 0.0
