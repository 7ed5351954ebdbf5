"""Can this kernel carry ESP, and with which algorithms? Ask it, in a throw-away netns.

Reading /proc/crypto or module lists is not enough (a module may load on demand, or ESP
may be compiled out while XFRM netlink works, as on kernels without CONFIG_INET_ESP). So
the probe does what the backend will do: it creates a private network namespace, adds
one SA per algorithm there and records what the kernel answered, then removes the
namespace (and the SAs with it). Nothing touches the caller's namespace.

Typical answers: ESP missing -> EPROTONOSUPPORT "Requested type not found"; an algorithm
missing from the kernel's table or its crypto API -> ENOSYS "Requested AEAD algorithm not
found" (ENOENT when a crypto template cannot be instantiated).
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from esplanade.dataplane.backend import DataplaneError
from esplanade.dataplane.kernel.xfrm_client import XfrmClient
from esplanade.dataplane.kernel.xfrm_sa import xfrm_sa_from_association
from esplanade.dataplane.kernel.xfrm_socket import XfrmNetlinkError, XfrmSocket
from esplanade.ipsec.sa import SecurityAssociation
from esplanade.ipsec.transforms import (
    ENCR_AES_CBC_128,
    ENCR_ALGORITHMS,
    INTEG_ALGORITHMS,
    INTEG_HMAC_SHA2_256_128,
    Direction,
    EncrAlgorithm,
    IntegAlgorithm,
    IpProto,
)

# Probe names: the ESP encryption transform names, the integrity names, and "ah".
AH_PROBE = "ah"
PROBE_NAMES: tuple[str, ...] = (*ENCR_ALGORITHMS, *INTEG_ALGORITHMS, AH_PROBE)
# What the userspace engine offers and a kernel must have to replace it by default.
DEFAULT_REQUIRED: tuple[str, ...] = (
    "aes128gcm16",
    "aes256gcm16",
    "chacha20poly1305",
    "aes128",
    "aes256",
    "sha256",
    "sha384",
    "sha512",
)
_counter = itertools.count(1)


@dataclass(frozen=True, slots=True)
class KernelEspProbe:
    """What the kernel answered: `results[name]` is "" when the SA went in, else the error."""

    esp: bool
    reason: str
    results: dict[str, str] = field(default_factory=dict)

    @property
    def supported(self) -> tuple[str, ...]:
        return tuple(name for name, error in self.results.items() if not error)

    def missing(self, required: Iterable[str]) -> dict[str, str]:
        return {name: self.results.get(name, "not probed") for name in required if self.results.get(name, "?")}


def _probe_sa(
    spi: int, encr: EncrAlgorithm | None, integ: IntegAlgorithm | None, proto: IpProto
) -> SecurityAssociation:
    return SecurityAssociation(
        spi=spi,
        direction=Direction.OUT,
        src="192.0.2.1",
        dst="192.0.2.2",
        protocol=proto,
        encr=encr,
        encr_key=bytes(encr.keymat_bytes) if encr else b"",
        integ=integ,
        integ_key=bytes(integ.key_bytes) if integ else b"",
    )


def _cases() -> list[tuple[str, SecurityAssociation]]:
    cases: list[tuple[str, SecurityAssociation]] = []
    spi = 0x100
    for name, encr in ENCR_ALGORITHMS.items():
        spi += 1
        cases.append((name, _probe_sa(spi, encr, None if encr.aead else INTEG_HMAC_SHA2_256_128, IpProto.ESP)))
    for name, integ in INTEG_ALGORITHMS.items():
        spi += 1
        cases.append((name, _probe_sa(spi, ENCR_AES_CBC_128, integ, IpProto.ESP)))
    cases.append((AH_PROBE, _probe_sa(spi + 1, None, INTEG_HMAC_SHA2_256_128, IpProto.AH)))
    return cases


def _errno_text(exc: DataplaneError) -> str:
    cause = exc.__cause__
    if isinstance(cause, XfrmNetlinkError):
        return f"{cause.errno_name}" + (f": {cause.kernel_message}" if cause.kernel_message else "")
    return str(exc)


def probe_kernel_esp(netns_prefix: str = "esplanade-probe") -> KernelEspProbe:
    """Add one SA per algorithm in a private netns and report what the kernel accepted."""
    from pyroute2 import netns as pyroute2_netns

    name = f"{netns_prefix}-{os.getpid()}-{next(_counter)}"
    try:
        pyroute2_netns.create(name)
    except OSError as exc:
        return KernelEspProbe(False, f"cannot probe kernel ESP: creating a network namespace failed ({exc})")
    try:
        results: dict[str, str] = {}
        with XfrmSocket(name) as sock:
            client = XfrmClient(sock)
            for label, sa in _cases():
                try:
                    client.add_sa(xfrm_sa_from_association(sa, reqid=1))
                    results[label] = ""
                except DataplaneError as exc:
                    results[label] = _errno_text(exc)
    except (OSError, XfrmNetlinkError) as exc:
        return KernelEspProbe(False, f"cannot probe kernel ESP: no XFRM netlink ({exc})")
    finally:
        with contextlib.suppress(OSError):
            pyroute2_netns.remove(name)
    esp_ok = [n for n in ENCR_ALGORITHMS if not results.get(n)]
    if esp_ok:
        return KernelEspProbe(True, f"kernel has ESP (probe installed {', '.join(esp_ok)})", results)
    errors = [results[n] for n in ENCR_ALGORITHMS if results.get(n)]
    lacking = next((e for e in errors if e.startswith("EPROTONOSUPPORT")), errors[0] if errors else "no answer")
    return KernelEspProbe(False, f"kernel lacks ESP (xfrm_state add: {lacking})", results)
