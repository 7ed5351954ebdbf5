"""Where decision events go: the one interface between the deciders and the logs.

IKE records an allow or deny per connection set-up; the dataplane records the packets its
identity filters dropped. `DecisionEvents` feeds them through a `DecisionLog` (aggregated by
flow, rate-limited: a flood of spoofed packets stays a few lines) and hands each resulting
`LogRecord` to

- the structured log: logger ``esplanade.decisions``, the message plus ``extra={"decision":
  record.to_document()}`` (never the store: logs grow with traffic, etcd must not);
- every subscriber (`subscribe`): the flow log / audit query side plugs in here;
- `recent`: the last `RECENT` records, for status pages and tests.

`record()` is cheap and synchronous; call `run()` as a task so aggregated counts come out when
their interval ends even when no new event arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable

from esplanade.policy.decision_log import DecisionEvent, DecisionLog, LogRecord

log = logging.getLogger("esplanade.decisions")

RECENT = 1000
IDLE_POLL_SECONDS = 1.0

DecisionSubscriber = Callable[[LogRecord], None]


class DecisionEvents:
    def __init__(
        self, source: str, decision_log: DecisionLog | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.source = source  # "keyexchange", "dataplane/<node>", ...
        self.log = decision_log or DecisionLog()
        self.clock = clock
        self.recent: deque[LogRecord] = deque(maxlen=RECENT)
        self._subscribers: list[DecisionSubscriber] = []
        self._wake = asyncio.Event()

    def subscribe(self, subscriber: DecisionSubscriber) -> Callable[[], None]:
        """Call `subscriber` with every record from now on; returns the unsubscribe function."""
        self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)

        return unsubscribe

    def record(self, event: DecisionEvent, count: int = 1) -> None:
        self.log.record(event, self.clock(), count)
        self.flush()
        self._wake.set()

    def flush(self) -> None:
        for record in self.log.records(self.clock()):
            self._publish(record)

    def _publish(self, record: LogRecord) -> None:
        self.recent.append(record)
        document = {"source": self.source, **record.to_document()}
        log.info("%s", record.message, extra={"decision": document})
        for subscriber in list(self._subscribers):
            try:
                subscriber(record)
            except Exception:  # a subscriber must not break the deciders
                log.exception("decision subscriber failed")

    async def run(self) -> None:
        while True:
            deadline = self.log.get_timer()
            timeout = IDLE_POLL_SECONDS if deadline is None else max(0.0, deadline - self.clock())
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=min(timeout, IDLE_POLL_SECONDS))
            self.flush()
