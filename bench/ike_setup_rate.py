"""IKE_SA + Child SA setups per second through the whole keyexchange service, against strongSwan.

A setup counts only once its Child SA is installed in the dataplane (the dataplane's ack in
the store), not when IKE_AUTH completes:

- as responder, keyexchange holds its IKE_AUTH response until the ack, so a completed
  `initiate` at the VICI initiator means an installed SA;
- as initiator, the driver counts an IKE SA when the ack of its Child SA appears in the store.

Runs (netns kxs-ba: charon A; kxs-bb: charon B, later the Esplanade site: keyexchange +
dataplane processes + embedded store):

  responder: charon A (VICI workers) -> charon B       vs  charon A -> Esplanade
  initiator: charon B (VICI workers) -> charon A       vs  Esplanade (gRPC Initiate) -> charon A

Same proposal (PSK, aes256gcm16-prfsha256-ecp256, ESP aes256gcm16), the same COOKIE/DoS
thresholds on both responders, charon logging off, the same number of setups in flight.

    .venv/bin/python -m bench.run ike_setup_rate
    .venv/bin/python bench/ike_setup_rate.py --seconds 15 --workers 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ike_rate import PROPOSAL, THRESHOLD, cpu_seconds, thresholds, vici_rate
from bench.records import Figure, ratio_spread
from tests.keyexchange import interop as ix
from tests.keyexchange.service.sites import DATAPLANE, Site, nsx, sh, struct

ESP = "aes256gcm16"
# netns names and the site's management index, overridable so parallel runs do not collide
NETNS_PREFIX = os.environ.get("ESPLANADE_BENCH_NETNS_PREFIX", "kxs-b")
SITE_INDEX = int(os.environ.get("ESPLANADE_BENCH_SITE_INDEX", "16"))
NS_A = f"{NETNS_PREFIX}a"
A_IP, B_IP = "198.18.16.1", "198.18.16.2"
A_NET, B_NET = "10.97.1.0/24", "10.97.2.0/24"
A_ID, B_ID = "a.bench.test", "b.bench.test"
PSK = "bench-psk-0123456789abcdef-0123456789"
SECRETS = f"""
    ike-pair {{
        id-a = {A_ID}
        id-b = {B_ID}
        secret = "{PSK}"
    }}"""


def charon_conn(me_ip: str, peer_ip: str, me_id: str, peer_id: str, me_net: str, peer_net: str) -> str:
    return ix.ss_conn(
        proposals=PROPOSAL,
        esp=ESP,
        local_id=me_id,
        remote_id=peer_id,
        local_ip=me_ip,
        remote_ip=peer_ip,
        local_ts=me_net,
        remote_ts=peer_net,
    )


def esplanade_conn() -> dict[str, Any]:
    return {
        "local_addrs": [B_IP],
        "remote_addrs": [A_IP],
        "local": {"auth": "psk", "id": B_ID},
        "remote": {"auth": "psk", "id": A_ID},
        "psk": PSK,
        "unique": "never",
        "proposals": [PROPOSAL],
        "children": {"net": {"local_ts": B_NET, "remote_ts": A_NET, "esp_proposals": [ESP]}},
    }


async def esplanade_initiator(site: Site, seconds: float, workers: int) -> dict[str, Any]:
    """Keep `workers` setups in flight through gRPC; count each when its Child SA's ack is in the store."""
    import grpc

    from esplanade.store import schema
    from esplanade.store.base import Resync, WatchBatch
    from esplanade.store.embedded import EmbeddedStore
    from esplanade.v1 import keyexchange_pb2 as kx
    from esplanade.v1 import keyexchange_pb2_grpc as kx_grpc

    store = EmbeddedStore(site.store_path, poll_interval=0.005)
    await store.connect()
    channel = grpc.aio.insecure_channel(f"{site.mgmt_ip}:50061")
    stub = kx_grpc.KeyExchangeStub(channel)
    started: dict[str, float] = {}
    latencies: list[float] = []
    failures = 0
    running = True
    prefix = schema.prefix("dataplane", "acks")

    async def initiate() -> None:
        nonlocal failures
        if not running:
            return
        try:
            reply = await stub.Initiate(kx.InitiateRequest(connection="pair"), timeout=5)
        except grpc.aio.AioRpcError:
            failures += 1
            return
        started[reply.ike_sa] = time.monotonic()

    async def done(ike: str) -> None:
        nonlocal failures
        t0 = started.pop(ike, None)
        if t0 is None:
            return
        latencies.append(time.monotonic() - t0)
        await initiate()
        if not running:
            return
        try:
            await stub.Terminate(kx.TerminateRequest(ike_sa=ike), timeout=5)
        except grpc.aio.AioRpcError:
            failures += 1

    async def follow() -> None:
        _, revision = await store.range(prefix, limit=1)
        async for item in store.watch(prefix, revision + 1):
            keys = [kv.key for kv in item.kvs] if isinstance(item, Resync) else []
            if isinstance(item, WatchBatch):
                keys = [ev.kv.key for ev in item.events if ev.type.value == "put"]
            for key in keys:
                child = key[len(prefix) :].split("/", 1)[0]
                ike = child.rsplit(".", 1)[0]
                if ike in started:
                    task = asyncio.get_running_loop().create_task(done(ike))
                    pending.add(task)
                    task.add_done_callback(pending.discard)

    pending: set[asyncio.Task[None]] = set()  # done() calls still running
    watcher = asyncio.create_task(follow())
    await asyncio.sleep(0.2)
    t0 = time.monotonic()
    for _ in range(workers):
        await initiate()
    await asyncio.sleep(seconds)
    running = False
    wall = time.monotonic() - t0
    watcher.cancel()
    # settle the done() calls in flight before the channel goes: a Terminate on a closed
    # channel is a usage error, not a failed setup
    await asyncio.gather(*pending, return_exceptions=True)
    await channel.close()
    await store.close()
    lat = sorted(latencies)
    return {
        "setups": len(lat),
        "failures": failures,
        "seconds": round(wall, 2),
        "rate": round(len(lat) / wall, 1),
        "median_ms": round(lat[len(lat) // 2] * 1000, 1) if lat else None,
    }


def netns_cpu(*namespaces: str) -> dict[str, float]:
    """CPU seconds so far of every process in the namespaces, summed by name (charon A and B
    apart; the dataplane's workers apart from its main process)."""
    import subprocess

    out: dict[str, float] = {}
    for ns in namespaces:
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
                seconds = cpu_seconds(int(pid))
            except (OSError, ValueError):
                continue
            if "charon" in cmdline:
                name = f"charon_{'a' if ns == NS_A else 'b'}"
            elif "serve keyexchange" in cmdline:
                name = "keyexchange"
            elif "serve dataplane" in cmdline:
                parent = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
                try:
                    forked = "serve dataplane" in Path(f"/proc/{parent}/cmdline").read_text().replace("\0", " ")
                except OSError:
                    forked = False
                name = "dataplane_workers" if forked else "dataplane"
            else:
                continue
            out[name] = out.get(name, 0.0) + seconds
    return out


def cpu_per_setup(before: dict[str, float], after: dict[str, float], setups: int) -> dict[str, float]:
    """Milliseconds of CPU per counted setup, by process (and their total)."""
    if not setups:
        return {}
    per = {k: round(1000 * (after[k] - before.get(k, 0.0)) / setups, 2) for k in after}
    per["total"] = round(sum(per.values()), 2)
    return per


def measure(seconds: float, workers: int) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="kxs-bench-"))
    site = Site(f"{NETNS_PREFIX}b", SITE_INDEX, B_IP, "10.97.2.1", base / "site")
    sh("ip", "netns", "del", NS_A, check=False)
    site.create_netns()
    sh("ip", "netns", "add", NS_A)
    nsx(NS_A, "ip", "link", "set", "lo", "up")
    nsx(NS_A, "ip", "addr", "add", "10.97.1.1/32", "dev", "lo")  # charon installs routes with a source in local_ts
    sh("ip", "link", "add", "kxsba0", "netns", NS_A, "type", "veth", "peer", "name", "kxsbb0", "netns", site.ns)
    nsx(NS_A, "ip", "addr", "add", f"{A_IP}/24", "dev", "kxsba0")
    nsx(site.ns, "ip", "addr", "add", f"{B_IP}/24", "dev", "kxsbb0")
    nsx(NS_A, "ip", "link", "set", "kxsba0", "up")
    nsx(site.ns, "ip", "link", "set", "kxsbb0", "up")
    a = ix.Charon(base / "a", NS_A)
    b = ix.Charon(base / "b", site.ns)
    results: dict[str, Any] = {
        "proposal": f"PSK, IKE {PROPOSAL}, ESP {ESP}",
        "workers": workers,
        "seconds": seconds,
        "thresholds": THRESHOLD,
        "cpus": os.cpu_count(),
        "loadavg_before": os.getloadavg(),
        "dataplane": "the dataplane service (userspace backend)"
        if DATAPLANE == "real"
        else "tests.keyexchange.service.contract_dataplane",
    }
    try:
        # blocking VICI initiates each hold a charon thread: give charon enough for the workers
        extra = thresholds() + f"\n    threads = {max(16, 2 * workers + 8)}"
        a.start(extra, log_level=0)
        a.load(charon_conn(A_IP, B_IP, A_ID, B_ID, A_NET, B_NET), SECRETS)
        b.start(extra, log_level=0)
        b.load(charon_conn(B_IP, A_IP, B_ID, A_ID, B_NET, A_NET), SECRETS)
        for name, initiator in (("responder_strongswan", a), ("initiator_strongswan", b)):
            cpu0 = netns_cpu(NS_A, site.ns)
            results[name] = vici_rate(initiator.vici, seconds, workers)
            results[name]["cpu_ms_per_setup"] = cpu_per_setup(cpu0, netns_cpu(NS_A, site.ns), results[name]["setups"])
            print(name, results[name], flush=True)
        b.stop()
        site.start_dataplane()
        site.start_keyexchange(
            ESPLANADE_KEYEXCHANGE__COOKIE_THRESHOLD=str(THRESHOLD),
            ESPLANADE_KEYEXCHANGE__COOKIE_THRESHOLD_IP=str(THRESHOLD),
            ESPLANADE_KEYEXCHANGE__BLOCK_THRESHOLD=str(THRESHOLD),
            ESPLANADE_KEYEXCHANGE__SPI_POOL="1024",
            ESPLANADE_TELEMETRY__LOG_LEVEL="warning",
        )
        from esplanade.v1 import keyexchange_pb2 as kx

        site.kx_stub().LoadConnection(kx.LoadConnectionRequest(name="pair", config=struct(esplanade_conn())))
        assert site.kx is not None and site.dp is not None
        kx0, dp0 = cpu_seconds(site.kx.pid), cpu_seconds(site.dp.pid)
        cpu0 = netns_cpu(NS_A, site.ns)
        r = vici_rate(a.vici, seconds, workers)
        r["keyexchange_cpu_s"] = round(cpu_seconds(site.kx.pid) - kx0, 2)
        r["dataplane_cpu_s"] = round(cpu_seconds(site.dp.pid) - dp0, 2)
        r["cpu_ms_per_setup"] = cpu_per_setup(cpu0, netns_cpu(NS_A, site.ns), r["setups"])
        results["responder_esplanade"] = r
        print("responder_esplanade", r, flush=True)
        kx0, dp0 = cpu_seconds(site.kx.pid), cpu_seconds(site.dp.pid)
        cpu0 = netns_cpu(NS_A, site.ns)
        r = asyncio.run(esplanade_initiator(site, seconds, workers))
        r["keyexchange_cpu_s"] = round(cpu_seconds(site.kx.pid) - kx0, 2)
        r["dataplane_cpu_s"] = round(cpu_seconds(site.dp.pid) - dp0, 2)
        r["cpu_ms_per_setup"] = cpu_per_setup(cpu0, netns_cpu(NS_A, site.ns), r["setups"])
        results["initiator_esplanade"] = r
        print("initiator_esplanade", r, flush=True)
    finally:
        site.stop()
        a.stop()
        b.stop()
        sh("ip", "netns", "del", NS_A, check=False)
        site.delete_netns()
    return results


def run() -> list[Figure]:
    """`make bench`: ESPLANADE_BENCH_ROUNDS (default 3) complete same-run sets; for each
    direction the set with the median Esplanade/strongSwan ratio, and the ratios' spread."""
    rounds = max(1, int(os.environ.get("ESPLANADE_BENCH_ROUNDS", "3")))
    sets = [measure(seconds=15, workers=16) for _ in range(rounds)]
    note = f"{sets[0]['workers']} setups in flight; Esplanade counts an SA once the dataplane acked it in the store"
    figures: list[Figure] = []
    for role in ("responder", "initiator"):
        ours, theirs = f"{role}_esplanade", f"{role}_strongswan"
        ranked = sorted(sets, key=lambda r: _ratio(r, role))
        median = ranked[len(ranked) // 2]
        figures.append(
            Figure(
                f"ike_setup_rate.{role}",
                median[ours]["rate"],
                "setups/s",
                peer=f"strongSwan 5.9.8 {role}",
                peer_value=median[theirs]["rate"],
                group="keyexchange",
                notes=f"{note}; the median of {len(ranked)} same-run sets",
            )
        )
        ratios = [_ratio(r, role) for r in ranked if r[theirs]["rate"]]
        if ratios:
            figures += ratio_spread(f"ike_ratio_rounds.{role}", ratios, "keyexchange")
        for side, run in (("esplanade", ours), ("strongswan", theirs)):
            for process, value in median[run]["cpu_ms_per_setup"].items():
                name = f"ike_cpu_per_setup.{role}.{side}.{process}"
                figures.append(Figure(name, value, "ms", None, None, False, "keyexchange"))
    return figures


def _ratio(result: dict[str, Any], role: str) -> float:
    """Esplanade's setup rate over strongSwan's in one same-run set (`role`: responder or initiator)."""
    theirs = result[f"{role}_strongswan"]["rate"]
    return float(result[f"{role}_esplanade"]["rate"] / theirs) if theirs else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ike_setup_rate.json"))
    args = ap.parse_args()
    results = measure(args.seconds, args.workers)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'run':<24}{'setups/s':>10}{'median ms':>11}")
    for key in ("responder_strongswan", "responder_esplanade", "initiator_strongswan", "initiator_esplanade"):
        print(f"{key:<24}{results[key]['rate']:>10}{results[key]['median_ms']!s:>11}")


if __name__ == "__main__":
    main()
