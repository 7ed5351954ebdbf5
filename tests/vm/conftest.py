"""The guest tests (tests/vm/guest) need the VM's kernel: only the pytest inside the VM collects them."""

from __future__ import annotations

import os

collect_ignore_glob = [] if os.environ.get("ESPLANADE_IN_VM") == "1" else ["guest/*"]
