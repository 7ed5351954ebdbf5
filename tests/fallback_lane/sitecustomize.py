"""Blocks the compiled ESP loop for the fallback lane of `make test`.

With this directory on PYTHONPATH every Python process of the run (pytest and the services it
starts) finds `esplanade.dataplane.fastpath._espfast` unimportable, exactly as on a machine
without a C compiler or libssl-dev, so the pure-Python hot path carries every packet.
"""

import sys

sys.modules["esplanade.dataplane.fastpath._espfast"] = None  # type: ignore[assignment]
