"""The zero-trust policy model: identities, groups, sites, resources and allow rules.

Everything is denied unless a rule allows it. A rule names groups and resources; an
identity reaches a resource when it belongs to one of the rule's groups and the rule's
conditions hold. There are no deny rules.

Objects are immutable and already valid in themselves (the decoders in `decode` build
them); references between objects (a rule's groups, a resource's site) are checked by
`validation`. Each object carries the store's `revision` (the key's mod_revision), which
equality ignores: two objects are equal when their content is.

Group membership is held by each identity (`Identity.groups`), not by the group: adding
a user to a group rewrites one small identity document instead of a group document that
grows with the organisation, and only that identity's compiled output changes.

Virtual-IP pools stay in the connection configuration (`config/pools/<name>`): handing out
an inner address is part of IKE's configuration exchange, and the address is pinned to the
SA by its initiator traffic selector. Policy decides only where that address may go.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import Enum
from typing import Any
from zoneinfo import ZoneInfo

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_PORT = 65535
DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MINUTES_PER_DAY = 24 * 60


class IkeIdKind(Enum):
    """IKE identification types (RFC 7296 §3.5) that bind a peer to a policy identity."""

    FQDN = "fqdn"
    EMAIL = "email"  # ID_RFC822_ADDR
    IP = "ip"  # ID_IPV4_ADDR / ID_IPV6_ADDR
    DN = "dn"  # ID_DER_ASN1_DN, in strongSwan's display order ("C=CH, O=Example, CN=alice")


@dataclass(frozen=True, slots=True, order=True)
class IkeId:
    """An IKE identity in normalized text form; `str()` gives ``kind:value``."""

    kind: IkeIdKind
    value: str

    def __str__(self) -> str:
        return f"{self.kind.value}:{self.value}"


class IdentityKind(Enum):
    USER = "user"
    DEVICE = "device"


@dataclass(frozen=True, slots=True)
class Identity:
    id: str
    kind: IdentityKind = IdentityKind.USER
    ike_ids: tuple[IkeId, ...] = ()
    groups: tuple[str, ...] = ()
    description: str = ""
    revision: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Group:
    id: str
    description: str = ""
    revision: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Site:
    """A site or connector: a gateway that fronts private networks and only dials out."""

    id: str
    networks: tuple[IPNetwork, ...] = ()
    description: str = ""
    revision: int = field(default=0, compare=False)


class Protocol(Enum):
    TCP = "tcp"
    UDP = "udp"
    ICMP = "icmp"  # ICMP for IPv4 destinations, ICMPv6 for IPv6 destinations
    ANY = "any"


PROTOCOL_NUMBERS = {Protocol.TCP: 6, Protocol.UDP: 17, Protocol.ANY: 0}
ICMP_V4 = 1
ICMP_V6 = 58


def ip_protocol(protocol: Protocol, version: int) -> int:
    """The IP protocol number of `protocol` toward an address of IP `version` (0: any)."""
    if protocol is Protocol.ICMP:
        return ICMP_V4 if version == 4 else ICMP_V6
    return PROTOCOL_NUMBERS[protocol]


@dataclass(frozen=True, slots=True, order=True)
class PortRange:
    start: int
    end: int

    def __str__(self) -> str:
        return str(self.start) if self.start == self.end else f"{self.start}-{self.end}"


ALL_PORTS = PortRange(0, MAX_PORT)


@dataclass(frozen=True, slots=True)
class IcmpMatch:
    """An ICMP type, and optionally one code of it (None: every code)."""

    type: int
    code: int | None = None

    def port_range(self) -> PortRange:
        """The range in the selector port space: type in the high byte, code in the low (RFC 7296 §3.13.1)."""
        if self.code is None:
            return PortRange(self.type << 8, (self.type << 8) | 0xFF)
        value = (self.type << 8) | self.code
        return PortRange(value, value)

    def __str__(self) -> str:
        return str(self.type) if self.code is None else f"{self.type}/{self.code}"


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a resource is: an IP network (a host is a full-length prefix) or a DNS name."""

    network: IPNetwork | None = None
    dns_name: str | None = None

    def __post_init__(self) -> None:
        if (self.network is None) == (self.dns_name is None):
            raise ValueError("a destination is either a network or a DNS name")

    def __str__(self) -> str:
        if self.network is None:
            assert self.dns_name is not None
            return self.dns_name
        if self.network.prefixlen == self.network.max_prefixlen:
            return str(self.network.network_address)
        return str(self.network)


@dataclass(frozen=True, slots=True)
class Resource:
    """A destination, a protocol with its ports (or ICMP types), and the site that fronts it.

    Empty `ports` (tcp/udp) or `icmp_types` (icmp) means all of them.
    """

    id: str
    destination: Destination
    site: str
    protocol: Protocol = Protocol.ANY
    ports: tuple[PortRange, ...] = ()
    icmp_types: tuple[IcmpMatch, ...] = ()
    description: str = ""
    revision: int = field(default=0, compare=False)

    def port_ranges(self) -> tuple[PortRange, ...]:
        """The allowed ranges in the selector port space (ICMP: type<<8|code)."""
        if self.protocol in (Protocol.TCP, Protocol.UDP) and self.ports:
            return self.ports
        if self.protocol is Protocol.ICMP and self.icmp_types:
            return tuple(m.port_range() for m in self.icmp_types)
        return (ALL_PORTS,)


@dataclass(frozen=True, slots=True)
class TimeWindow:
    """Days of the week and a time of day, in a time zone.

    `start`/`end` are minutes after local midnight; `end` may be 1440 (24:00). When `end`
    is not after `start` the window runs overnight: it opens on a listed day at `start`
    and closes the next day at `end`. The window is evaluated on the local wall clock, so
    across a DST change it follows local time (a 02:00-03:00 window never opens on the
    spring-forward day and covers both 02:xx hours on the fall-back day).
    """

    days: tuple[int, ...]  # 0 = Monday, sorted, unique
    start: int
    end: int
    timezone: str

    def contains(self, now: float) -> bool:
        """Is the POSIX wall-clock time `now` inside the window?"""
        local = datetime.fromtimestamp(now, ZoneInfo(self.timezone))
        minute = local.hour * 60 + local.minute
        day = local.weekday()
        if self.start < self.end:
            return day in self.days and self.start <= minute < self.end
        return (day in self.days and minute >= self.start) or ((day - 1) % 7 in self.days and minute < self.end)


def format_minutes(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


@dataclass(frozen=True, slots=True)
class Conditions:
    """Extra conditions of a rule; all that are set must hold.

    `source_networks`: the client's outer (underlay) address must be inside one of them.
    `posture`: every tag must be among the tags the device reported at connect time.
    """

    time_window: TimeWindow | None = None
    source_networks: tuple[IPNetwork, ...] = ()
    posture: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return self.time_window is None and not self.source_networks and not self.posture


NO_CONDITIONS = Conditions()


@dataclass(frozen=True, slots=True)
class Rule:
    """Members of any of `groups` may reach any of `resources` while `conditions` hold."""

    id: str
    groups: tuple[str, ...]
    resources: tuple[str, ...]
    conditions: Conditions = NO_CONDITIONS
    description: str = ""
    revision: int = field(default=0, compare=False)


PolicyObject = Identity | Group | Site | Resource | Rule

# Store kinds (`esplanade.store.schema.POLICY_KINDS`) in dependency order: an object only
# refers to kinds before it... except identities -> groups, which is why groups come first.
KINDS = ("sites", "groups", "identities", "resources", "rules")
KIND_OF: dict[type, str] = {
    Site: "sites",
    Group: "groups",
    Identity: "identities",
    Resource: "resources",
    Rule: "rules",
}
SINGULAR = {"sites": "site", "groups": "group", "identities": "identity", "resources": "resource", "rules": "rule"}


@dataclass(frozen=True, slots=True)
class Model:
    """The whole policy. Mappings are id -> object; treat them as read-only."""

    sites: Mapping[str, Site] = field(default_factory=dict)
    groups: Mapping[str, Group] = field(default_factory=dict)
    identities: Mapping[str, Identity] = field(default_factory=dict)
    resources: Mapping[str, Resource] = field(default_factory=dict)
    rules: Mapping[str, Rule] = field(default_factory=dict)

    @classmethod
    def of(cls, objects: Iterator[PolicyObject] | list[PolicyObject] | tuple[PolicyObject, ...]) -> Model:
        by_kind: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
        for obj in objects:
            by_kind[KIND_OF[type(obj)]][obj.id] = obj
        return cls(**by_kind)

    def kind(self, kind: str) -> Mapping[str, PolicyObject]:
        if kind not in KINDS:
            raise ValueError(f"unknown policy object kind {kind!r}")
        mapping: Mapping[str, PolicyObject] = getattr(self, kind)
        return mapping

    def objects(self) -> Iterator[PolicyObject]:
        for kind in KINDS:
            yield from self.kind(kind).values()

    def with_object(self, obj: PolicyObject) -> Model:
        kind = KIND_OF[type(obj)]
        changed: dict[str, Any] = {kind: {**self.kind(kind), obj.id: obj}}
        return replace(self, **changed)

    def without(self, kind: str, object_id: str) -> Model:
        changed: dict[str, Any] = {kind: {k: v for k, v in self.kind(kind).items() if k != object_id}}
        return replace(self, **changed)

    def identity_for_ike_id(self, ike_id: IkeId) -> Identity | None:
        """The identity bound to an authenticated IKE identity (normalize it first: `decode.parse_ike_id`)."""
        for identity in self.identities.values():
            if ike_id in identity.ike_ids:
                return identity
        return None
