"""Typed events the IKEv2 core hands to its shell (`next_event()`), and outbound datagrams."""

from __future__ import annotations

from dataclasses import dataclass, field

from esplanade.ipsec.sa import ChildSaRecord, SecurityAssociation
from esplanade.keyexchange.ikev2.constants import NotifyType

Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Datagram:
    """One UDP payload to send. `non_esp_marker`: prepend four zero bytes (RFC 3948 §2.2, port 4500)."""

    data: bytes = field(repr=False)
    local: Address
    remote: Address
    non_esp_marker: bool = False

    def wire_bytes(self) -> bytes:
        return b"\x00\x00\x00\x00" + self.data if self.non_esp_marker else self.data


class Event:
    """Base of all events; every event names its IKE SA (`ike_sa`)."""

    __slots__ = ()
    ike_sa: str


@dataclass(frozen=True, slots=True)
class IkeSaEstablished(Event):
    ike_sa: str
    connection: str
    initiator: bool
    local_id: str
    remote_id: str
    local: Address
    remote: Address
    suite: str
    nat_local: bool = False
    nat_remote: bool = False
    virtual_ips: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()
    split_subnets: tuple[str, ...] = ()
    rekey_of: str = ""
    reauth_of: str = ""


@dataclass(frozen=True, slots=True)
class IkeSaRekeyed(Event):
    ike_sa: str  # the old one
    new_ike_sa: str


@dataclass(frozen=True, slots=True)
class InstallInboundSa(Event):
    """Responder only: install `sa`, then call `inbound_sa_installed(child_id)` to release the response.

    `record` is the whole pair (the outbound SA too), for a shell that writes Child SA records
    in one go; its outbound SA must not carry traffic before `ChildSaEstablished`/`ChildSaRekeyed`.
    """

    ike_sa: str
    child_id: str
    sa: SecurityAssociation = field(repr=False)
    record: ChildSaRecord | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class ChildSaEstablished(Event):
    """A Child SA is up: install `record` (both directions, keys inside; repr hides them)."""

    ike_sa: str
    child_id: str
    record: ChildSaRecord = field(repr=False)


@dataclass(frozen=True, slots=True)
class ChildSaRekeyed(Event):
    """`new_child_id` replaces `old_child_id`; the old SAs go away with a later ChildSaDeleted."""

    ike_sa: str
    old_child_id: str
    new_child_id: str
    record: ChildSaRecord = field(repr=False)


@dataclass(frozen=True, slots=True)
class ChildSaDeleted(Event):
    ike_sa: str
    child_id: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class IkeSaDeleted(Event):
    ike_sa: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class NegotiationFailed(Event):
    ike_sa: str
    notify: NotifyType | int
    reason: str
    exchange: str = ""
    child: str = ""

    @property
    def notify_name(self) -> str:
        try:
            return NotifyType(self.notify).name
        except ValueError:
            return str(self.notify)


@dataclass(frozen=True, slots=True)
class ExchangeCompleted(Event):
    """One exchange we started (our request and the peer's response, or no response): what
    tracing turns into a span. `outcome` is ok, failed or timeout; `notify` names the failure."""

    ike_sa: str
    exchange: str  # IKE_SA_INIT, IKE_INTERMEDIATE, IKE_AUTH, CREATE_CHILD_SA, INFORMATIONAL
    started_at: float  # monotonic seconds, as `now`
    finished_at: float
    outcome: str
    notify: str = ""
