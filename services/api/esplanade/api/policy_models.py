"""Policy objects as the REST API shows them (the policy service validates their meaning).

Shapes follow `esplanade.policy.decode` (the store documents); see docs/policy.md.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
ObjectId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
Description = Annotated[str, StringConstraints(max_length=1024)]
Network = Annotated[str, StringConstraints(min_length=2, max_length=49, pattern=r"^[0-9A-Fa-f.:]+(/[0-9]{1,3})?$")]
PortSpec = (
    Annotated[int, Field(ge=0, le=65535)] | Annotated[str, StringConstraints(pattern=r"^[0-9]{1,5}(-[0-9]{1,5})?$")]
)
IcmpSpec = (
    Annotated[int, Field(ge=0, le=255)] | Annotated[str, StringConstraints(pattern=r"^[0-9]{1,3}(/[0-9]{1,3})?$")]
)
Tag = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")]


class Strict(BaseModel):
    # strict: JSON true is not the integer 1, "5" is not 5 (a client that sends them has a bug)
    model_config = ConfigDict(extra="forbid", strict=True)


class IdentityFields(Strict):
    kind: Literal["user", "device"] = "user"
    ike_ids: list[Annotated[str, StringConstraints(min_length=3, max_length=255)]] = Field(
        default_factory=list, max_length=32, description="IKE identities: fqdn:..., email:..., ip:..., dn:..."
    )
    groups: list[ObjectId] = Field(default_factory=list, max_length=256)
    description: Description = ""


class GroupFields(Strict):
    description: Description = ""


class SiteFields(Strict):
    networks: list[Network] = Field(default_factory=list, max_length=256)
    description: Description = ""


class ResourceFields(Strict):
    destination: Annotated[str, StringConstraints(min_length=1, max_length=253, pattern=r"^[0-9A-Za-z.:/-]+$")] = Field(
        description="Host address, CIDR or DNS name."
    )
    protocol: Literal["tcp", "udp", "icmp", "any"] = "any"
    ports: list[PortSpec] = Field(default_factory=list, max_length=64)
    icmp_types: list[IcmpSpec] = Field(default_factory=list, max_length=64)
    site: ObjectId
    description: Description = ""


class TimeWindowFields(Strict):
    days: list[
        Annotated[str, StringConstraints(pattern=r"^(mon|tue|wed|thu|fri|sat|sun)(-(mon|tue|wed|thu|fri|sat|sun))?$")]
    ] = Field(min_length=1, max_length=7)
    start: Annotated[str, StringConstraints(pattern=r"^[0-2][0-9]:[0-5][0-9]$")]
    end: Annotated[str, StringConstraints(pattern=r"^[0-2][0-9]:[0-5][0-9]$")]
    timezone: Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_+/-]+$")]


class ConditionFields(Strict):
    time_window: TimeWindowFields | None = None
    source_networks: list[Network] = Field(default_factory=list, max_length=64)
    posture: list[Tag] = Field(default_factory=list, max_length=32)


class RuleFields(Strict):
    groups: list[ObjectId] = Field(min_length=1, max_length=64)
    resources: list[ObjectId] = Field(min_length=1, max_length=256)
    conditions: ConditionFields | None = None
    description: Description = ""


class WithId(BaseModel):
    id: ObjectId


class WithRevision(BaseModel):
    id: str
    revision: int = Field(description="Store revision; also the ETag.")


class IdentityCreate(IdentityFields, WithId):
    pass


class GroupCreate(GroupFields, WithId):
    pass


class SiteCreate(SiteFields, WithId):
    pass


class ResourceCreate(ResourceFields, WithId):
    pass


class RuleCreate(RuleFields, WithId):
    pass


class IdentityView(WithRevision):
    kind: str
    ike_ids: list[str]
    groups: list[str]
    description: str = ""


class GroupView(WithRevision):
    description: str = ""


class SiteView(WithRevision):
    networks: list[str]
    description: str = ""


class ResourceView(WithRevision):
    destination: str
    protocol: str
    ports: list[int | str] = Field(default_factory=list)
    icmp_types: list[int | str] = Field(default_factory=list)
    site: str
    description: str = ""


class RuleView(WithRevision):
    groups: list[str]
    resources: list[str]
    conditions: dict[str, Any] | None = None
    description: str = ""


KIND_MODELS: dict[str, tuple[type[BaseModel], type[BaseModel], type[BaseModel]]] = {
    # kind: (fields body for PUT, create body for POST, view)
    "identities": (IdentityFields, IdentityCreate, IdentityView),
    "groups": (GroupFields, GroupCreate, GroupView),
    "sites": (SiteFields, SiteCreate, SiteView),
    "resources": (ResourceFields, ResourceCreate, ResourceView),
    "rules": (RuleFields, RuleCreate, RuleView),
}
SINGULAR = {"identities": "identity", "groups": "group", "sites": "site", "resources": "resource", "rules": "rule"}


class PolicyApplyBody(Strict):
    policy: Annotated[str, StringConstraints(max_length=4 << 20)] = Field(description="The policy file (YAML).")
    dry_run: bool = False


class FieldChangeView(BaseModel):
    field: str
    old: Any = None
    new: Any = None


class PolicyChangeView(BaseModel):
    action: Literal["create", "update", "delete"]
    kind: str
    id: str
    detail: str
    fields: list[FieldChangeView]


class PolicyApplyResult(BaseModel):
    applied: bool
    revision: int
    changes: list[PolicyChangeView]
    affected_identities: list[str]


class FlowFields(Strict):
    src: Annotated[str, StringConstraints(min_length=2, max_length=45, pattern=r"^[0-9A-Fa-f.:]+$")]
    dst: Annotated[str, StringConstraints(min_length=2, max_length=45, pattern=r"^[0-9A-Fa-f.:]+$")]
    protocol: Annotated[int, Field(ge=0, le=255)] | Literal["tcp", "udp", "icmp", "icmpv6"] = "tcp"
    src_port: int = Field(0, ge=0, le=65535)
    dst_port: int = Field(0, ge=0, le=65535, description="For ICMP: type << 8 | code.")


class CheckBody(Strict):
    identity: ObjectId
    flow: FlowFields
    source_address: Annotated[str, StringConstraints(max_length=45, pattern=r"^([0-9A-Fa-f.:]{2,45})?$")] = ""
    posture: list[Tag] = Field(default_factory=list, max_length=32)
    time: float = Field(0.0, ge=0, le=1e11, description="POSIX seconds; 0: now.")


class DecisionView(BaseModel):
    allow: bool
    rule: str
    reason: str


class WhatIfBody(CheckBody):
    policy: Annotated[str, StringConstraints(max_length=4 << 20)] = Field(description="The desired policy file (YAML).")


class WhatIfView(BaseModel):
    current: DecisionView
    desired: DecisionView
    changed: bool


class CompiledView(BaseModel):
    identity: str
    selectors: list[str]
    routes: list[str]
    document: dict[str, Any]
    revision: int
