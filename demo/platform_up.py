"""`esplanade up`: the four services on one machine, their health, and /readyz.

Runs the platform in a network namespace of its own (the services keep their standard ports
there), prints `esplanade health` once every service reports SERVING, checks that the API's
/readyz answers 200, and stops it with Ctrl-C (SIGINT) as a user would.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from tests.conditions import ConditionTimeout, wait_until
from tests.netns_topology import scratch_netns
from tests.platform_process import Platform

Say = Callable[[str], None]


def run_scenario(say: Say = print) -> bool:
    with tempfile.TemporaryDirectory(prefix="esplanade-demo-up-") as tmp, scratch_netns("demo-up-") as ns:
        platform = Platform(ns, Path(tmp) / "state")
        say(f"$ esplanade up --state-dir {platform.state_dir}   (in network namespace {ns})")
        platform.start()
        try:
            try:
                wait_until(platform.all_serving, timeout=90, interval=0.5, what="all four services SERVING")
            except ConditionTimeout:
                say(platform.log.read_text()[-3000:])
                return False
            health = subprocess.run(
                ["ip", "netns", "exec", ns, *platform._cli("health")], env=platform.env, capture_output=True, text=True
            )
            say("$ esplanade health")
            say(health.stdout.rstrip())
            ready = platform.readyz()
            say(f"$ curl http://127.0.0.1:8080/readyz  ->  HTTP {ready}")
            return health.returncode == 0 and ready == 200
        finally:
            code = platform.stop()
            say(f"Ctrl-C: esplanade up exited with status {code}")
