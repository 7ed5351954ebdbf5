"""Which hot loop runs (`dataplane.hot_path: auto | compiled | python`), and why.

`auto` takes the compiled loop when its extension module imports and agrees with this
engine's drop reasons, and otherwise the pure-Python engine, saying why (no compiler or
libssl-dev at install time, a module built for another interpreter, ...). `compiled` refuses
to start without it (`HotPathUnavailable`); `python` never loads it.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Literal

from esplanade.dataplane.esp.counters import DropReason
from esplanade.dataplane.esp.esp_codec import decrypt_esp, encrypt_esp
from esplanade.dataplane.fastpath.esp_batch import CompiledEspBatch, EspBatchCore, PythonEspBatch
from esplanade.dataplane.fastpath.flow_accounting import DEFAULT_FLOW_CAPACITY

COMPILED_MODULE = "esplanade.dataplane.fastpath._espfast"
HotPathSetting = Literal["auto", "compiled", "python"]


class HotPathUnavailable(RuntimeError):
    """`hot_path: compiled` was asked for and the compiled loop cannot run."""


@dataclass(frozen=True, slots=True)
class HotPathStatus:
    requested: HotPathSetting
    active: Literal["compiled", "python"]
    reason: str
    build: dict[str, object] = field(default_factory=dict)  # OpenSSL version, sanitizer build

    def as_dict(self) -> dict[str, object]:
        return {"requested": self.requested, "active": self.active, "reason": self.reason, "build": self.build}


@functools.cache
def load_compiled() -> tuple[ModuleType | None, str]:
    """The configured extension module, or None and why not. Cached: call `cache_clear()` to retry."""
    try:
        module = importlib.import_module(COMPILED_MODULE)
    except ImportError as exc:
        return None, f"the compiled module is not available ({exc}); was the package built without a C compiler?"
    names = tuple(getattr(module, "DROP_REASON_NAMES", ()))
    if len(names) < 1 or set(names[1:]) != {r.value for r in DropReason}:
        return None, "the compiled module counts other drop reasons than this engine: rebuild it"
    module.configure((None, *(DropReason(n) for n in names[1:])), encrypt_esp, decrypt_esp)
    return module, ""


def hot_path_status(requested: HotPathSetting) -> HotPathStatus:
    if requested == "python":
        return HotPathStatus(requested, "python", "dataplane.hot_path is python")
    module, why = load_compiled()
    if module is None:
        return HotPathStatus(requested, "python", why)
    reason = "dataplane.hot_path is compiled" if requested == "compiled" else "the compiled module is available"
    return HotPathStatus(requested, "compiled", reason, dict(module.build_info()))


def make_esp_batch_core(
    requested: HotPathSetting, flow_capacity: int = DEFAULT_FLOW_CAPACITY
) -> tuple[EspBatchCore, HotPathStatus]:
    status = hot_path_status(requested)
    if requested == "compiled" and status.active != "compiled":
        raise HotPathUnavailable(f"dataplane.hot_path is compiled, but {status.reason}")
    if status.active == "compiled":
        module, _ = load_compiled()
        assert module is not None
        return CompiledEspBatch(module, flow_capacity), status
    return PythonEspBatch(flow_capacity), status
