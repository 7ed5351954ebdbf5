"""Connections, structurally (swanctl.conf's ``connections.<name>``), for requests and replies.

The API checks shape, types, ranges and syntax here; keyexchange checks meaning (proposal
algorithms, identities against certificates, lifetimes against each other) when the API
hands it the document (`LoadConnection(validate_only=true)`). Secrets are write-only: a
request may carry ``psk``; a reply says ``"psk": {"set": true}``.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, StringConstraints

from esplanade.ipsec.selectors import TrafficSelector

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
ObjectRef = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


def _address(value: str) -> str:
    if value == "%any":
        return value
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        pass
    if _HOSTNAME.match(value) and not value.replace(".", "").isdigit():
        return value.lower()
    raise ValueError("must be an IP address, a CIDR, a DNS name or %any")


def _ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError("must be an IP address") from None


def _selector(value: str) -> str:
    if value == "dynamic":
        return value
    try:
        TrafficSelector.parse(value)
    except (ValueError, TypeError, IndexError, KeyError):
        raise ValueError("must be a traffic selector: CIDR, range a-b or 'dynamic', optionally [proto/port]") from None
    return value


Address = Annotated[
    str,
    StringConstraints(min_length=1, max_length=253, pattern=r"^[%A-Za-z0-9.:/_-]+$"),
    AfterValidator(_address),
]
IpAddress = Annotated[
    str, StringConstraints(min_length=2, max_length=45, pattern=r"^[0-9A-Fa-f.:]+$"), AfterValidator(_ip)
]
Selector = Annotated[
    str,
    StringConstraints(min_length=1, max_length=120, pattern=r"^[0-9A-Za-z.:/\[\]-]+$"),
    AfterValidator(_selector),
]
Proposal = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]+(-[a-z0-9_]+)*$", max_length=200)]
Duration = Annotated[
    int | Annotated[str, StringConstraints(pattern=r"^[0-9]{1,9}[smhd]?$")],
    Field(description="Seconds, or a number with a unit s, m, h or d (swanctl style: 30s, 5m, 4h, 1d)."),
]
Count = Annotated[int, Field(ge=0, le=2**62)]
IkeId = Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=r"^[^\x00-\x1f\x7f]+$")]


class Strict(BaseModel):
    # strict: JSON true is not the integer 1, "5" is not 5 (a client that sends them has a bug)
    model_config = ConfigDict(extra="forbid", strict=True)


class AuthRound(Strict):
    """One authentication round (swanctl `local` / `remote`)."""

    auth: Literal["psk", "pubkey"] = "psk"
    id: IkeId | None = Field(None, description="IKE identity (e.g. gw.example.com, fqdn:..., email:..., a DN).")
    certs: list[ObjectRef] = Field(default_factory=list, max_length=8, description="Certificate ids (local).")
    cacerts: list[ObjectRef] = Field(default_factory=list, max_length=16, description="Trusted CA ids (remote).")
    rsa_pss: bool = False


class Retransmit(Strict):
    timeout: Duration = 4
    base: float = Field(1.8, ge=1.0, le=10.0)
    tries: int = Field(5, ge=0, le=20)


class ChildBody(Strict):
    """A CHILD_SA (swanctl `children.<name>`)."""

    local_ts: list[Selector] = Field(default_factory=lambda: ["dynamic"], min_length=1, max_length=64)
    remote_ts: list[Selector] = Field(default_factory=lambda: ["dynamic"], min_length=1, max_length=64)
    esp_proposals: list[Proposal] = Field(default_factory=list, max_length=16)
    mode: Literal["tunnel", "transport"] = "tunnel"
    rekey_time: Duration | None = None
    life_time: Duration | None = None
    rand_time: Duration | None = None
    rekey_bytes: Count = 0
    life_bytes: Count = 0
    rekey_packets: Count = 0
    life_packets: Count = 0
    start_action: Literal["none", "start", "trap"] = "none"
    dpd_action: Literal["clear", "trap", "restart"] = "clear"
    close_action: Literal["none", "trap", "start"] = "none"
    replay_window: int = Field(32, ge=0, le=65535)


class ConnectionFields(Strict):
    version: Literal[2] = 2
    local_addrs: list[Address] = Field(default_factory=list, max_length=16)
    remote_addrs: list[Address] = Field(default_factory=list, max_length=16)
    local_port: int = Field(500, ge=1, le=65535)
    remote_port: int = Field(500, ge=1, le=65535)
    local: AuthRound = Field(default_factory=AuthRound)
    remote: AuthRound = Field(default_factory=AuthRound)
    proposals: list[Proposal] = Field(default_factory=list, max_length=16)
    dpd_delay: Duration | None = None
    dpd_timeout: Duration | None = None
    rekey_time: Duration | None = None
    reauth_time: Duration | None = None
    over_time: Duration | None = None
    rand_time: Duration | None = None
    encap: bool = False
    fragmentation: bool = True
    fragment_size: int = Field(1280, ge=576, le=65535)
    pools: list[ObjectRef] = Field(default_factory=list, max_length=8)
    vips: list[IpAddress] = Field(default_factory=list, max_length=4)
    send_certreq: bool = True
    send_cert: Literal["always", "ifasked", "never"] = "ifasked"
    unique: Literal["no", "never", "replace", "keep"] = "no"
    keyingtries: int = Field(1, ge=0, le=1000)
    retransmit: Retransmit | None = None
    access_narrowing: Literal["exact", "networks"] = Field(
        "exact",
        description="How the responder narrows the Child SAs of a peer the access policy governs: to the"
        " granted hosts, protocols and ports (exact), or address-only to the networks of the sites holding them"
        " (networks; the dataplane's per-identity filter stays exact).",
    )
    unbound_peers: Literal["deny", "negotiated"] | None = Field(
        None,
        description="What an authenticated peer whose identity binds to no policy identity gets: nothing (deny)"
        " or its negotiated selectors (negotiated). Default: deny with pools (remote access), else negotiated.",
    )
    children: dict[Annotated[str, StringConstraints(pattern=NAME_PATTERN)], ChildBody] = Field(
        default_factory=dict, max_length=64
    )


class ConnectionBody(ConnectionFields):
    """A connection as written (PUT /connections/{name})."""

    psk: SecretStr | None = Field(
        None,
        min_length=8,
        max_length=256,
        description="Pre-shared key (write-only). Omitted on a replace: the stored key is kept.",
        json_schema_extra={"writeOnly": True},
    )


class ConnectionCreate(ConnectionBody):
    """A connection as created (POST /connections)."""

    name: Name


class SecretState(BaseModel):
    set: bool = Field(description="Whether a secret is stored (it is never returned).")


class ConnectionView(ConnectionFields):
    model_config = ConfigDict(extra="forbid")

    name: str
    psk: SecretState
    revision: int = Field(description="Store revision; also the ETag.")


def stored_document(body: ConnectionFields) -> dict[str, Any]:
    """The document without secrets (the caller adds the sealed psk)."""
    return body.model_dump(mode="json", exclude={"psk", "name"}, exclude_none=True)


def view_of(name: str, document: dict[str, Any], revision: int) -> dict[str, Any]:
    public = {k: v for k, v in document.items() if k != "psk"}
    return {**public, "name": name, "psk": {"set": bool(document.get("psk"))}, "revision": revision}
