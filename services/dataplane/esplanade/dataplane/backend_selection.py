"""Which dataplane backend carries the packets: the kernel's XFRM or the userspace engine.

`auto` (the default) probes the kernel (see `kernel.esp_probe`): the kernel backend when
ESP works and every required algorithm went in, the userspace backend otherwise. `kernel`
and `userspace` force the choice; forcing `kernel` on a kernel without ESP fails at once
with the probe's reason instead of failing later on the first SA. The reason for the
choice, in words, is what `BackendStatus.reason` reports:

    userspace: kernel lacks ESP (xfrm_state add: EPROTONOSUPPORT: Requested type not found)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

from esplanade.dataplane.backend import InvalidArgument, Unsupported
from esplanade.dataplane.kernel.esp_probe import DEFAULT_REQUIRED, KernelEspProbe, probe_kernel_esp

ENV_VARIABLE = "ESPLANADE_DATAPLANE_BACKEND"


class BackendMode(Enum):
    AUTO = "auto"
    KERNEL = "kernel"
    USERSPACE = "userspace"

    @classmethod
    def parse(cls, text: str | None) -> BackendMode:
        value = (text or "auto").strip().lower()
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise InvalidArgument(f"dataplane backend {text!r} is not one of {choices}") from None


@dataclass(frozen=True, slots=True)
class BackendChoice:
    name: str  # "kernel" or "userspace"
    reason: str
    probe: KernelEspProbe | None = None

    @property
    def capabilities(self) -> tuple[str, ...]:
        return self.probe.supported if self.probe is not None else ()


def choose_backend(
    mode: BackendMode | str = BackendMode.AUTO,
    *,
    required: Sequence[str] = DEFAULT_REQUIRED,
    probe: Callable[[], KernelEspProbe] = probe_kernel_esp,
) -> BackendChoice:
    """Pick the backend; raises Unsupported if `kernel` is forced on a kernel that cannot."""
    mode = mode if isinstance(mode, BackendMode) else BackendMode.parse(mode)
    if mode == BackendMode.USERSPACE:
        return BackendChoice("userspace", "userspace backend selected by configuration")
    result = probe()
    if not result.esp:
        if mode == BackendMode.KERNEL:
            raise Unsupported(f"kernel backend requested, but {result.reason}")
        return BackendChoice("userspace", result.reason, result)
    missing = result.missing(required)
    if missing:
        lacking = "; ".join(f"{name} ({error})" for name, error in missing.items())
        reason = f"kernel has ESP but lacks {lacking}"
        if mode == BackendMode.KERNEL:
            raise Unsupported(f"kernel backend requested, but {reason}")
        return BackendChoice("userspace", reason, result)
    if mode == BackendMode.KERNEL:
        return BackendChoice("kernel", f"kernel backend selected by configuration; {result.reason}", result)
    return BackendChoice("kernel", f"{result.reason}; all required algorithms available", result)
