"""Whether the compiled ESP loop (`_espfast`) imports here. It always does in CI (the package
is built with a C compiler); a run with the import blocked (PYTHONPATH pointing at a
sitecustomize that sets sys.modules["esplanade.dataplane.fastpath._espfast"] = None) checks
the pure-Python fallback, and then the tests of the compiled lane itself have nothing to test."""

from __future__ import annotations

import pytest

from esplanade.dataplane.fastpath.hot_path import load_compiled

COMPILED = load_compiled()[0] is not None
requires_compiled = pytest.mark.skipif(not COMPILED, reason="the compiled module does not import (fallback run)")


def skip_without_compiled(hot_path: str) -> None:
    if hot_path == "compiled" and not COMPILED:
        pytest.skip("the compiled module does not import (fallback run)")
