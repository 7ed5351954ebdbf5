"""`esplanade up`: the four services as four child processes on one machine.

Children get PR_SET_PDEATHSIG, so a SIGKILLed supervisor takes its services with it and a
restart finds the ports free. A child that dies on its own is restarted with backoff.
Ctrl-C (SIGINT) or SIGTERM stops every child with SIGTERM, then SIGKILL after a grace time.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

SERVICES = ("policy", "dataplane", "keyexchange", "api")
PR_SET_PDEATHSIG = 1
STOP_GRACE_SECONDS = 8.0


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    # Our own process group: a terminal's Ctrl-C reaches the supervisor only, which then
    # stops the children in order.
    os.setpgid(0, 0)


@dataclass
class Child:
    service: str
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    started_at: float = 0.0


class Supervisor:
    def __init__(self, argv_prefix: list[str], env: dict[str, str], services: tuple[str, ...] = SERVICES) -> None:
        self.argv_prefix = argv_prefix
        self.env = env
        self.children = {name: Child(name) for name in services}
        self.stopping = asyncio.Event()

    async def _start(self, child: Child) -> None:
        child.process = await asyncio.create_subprocess_exec(
            *self.argv_prefix,
            "serve",
            child.service,
            env=self.env,
            preexec_fn=_die_with_parent,
        )
        child.started_at = time.monotonic()
        log.info("started %s (pid %d)", child.service, child.process.pid)

    async def _watch(self, child: Child) -> None:
        backoff = 0.5
        while not self.stopping.is_set():
            await self._start(child)
            assert child.process is not None
            code = await child.process.wait()
            if self.stopping.is_set():
                return
            if time.monotonic() - child.started_at > 30:
                backoff = 0.5
            child.restarts += 1
            log.warning("%s exited with %s; restarting in %.1fs", child.service, code, backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=backoff)
            backoff = min(backoff * 2, 10.0)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopping.set)
        watchers = [asyncio.create_task(self._watch(c)) for c in self.children.values()]
        await self.stopping.wait()
        await self._stop_all()
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        return 0

    async def _stop_all(self) -> None:
        # Reverse start order: the API goes first so nobody sees half a platform.
        running = [c.process for c in reversed(self.children.values()) if c.process and c.process.returncode is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for process in running:
            try:
                await asyncio.wait_for(process.wait(), timeout=max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                log.warning("pid %d ignored SIGTERM; killing it", process.pid)
                process.kill()
                await process.wait()


def child_argv() -> list[str]:
    """How to start `esplanade serve X` with this very interpreter."""
    return [sys.executable, "-m", "esplanade.cli.main"]
