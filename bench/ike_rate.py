"""IKE_SA + Child SA setups per second: Esplanade against strongSwan 5.9.8 (standalone, needs root).

Four runs between netns ikec-a (strongSwan charon "A") and ikec-b:

  responder comparison (the same initiator: charon A driven over VICI, as in the reference
  strongswan-pair/ike-rate.py: each worker initiates IKE_SA+CHILD_SA, waits, terminates):
    1. charon A  -> charon B
    2. charon A  -> Esplanade
  initiator comparison (the same responder: charon A):
    3. charon B  -> charon A   (VICI workers on B)
    4. Esplanade -> charon A   (the same number of concurrent setups, each deleted once up)

Same proposal everywhere (PSK, aes256gcm16-prfsha256-ecp256, ESP aes256gcm16), same DoS
thresholds on both responders (cookie_threshold / cookie_threshold_ip / block_threshold),
charon logging off. Writes bench/results/ike_rate.json.

    .venv/bin/python bench/ike_rate.py --seconds 20 --workers 4
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from esplanade.keyexchange.config import ConnectionConfig
from esplanade.keyexchange.ikev2.dispatcher import IkeDispatcher
from esplanade.keyexchange.ikev2.events import ChildSaEstablished, Event, IkeSaDeleted
from esplanade.keyexchange.shell.udp import IkeUdpShell
from tests.keyexchange import interop as ix
from tests.loop_thread import finish_loop_thread

PROPOSAL = "aes256gcm16-prfsha256-ecp256"
ESP = "aes256gcm16"
THRESHOLD = 1000


def thresholds() -> str:
    return f"block_threshold = {THRESHOLD}\n    cookie_threshold = {THRESHOLD}\n    cookie_threshold_ip = {THRESHOLD}"


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    path = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def vici_rate(sock_path: Path, seconds: float, workers: int) -> dict[str, Any]:
    """Run the VICI load generator in its own process (its threads must not share our GIL)."""
    import subprocess

    out = subprocess.run(
        [sys.executable, __file__, "--vici", str(sock_path), "--seconds", str(seconds), "--workers", str(workers)],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 60,
    ).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def vici_load(sock_path: Path, seconds: float, workers: int) -> dict[str, Any]:
    import vici

    results: list[tuple[int, int, list[float]]] = []
    errors: collections.Counter[str] = collections.Counter()

    def worker() -> None:
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(sock_path))
        v = vici.Session(s)
        ok = fail = 0
        lat: list[float] = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.monotonic()
            uid = None
            try:
                # loglevel 0: the log messages carry the IKE SA's unique id needed to terminate it
                for m in v.initiate({"ike": "pair", "child": "net", "timeout": "10000", "loglevel": "0"}):
                    uid = uid or m.get("ikesa-uniqueid")
                lat.append(time.monotonic() - t0)
                ok += 1
            except Exception as exc:
                fail += 1
                errors["initiate: " + str(exc)[:80]] += 1
            if uid:
                try:
                    for _ in v.terminate({"ike-id": uid, "timeout": "10000", "loglevel": "-1"}):
                        pass
                except Exception as exc:
                    fail += 1
                    errors["terminate: " + str(exc)[:80]] += 1
        results.append((ok, fail, lat))
        s.close()

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    ok = sum(r[0] for r in results)
    lat = sorted(x for r in results for x in r[2])
    return {
        "setups": ok,
        "failures": sum(r[1] for r in results),
        "seconds": round(wall, 2),
        "rate": round(ok / wall, 1),
        "median_ms": round(lat[len(lat) // 2] * 1000, 1) if lat else None,
        "errors": dict(errors.most_common(3)),
    }


class BenchPeer:
    """Esplanade (dispatcher + UDP shell) on a loop thread inside netns ikec-b, no dataplane."""

    def __init__(self, config: ConnectionConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.config = config
        self.engine: IkeDispatcher | None = None
        self.shell: IkeUdpShell | None = None
        self.tid = 0
        self.counts: collections.Counter[str] = collections.Counter()
        self.latencies: list[float] = []
        self.started: dict[str, float] = {}
        self.running = False
        ready = threading.Event()

        def run() -> None:
            ix.setns(ix.NS_ES)
            self.tid = threading.get_native_id()
            asyncio.set_event_loop(self.loop)
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(5)

        async def start() -> None:
            self.engine = IkeDispatcher(
                [config],
                require_install_ack=False,
                cookie_threshold=THRESHOLD,
                cookie_threshold_ip=THRESHOLD,
                block_threshold=THRESHOLD,
                now=time.monotonic(),
            )
            self.shell = IkeUdpShell(self.engine, ix.ES_IP, on_event=self.on_event)
            await self.shell.start()

        asyncio.run_coroutine_threadsafe(start(), self.loop).result(5)

    def on_event(self, ev: Event) -> None:
        self.counts[type(ev).__name__] += 1
        if not self.running:
            return
        if isinstance(ev, ChildSaEstablished):
            t0 = self.started.pop(ev.ike_sa, None)
            if t0 is not None:
                self.latencies.append(time.monotonic() - t0)
            ike = ev.ike_sa
            self.loop.call_soon(lambda: self.shell.call(self.engine.delete_ike, ike))  # type: ignore[union-attr]
        elif isinstance(ev, IkeSaDeleted) and self.engine is not None and ev.ike_sa in self.mine:
            self.mine.discard(ev.ike_sa)
            self.loop.call_soon(self.initiate_one)

    def initiate_one(self) -> None:
        if not self.running or self.engine is None or self.shell is None:
            return
        ike = self.shell.call(self.engine.initiate, "pair")
        assert isinstance(ike, str)
        self.mine.add(ike)
        self.started[ike] = time.monotonic()

    def initiator_rate(self, seconds: float, concurrency: int) -> dict[str, Any]:
        self.mine: set[str] = set()
        self.latencies.clear()
        self.counts.clear()
        c0 = cpu_seconds(os.getpid(), self.tid)
        t0 = time.monotonic()
        self.running = True
        for _ in range(concurrency):
            self.loop.call_soon_threadsafe(self.initiate_one)
        time.sleep(seconds)
        self.running = False
        wall = time.monotonic() - t0
        time.sleep(1.0)
        cpu = cpu_seconds(os.getpid(), self.tid) - c0
        ok = len(self.latencies)
        lat = sorted(self.latencies)
        return {
            "setups": ok,
            "failures": self.counts["NegotiationFailed"],
            "seconds": round(wall, 2),
            "rate": round(ok / wall, 1),
            "median_ms": round(lat[len(lat) // 2] * 1000, 1) if lat else None,
            "esplanade_cpu_s": round(cpu, 2),
        }

    def close(self) -> None:
        def close_shell() -> None:
            if self.shell is not None:
                self.shell.close()

        finish_loop_thread(self.loop, self.thread, last=close_shell, timeout=5)


def es_config() -> ConnectionConfig:
    return ConnectionConfig.from_dict(
        "pair", ix.es_conn(proposals=[PROPOSAL], child_esp_proposals=[ESP], unique="never")
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ike_rate.json"))
    ap.add_argument("--vici", help=argparse.SUPPRESS)  # internal: run the VICI load generator only
    args = ap.parse_args()
    if args.vici:
        print(json.dumps(vici_load(Path(args.vici), args.seconds, args.workers)))
        return
    base = Path(tempfile.mkdtemp(prefix="ikec-bench-"))
    ix.make_netns()
    a = ix.Charon(base / "a", ix.NS_SS)
    b = ix.Charon(base / "b", ix.NS_ES)
    results: dict[str, Any] = {
        "proposal": f"PSK, IKE {PROPOSAL}, ESP {ESP}",
        "workers": args.workers,
        "seconds": args.seconds,
        "thresholds": THRESHOLD,
        "cpus": os.cpu_count(),
        "loadavg_before": os.getloadavg(),
    }
    try:
        a.start(thresholds(), log_level=0)
        a.load(ix.ss_conn(proposals=PROPOSAL, esp=ESP), ix.PSK_SECRETS)
        # 1 + 3: charon <-> charon
        b.start(thresholds(), log_level=0)
        b.load(
            ix.ss_conn(
                proposals=PROPOSAL,
                esp=ESP,
                local_id=ix.ES_ID,
                remote_id=ix.SS_ID,
                local_ip=ix.ES_IP,
                remote_ip=ix.SS_IP,
                local_ts=ix.ES_NET,
                remote_ts=ix.SS_NET,
            ),
            ix.PSK_SECRETS,
        )
        assert a.proc is not None and b.proc is not None
        for name, initiator, responder in (("responder_strongswan", a, b), ("initiator_strongswan", b, a)):
            ca, cb = cpu_seconds(a.proc.pid), cpu_seconds(b.proc.pid)
            r = vici_rate(initiator.vici, args.seconds, args.workers)
            r["charon_initiator_cpu_s"] = round(cpu_seconds(initiator.proc.pid) - (ca if initiator is a else cb), 2)  # type: ignore[union-attr]
            r["charon_responder_cpu_s"] = round(cpu_seconds(responder.proc.pid) - (cb if responder is b else ca), 2)  # type: ignore[union-attr]
            results[name] = r
            print(name, r, flush=True)
        b.stop()
        # 2 + 4: Esplanade in ikec-b
        peer = BenchPeer(es_config())
        try:
            c0, ca = cpu_seconds(os.getpid(), peer.tid), cpu_seconds(a.proc.pid)
            r = vici_rate(a.vici, args.seconds, args.workers)
            r["esplanade_cpu_s"] = round(cpu_seconds(os.getpid(), peer.tid) - c0, 2)
            r["charon_initiator_cpu_s"] = round(cpu_seconds(a.proc.pid) - ca, 2)
            results["responder_esplanade"] = r
            print("responder_esplanade", r, flush=True)
            ca = cpu_seconds(a.proc.pid)
            r = peer.initiator_rate(args.seconds, args.workers)
            r["charon_responder_cpu_s"] = round(cpu_seconds(a.proc.pid) - ca, 2)
            results["initiator_esplanade"] = r
            print("initiator_esplanade", r, flush=True)
        finally:
            peer.close()
    finally:
        a.stop()
        b.stop()
        ix.teardown_netns()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'run':<24}{'setups/s':>10}{'median ms':>11}")
    for key in ("responder_strongswan", "responder_esplanade", "initiator_strongswan", "initiator_esplanade"):
        r = results[key]
        print(f"{key:<24}{r['rate']:>10}{r['median_ms']!s:>11}")


if __name__ == "__main__":
    main()
