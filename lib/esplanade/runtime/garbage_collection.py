"""CPython's cyclic garbage collector, tuned for a long-running service process.

Reference counting frees almost everything a service allocates per request (IKE messages,
store records, protobufs); the cyclic collector only finds reference cycles. With CPython's
defaults it runs a young collection every 700 net container allocations and, now and then, a
full one over every tracked object, the tens of thousands that the imported modules
(gRPC, protobuf, OpenTelemetry, cryptography) and the service's set-up left behind. py-spy put
the collector at 2-4 % of the GIL-holding samples of keyexchange and the dataplane during the
IKE setup-rate bench.

- `tune()`, at process start (the dataplane's forked workers inherit it): a young collection
  every `YOUNG_THRESHOLD` allocations instead of 700. Cycles still get collected, in fewer,
  larger passes; what waits for one is bounded by the threshold.
- `freeze()`, once the service is set up: everything alive then moves to the permanent
  generation (`gc.freeze`), which full collections no longer traverse. Those objects are the
  process's long-lived state; anything among them that is dropped later is still freed by
  reference counting, only a cycle among them would stay (the collector never sees it).
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 20_000  # CPython's default: 700
OLDER_THRESHOLD = 10  # young collections per middle one, middle ones per full one (the default)


_tuned = False


def tune() -> None:
    """For a service process (`esplanade serve`), before its set-up."""
    global _tuned
    gc.set_threshold(YOUNG_THRESHOLD, OLDER_THRESHOLD, OLDER_THRESHOLD)
    _tuned = True


def tuned() -> bool:
    """Did this process call `tune()` (a service process, not a test run hosting a service)?"""
    return _tuned


def freeze() -> None:
    """Collect what is garbage now, then exempt every survivor from later full collections."""
    gc.collect()
    gc.freeze()
