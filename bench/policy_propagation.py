"""Propagation: from a rule change to enforcement on 3 dataplane nodes (p50/p99).

A real etcd; the policy write path and compile (`PolicyStore` + `CompiledSync`, what the policy
service runs) in this process; three dataplane-node processes, each running the dataplane's
`AccessView` + `PolicyEnforcer` (what `esplanade serve dataplane` runs) over its own etcd client
and a real userspace backend (one worker, its own TUN), with `SAS_PER_NODE` live Child SAs of
the identity installed. Each round alternately deletes and re-creates the identity's rule and
times, on the wall clock of this one host, from just before the write until each node's worker
has acknowledged the new filter of *every* SA of the identity (`set_identity_filter` returned:
the filter is compiled into the worker's tables and applies to the next packet).

Everything runs inside one network namespace (`zt-bench`: loopback, the TUNs), so it needs root.
Run alone: ``.venv/bin/python -m bench.policy_propagation``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.records import Figure

NODES = 3
SAS_PER_NODE = 20
ROUNDS = 40
GROUP = "policy propagation"
POLICY = """
version: 1
sites:
  - {id: hq, networks: [10.50.0.0/16]}
groups:
  - {id: eng}
identities:
  - {id: alice, ike_ids: ["email:alice@corp.test"], groups: [eng]}
resources:
  - {id: web, destination: 10.50.1.10, protocol: tcp, ports: [443], site: hq}
  - {id: db, destination: 10.50.2.0/24, protocol: tcp, ports: [5432], site: hq}
rules:
  - {id: eng-db, groups: [eng], resources: [db]}
  - {id: eng-web, groups: [eng], resources: [web]}
"""


# -- a dataplane node (child process) ---------------------------------------------------------------
async def node_main(endpoint: str, name: str) -> None:
    from esplanade.dataplane.backend import FilterDrops
    from esplanade.dataplane.policy_enforcement import PolicyEnforcer
    from esplanade.dataplane.sa_persistence import MemorySaPersistence
    from esplanade.dataplane.userspace.backend import UserspaceBackend, UserspaceBackendSettings
    from esplanade.dataplane.userspace.datapath import DatapathSettings
    from esplanade.ipsec.selectors import TrafficSelector
    from esplanade.policy.access_view import AccessView
    from esplanade.policy.decision_events import DecisionEvents
    from esplanade.store.etcd import EtcdStore
    from tests.dataplane.child_sa_records import record

    index = int(name.removeprefix("dp"))
    datapath = DatapathSettings(tun_name=f"ztb{index}", workers=1, bind_address="127.0.0.1", port=14500 + index)
    backend = UserspaceBackend(UserspaceBackendSettings(datapath), MemorySaPersistence())
    await backend.start()  # forks the worker before any thread exists

    class TimedBackend:
        """The real backend; prints when the worker acknowledged each filter."""

        async def set_identity_filter(self, child_sa_id: str, selectors: list[TrafficSelector] | None) -> None:
            await backend.set_identity_filter(child_sa_id, selectors)
            count = -1 if selectors is None else len(selectors)
            print(json.dumps({"t": time.time(), "child": child_sa_id, "n": count}), flush=True)

        async def identity_filter_drops(self) -> FilterDrops:
            return await backend.identity_filter_drops()

    store = EtcdStore([endpoint])
    await store.connect()
    view = AccessView(store)
    enforcer = PolicyEnforcer(TimedBackend(), view, DecisionEvents(name), poll_seconds=3600)
    task = asyncio.create_task(view.run())
    try:
        await view.ready.wait()
        for i in range(SAS_PER_NODE):
            sa = dataclasses.replace(record(f"{name}-c{i}", 0x1000 + 2 * i), identity="alice@corp.test")
            await backend.install_child_sa(sa)
            await enforcer.on_installed(sa)
        print(json.dumps({"ready": name}), flush=True)
        await task
    finally:
        await backend.stop()


# -- the driver --------------------------------------------------------------------------------------
class Node:
    def __init__(self, endpoint: str, name: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.policy_propagation", "node", endpoint, name],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.latest: dict[str, tuple[float, int]] = {}

    async def read_until_ready(self) -> None:
        while True:
            line = await asyncio.to_thread(self._readline)
            if '"ready"' in line:
                return
            self._note(line)

    def _readline(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"node {self.name} exited")
        return line

    def _note(self, line: str) -> None:
        event = json.loads(line)
        self.latest[event["child"]] = (float(event["t"]), int(event["n"]))

    async def wait_all(self, selectors: int, after: float) -> float:
        """When the last SA of this node got a filter of `selectors` selectors after `after`."""
        while True:
            done = [t for t, n in self.latest.values() if n == selectors and t >= after]
            if len(done) == SAS_PER_NODE:
                return max(done)
            self._note(await asyncio.to_thread(self._readline))

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(5)


async def measure() -> dict[str, list[float]]:
    from esplanade.policy.compiled_sync import CompiledSync
    from esplanade.policy.policy_file import load_policy_yaml
    from esplanade.policy.store_state import PolicyStore
    from esplanade.store.etcd import EtcdStore
    from tests.etcd_server import EtcdServer

    out: dict[str, list[float]] = {"all": [], "node": []}
    with tempfile.TemporaryDirectory(prefix="bench-propagation-") as tmp:
        server = EtcdServer(Path(tmp) / "etcd")
        server.start()
        store = EtcdStore([server.endpoint])
        await store.connect()
        nodes: list[Node] = []
        sync_task = None
        try:
            policy = PolicyStore(store)
            model = load_policy_yaml(POLICY)
            for kind, objects in (
                ("sites", model.sites),
                ("groups", model.groups),
                ("identities", model.identities),
                ("resources", model.resources),
                ("rules", model.rules),
            ):
                for obj in objects.values():
                    await policy.put(kind, obj.id, document_of(obj), 0, "bench")
            sync = CompiledSync(store)
            sync_task = asyncio.create_task(sync.run())
            await sync.ready.wait()
            nodes = [Node(server.endpoint, f"dp{i}") for i in range(NODES)]
            await asyncio.gather(*(n.read_until_ready() for n in nodes))
            web = {"id": "eng-web", "groups": ["eng"], "resources": ["web"]}
            for i in range(ROUNDS):
                removing = i % 2 == 0
                expected = 1 if removing else 2  # eng-db alone, or eng-db + eng-web
                started = time.time()
                if removing:
                    await policy.delete("rules", "eng-web", 0, "bench")
                else:
                    await policy.put("rules", "eng-web", web, 0, "bench")
                times = await asyncio.gather(*(n.wait_all(expected, started) for n in nodes))
                out["node"] += [t - started for t in times]
                out["all"].append(max(times) - started)
        finally:
            for node in nodes:
                node.stop()
            if sync_task is not None:
                sync_task.cancel()
            await store.close()
            server.stop()
    return out


def document_of(obj: Any) -> dict[str, Any]:
    from esplanade.policy.decode import object_to_document

    doc = object_to_document(obj)
    doc.pop("id", None)
    return doc


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


NETNS = "zt-bench"


def run() -> list[Figure]:
    """Re-run this module inside its own network namespace and collect its figures."""
    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True, check=False)
    subprocess.run(["ip", "netns", "add", NETNS], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", NETNS, "ip", "link", "set", "lo", "up"], check=True)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        result = subprocess.run(
            ["ip", "netns", "exec", NETNS, sys.executable, "-m", "bench.policy_propagation", "measure"],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
            check=True,
        )
    finally:
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True, check=False)
    return [Figure(**json.loads(line)) for line in result.stdout.splitlines() if line.startswith("{")]


def figures() -> list[Figure]:
    samples = asyncio.run(measure())
    notes = f"{NODES} nodes x {SAS_PER_NODE} SAs, {ROUNDS} rule changes, real etcd, worker acknowledged"
    out = []
    for key, label in (("all", "all 3 nodes"), ("node", "per node")):
        ms = [s * 1000 for s in samples[key]]
        for q, name in ((0.5, "p50"), (0.99, "p99")):
            out.append(
                Figure(
                    f"rule change -> enforced, {label} {name}",
                    percentile(ms, q),
                    "ms",
                    higher_is_better=False,
                    group=GROUP,
                    notes=notes,
                )
            )
    mean = statistics.fmean(samples["all"]) * 1000
    out.append(Figure("rule change -> enforced, all 3 nodes mean", mean, "ms", higher_is_better=False, group=GROUP))
    return out


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "node":
        asyncio.run(node_main(sys.argv[2], sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "measure":  # inside the namespace
        for figure in figures():
            print(json.dumps(dataclasses.asdict(figure)))
    else:
        for figure in run():
            print(json.dumps(figure.to_json()))
