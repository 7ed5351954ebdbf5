"""The one interface both dataplane backends implement (userspace TUN+UDP, kernel XFRM).

The dataplane service and keyexchange never know which backend runs, as strongSwan's charon
does not know whether kernel-netlink or kernel-libipsec carries its SAs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from esplanade.ipsec.sa import ChildSaRecord
from esplanade.ipsec.spd import SpdPolicy


class DataplaneError(Exception):
    """A request the backend refused. Nothing of it is left installed."""

    code = "INTERNAL"


class InvalidArgument(DataplaneError):
    code = "INVALID_ARGUMENT"


class AlreadyExists(DataplaneError):
    code = "ALREADY_EXISTS"


class NotFound(DataplaneError):
    code = "NOT_FOUND"


class Unsupported(DataplaneError):
    """The backend cannot carry this SA (e.g. the kernel lacks ESP or the algorithm)."""

    code = "FAILED_PRECONDITION"


@dataclass(frozen=True, slots=True)
class BackendStatus:
    name: str  # "userspace" or "kernel"
    reason: str  # why this backend was chosen
    capabilities: tuple[str, ...] = ()
    details: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class SaCounters:
    spi: int
    direction: str
    packets: int = 0
    bytes: int = 0
    replay_window_top: int = 0


class DataplaneEventKind(Enum):
    SOFT_EXPIRE = "soft_expire"  # a soft lifetime ran out: rekey
    HARD_EXPIRE = "hard_expire"  # a hard lifetime ran out: the SA is gone
    SEQUENCE_EXHAUSTED = "sequence_exhausted"  # the sender stopped: rekey now
    ACQUIRE = "acquire"  # a trap policy matched traffic: negotiate on demand
    INSTALLED = "installed"
    DELETED = "deleted"


@dataclass(frozen=True, slots=True)
class DataplaneEvent:
    kind: DataplaneEventKind
    child_sa: str = ""
    spi: int = 0
    policy: str = ""
    reason: str = ""


class DataplaneBackend(Protocol):
    """Install, replace and remove Child SAs and SPD entries; report counters and events.

    Every method either applies the whole request or raises a `DataplaneError` and leaves
    the previous state untouched.
    """

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def status(self) -> BackendStatus: ...

    async def install_child_sa(self, record: ChildSaRecord) -> None: ...

    async def delete_child_sa(self, child_sa_id: str) -> None: ...

    async def install_policy(self, policy: SpdPolicy) -> None: ...

    async def delete_policy(self, policy_id: str) -> None: ...

    def counters(self) -> list[SaCounters]: ...

    def events(self) -> AsyncIterator[DataplaneEvent]: ...


@dataclass
class FilterDrops:
    """What a backend's identity filters and selector checks dropped (`policy_enforcement`):
    per Child SA, cumulative while it is installed, and samples of denied packets' headers."""

    denied: dict[str, int] = field(default_factory=dict)  # identity filter
    outside_selectors: dict[str, int] = field(default_factory=dict)  # outside the SA's selectors
    samples: list[tuple[str, bytes]] = field(default_factory=list)  # (Child SA, header)
    # (Child SA, header) of the last packet per SA dropped outside its selectors since the last read
    outside_samples: list[tuple[str, bytes]] = field(default_factory=list)
    # drops the backend cannot attribute to a Child SA, by counter name, cumulative since it
    # started (the kernel backend: its namespace's inbound policy-check drops)
    unattributed: dict[str, int] = field(default_factory=dict)
