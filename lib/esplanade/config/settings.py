"""Every setting of every service, in one documented place.

Sources, highest priority first: environment variables (``ESPLANADE_`` prefix, ``__`` between
levels, e.g. ``ESPLANADE_STORE__BACKEND=etcd``), then the YAML config file named by
``--config`` or ``ESPLANADE_CONFIG``, then the defaults below. Unknown keys, in the file or
in ``ESPLANADE_*`` variables, are errors: a typo must not silently fall back to a default.
``docs/configuration.md`` is generated from these models (`esplanade config docs`).
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "ESPLANADE_"
ENV_NESTED = "__"


def _check_host_port(value: str) -> str:
    if value.startswith("unix:"):  # a gRPC Unix-socket address, unix:/absolute/path (tests, sidecars)
        if not value[5:].startswith("/") or len(value) < 7:
            raise ValueError(f"{value!r} is not unix:/absolute/path")
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not host:port")
    host = host.strip("[]")
    if not host.replace("-", "").replace(".", "").isalnum():
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{value!r} has an invalid host") from None
    return value


def _check_ip(value: str) -> str:
    ipaddress.ip_address(value)
    return value


def _check_network(value: str) -> str:
    ipaddress.ip_network(value)  # an address, or a network with no host bits set
    return value


def _check_interface(value: str) -> str:
    """A Linux interface name as nftables' `iifname` takes it: 1-15 characters, no quoting needed."""
    if not 0 < len(value) <= 15 or not all(c.isalnum() or c in "-_.@:" for c in value) or not value.isascii():
        raise ValueError(f"{value!r} is not an interface name (1-15 of A-Za-z0-9 - _ . @ :)")
    return value


HostPort = Annotated[str, AfterValidator(_check_host_port)]
IpAddress = Annotated[str, AfterValidator(_check_ip)]
IpNetwork = Annotated[str, AfterValidator(_check_network)]
InterfaceName = Annotated[str, AfterValidator(_check_interface)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsSettings(Section):
    """mTLS between services: every server presents `cert_file` and demands a client
    certificate signed by `ca_file`; every client does the same."""

    enabled: bool = Field(False, description="Use mTLS for gRPC between services.")
    ca_file: Path | None = Field(None, description="PEM CA bundle that signs peer certificates.")
    cert_file: Path | None = Field(None, description="PEM certificate of this service.")
    key_file: Path | None = Field(None, description="PEM private key of this service.")

    @model_validator(mode="after")
    def _complete(self) -> TlsSettings:
        if self.enabled:
            for name in ("ca_file", "cert_file", "key_file"):
                if getattr(self, name) is None:
                    raise ValueError(f"{name} is required when TLS is enabled")
        return self


class StoreSettings(Section):
    backend: Literal["embedded", "etcd"] = Field(
        "embedded", description="State store: `embedded` (SQLite, single node) or `etcd`."
    )
    path: Path = Field(Path("/var/lib/esplanade/store.db"), description="Database file of the embedded store.")
    etcd_endpoints: list[HostPort] = Field(
        default_factory=list, description="etcd client endpoints as host:port (backend `etcd`)."
    )
    etcd_tls: TlsSettings = Field(default_factory=TlsSettings, description="TLS client certificate for etcd.")
    timeout_seconds: float = Field(5.0, gt=0, description="Deadline of one store request.")

    @model_validator(mode="after")
    def _etcd_needs_endpoints(self) -> StoreSettings:
        if self.backend == "etcd" and not self.etcd_endpoints:
            raise ValueError("etcd_endpoints is required when backend is etcd")
        return self


class KekSettings(Section):
    """The key-encryption key ring that seals secrets in the store.

    The ring is text: one `key-id:base64(32 bytes)` per line, the first line being the
    active key. It comes from `ESPLANADE_KEK` (the ring itself) or from `file` (e.g. a
    Kubernetes Secret mounted as a file)."""

    file: Path | None = Field(None, description="File holding the KEK ring.")
    value: SecretStr | None = Field(None, description="The KEK ring itself (prefer `file`).")


class GrpcSettings(Section):
    deadline_seconds: float = Field(10.0, gt=0, description="Default deadline of every gRPC call.")
    tls: TlsSettings = Field(default_factory=TlsSettings, description="mTLS between services.")


class EndpointSettings(Section):
    """Where each service listens, and where the others find it."""

    keyexchange: HostPort = Field("127.0.0.1:50061", description="keyexchange gRPC address.")
    dataplane: HostPort = Field(
        "127.0.0.1:50062", description="dataplane gRPC address (host:port, or unix:/path for a Unix socket)."
    )
    policy: HostPort = Field("127.0.0.1:50063", description="policy gRPC address.")
    api: HostPort = Field("127.0.0.1:8080", description="REST API (HTTP) address.")
    metrics_port_offset: int = Field(
        1000, ge=0, description="Each gRPC service serves /metrics on its gRPC port plus this."
    )


class TelemetrySettings(Section):
    log_format: Literal["json", "text"] = Field("json", description="Log line format.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    otlp_endpoint: str | None = Field(
        None, description="OTLP/gRPC collector for traces, metrics and logs (off when unset)."
    )
    otlp_insecure: bool = Field(True, description="Talk to the OTLP collector without TLS.")


class DataplaneSettings(Section):
    node: str = Field("", description="Node name of this dataplane (default: the host name).")
    backend: Literal["auto", "userspace", "kernel"] = Field(
        "auto", description="`auto` picks the kernel when it has ESP and the algorithms."
    )
    hot_path: Literal["auto", "compiled", "python"] = Field(
        "auto", description="Userspace packet loop: the compiled batch loop or pure Python."
    )
    tun_name: str = Field("esp0", max_length=15, description="TUN device of the userspace backend.")
    workers: int = Field(0, ge=0, description="Userspace worker processes (0: one per core).")
    udp_port: int = Field(4500, gt=0, lt=65536, description="ESP-in-UDP and IKE NAT-T port (RFC 3948).")
    ike_port: int = Field(500, gt=0, lt=65536, description="IKE port the dataplane relays to keyexchange.")
    ike_relay_socket: str = Field(
        "auto",
        description="Unix socket of the IKE relay for a keyexchange on this host (cheaper than the gRPC"
        " stream, which stays for the others): `auto` = next to the embedded store file"
        " (`<store>.ike-<node>.sock`; none with etcd), empty = none, else the path.",
    )
    listen_addresses: list[IpAddress] = Field(
        default_factory=list, description="Addresses of the UDP 4500 socket (empty: all)."
    )
    plain_esp: bool = Field(True, description="Accept and send plain ESP (IP protocol 50).")
    sequence_block: int = Field(
        1 << 20,
        ge=1024,
        description="Outbound sequence numbers reserved in the store per block (a crash burns at most one).",
    )
    replay_block: int = Field(
        1 << 16,
        ge=64,
        description="Inbound replay floor persisted this far ahead of the highest accepted number"
        " (after a failover the new owner drops up to this many of the peer's packets).",
    )
    kernel_state_file: Path | None = Field(
        None,
        description="Kernel backend: where it lists the XFRM SAs and policies it installed, so that a"
        " restarted dataplane adopts or removes them. Keep it where it lives as long as the network"
        " namespace (tmpfs /run, a pod emptyDir). Default: /run/esplanade/dataplane-kernel-<node>.json.",
    )
    kernel_keep_on_stop: bool = Field(
        True,
        description="Kernel backend: leave the SAs and policies in the kernel when the service stops"
        " (traffic keeps flowing through a restart; the successor adopts them).",
    )
    path_mtu: int = Field(1500, ge=1280, le=65535, description="MTU of the outer path toward the peers.")
    realtime_priority: int = Field(
        0, ge=0, le=99, description="SCHED_FIFO priority of the userspace workers (0: normal scheduling)."
    )
    lease_seconds: int = Field(5, ge=1, description="Membership lease TTL (failover bound).")
    lease_margin_seconds: float = Field(
        0.5, ge=0, description="A lease counts as ours until last keepalive send time + TTL - this margin."
    )
    ownership: Literal["single", "rendezvous"] = Field(
        "single",
        description="`single`: this node carries every SA in the store; `rendezvous`: nodes sharing the store"
        " split the SAs by rendezvous hashing (owner records under each node's lease).",
    )
    steering_interface: str = Field(
        "", description="Scale-out: interface where the owner adds each tunnel's local address (empty: none)."
    )
    steering_inner: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Scale-out: tunnel address -> inner gateway addresses (`lan0=10.9.0.1/24`) that move with it.",
    )
    flow_log_path: Path = Field(
        Path("/var/lib/esplanade/flows.db"),
        description="Local flow log of this node, an append-only SQLite journal (never in the store).",
    )
    flow_log_retention_mb: int = Field(256, ge=1, description="Flow log size bound (oldest records go first).")
    flow_log_retention_days: float = Field(30.0, gt=0, description="Flow log records older than this go.")
    flow_log_export: str = Field(
        "", description="Also write each flow record as a JSON line here: a file path, `-` for stdout, empty: off."
    )
    flow_log_interval_seconds: float = Field(
        5.0, gt=0, description="How often SA counters are read into flows and ended flows are written."
    )
    flow_log_idle_timeout_seconds: float = Field(15.0, gt=0, description="A flow without traffic this long ends.")
    flow_log_active_timeout_seconds: float = Field(
        300.0, gt=0, description="A longer flow is written every this often (the next record continues it)."
    )
    flow_log_max_flows: int = Field(
        10000,
        ge=16,
        description="Flows tracked at once; past it, new flows fold into one aggregate record per identity,"
        " resource and decision (flood protection).",
    )


class KeyexchangeSettings(Section):
    instance: str = Field("", description="Instance name (default: the host name).")
    ike_port: int = Field(500, gt=0, lt=65536, description="UDP port of IKE_SA_INIT.")
    listen_addresses: list[IpAddress] = Field(
        default_factory=list, description="Addresses of the IKE sockets (empty: all)."
    )
    transport: Literal["relay", "socket"] = Field(
        "relay",
        description="IKE datagrams: `relay` through the dataplane, which owns UDP 500 and 4500, or"
        " `socket` (keyexchange binds both itself; single host without a dataplane on those ports).",
    )
    cookie_threshold: int = Field(
        10, ge=0, description="Half-open IKE SAs before COOKIEs are demanded (RFC 7296 §2.6)."
    )
    lease_seconds: int = Field(5, ge=1, description="Membership lease TTL for IKE SA takeover.")
    share_ike_sas: bool = Field(
        False,
        description="Scale-out: persist every IKE SA after each completed exchange (`sas/ike/`), own it under"
        " this instance's lease (`keyexchange/owners/`) and take over those of instances that died.",
    )
    cookie_threshold_ip: int = Field(
        3, ge=0, description="Half-open IKE SAs from one address before COOKIEs are demanded of it (0: off)."
    )
    block_threshold: int = Field(
        5, ge=0, description="Half-open IKE SAs from one address beyond which its IKE_SA_INITs are dropped (0: off)."
    )
    install_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="How long an exchange waits for the dataplane's ack of a new inbound SA"
        " (dataplane/acks/) before it fails (IKE_AUTH: no IKE SA; CREATE_CHILD_SA: TEMPORARY_FAILURE).",
    )
    spi_pool: int = Field(
        256, ge=8, le=4096, description="Inbound SPIs reserved ahead in the store (spi/), so setups never wait for it."
    )
    counters_interval_seconds: float = Field(
        5.0,
        gt=0,
        description="How often Child SA counters are read from the dataplane (idle SAs get DPD, busy ones not).",
    )
    relay_backoff_max_seconds: float = Field(
        5.0, gt=0, description="Longest pause between reconnects of the IKE relay stream to a dataplane."
    )


class SiteSettings(Section):
    """What this host is in the zero-trust topology (read by the dataplane and keyexchange)."""

    inbound: Literal["open", "dial-out-only"] = Field(
        "open",
        description="`dial-out-only` (a connector): the dataplane installs and owns the nftables table"
        " `inet esplanade_dial_out` in its network namespace while it runs (input: loopback, replies"
        " to what this host sent, IPv6 neighbour discovery and `management_interfaces` accepted;"
        " every other inbound packet, IPv4 and IPv6, dropped), and keyexchange answers no"
        " IKE_SA_INIT (it only initiates). `open`: neither.",
    )
    management_interfaces: list[InterfaceName] = Field(
        default_factory=list,
        description="`dial-out-only`: interfaces where inbound connections are still accepted (the"
        " services' gRPC and metrics, SSH); empty: none.",
    )


class PolicySettings(Section):
    audit_log_path: Path = Field(
        Path("/var/lib/esplanade/policy-audit.db"),
        description="Audit journal of policy changes made through the policy service (never in the store).",
    )


class ApiSettings(Section):
    bootstrap_token_file: Path | None = Field(
        None, description="Read the bootstrap admin token from here instead of generating one."
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body accepted.")
    auth_failures_per_minute: int = Field(30, ge=1, description="Failed authentications per client address before 429.")
    audit_log_path: Path = Field(Path("/var/lib/esplanade/audit.jsonl"), description="Audit log (never in the store).")
    max_page_size: int = Field(1000, ge=1, description="Largest `limit` a list endpoint accepts.")
    events_keepalive_seconds: float = Field(
        15.0, gt=0, description="Idle interval after which the event stream (SSE) sends a keep-alive comment."
    )
    trusted_proxies: list[IpNetwork] = Field(
        ["127.0.0.1", "::1"],
        description="Addresses or networks of reverse proxies (an ingress controller) whose"
        " X-Forwarded-For and X-Forwarded-Proto are believed. The client address they give is"
        " what failed authentications are limited by and what audit records name; from any other"
        " peer the headers are ignored. Behind an ingress, list its pods' network, or every client"
        " shares the ingress's address and its failure limit.",
    )
    token_cache_seconds: float = Field(
        5.0,
        ge=0,
        description="How long a verified API token is trusted before the store is asked again"
        " (a token revoked or changed through any API replica leaves every replica's cache as soon"
        " as the store's watch delivers the change; 0 turns the cache off).",
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_NESTED, extra="forbid", frozen=True
    )

    store: StoreSettings = Field(default_factory=StoreSettings, description="State store.")
    kek: KekSettings = Field(default_factory=KekSettings, description="Key-encryption key.")
    grpc: GrpcSettings = Field(default_factory=GrpcSettings, description="gRPC between services.")
    endpoints: EndpointSettings = Field(default_factory=EndpointSettings, description="Addresses.")
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings, description="Telemetry.")
    dataplane: DataplaneSettings = Field(default_factory=DataplaneSettings, description="Dataplane.")
    keyexchange: KeyexchangeSettings = Field(default_factory=KeyexchangeSettings, description="keyexchange.")
    site: SiteSettings = Field(default_factory=SiteSettings, description="Zero-trust role of this host.")
    policy: PolicySettings = Field(default_factory=PolicySettings, description="Policy service.")
    api: ApiSettings = Field(default_factory=ApiSettings, description="REST API.")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives through init kwargs; environment variables override it.
        return (env_settings, init_settings)


CONFIG_ENV = "ESPLANADE_CONFIG"
# Variables with the prefix that are not settings (read by the launcher itself).
_NON_SETTING_ENV = {CONFIG_ENV}


def unknown_env_settings(environ: dict[str, str]) -> list[str]:
    """ESPLANADE_* variables that name no setting (pydantic-settings would ignore them)."""
    unknown = []
    for name in environ:
        if not name.startswith(ENV_PREFIX) or name in _NON_SETTING_ENV:
            continue
        path = name[len(ENV_PREFIX) :].lower().split(ENV_NESTED)
        model: Any = Settings
        for i, part in enumerate(path):
            fields = getattr(model, "model_fields", None)
            if fields is None or part not in fields:
                unknown.append(name)
                break
            annotation = fields[part].annotation
            if i + 1 < len(path):
                model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return unknown


def flatten_field_docs(model: type[BaseModel] = Settings, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, description) of every leaf setting, for docs/configuration.md."""
    rows: list[tuple[str, str, str]] = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        dotted = f"{prefix}{name}"
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(flatten_field_docs(annotation, dotted + "."))
            continue
        default = info.get_default(call_default_factory=True)
        shown = (
            "" if default is None else str(default.get_secret_value() if isinstance(default, SecretStr) else default)
        )
        rows.append((dotted, shown, info.description or ""))
    return rows


def default_config_path(environ: dict[str, str] | None = None) -> Path | None:
    value = (environ if environ is not None else dict(os.environ)).get(CONFIG_ENV)
    return Path(value) if value else None
