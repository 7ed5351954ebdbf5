"""Connection configuration, modelled on swanctl.conf (`connections.<name>`).

`ConnectionConfig.from_dict` takes the swanctl-like structure (as YAML/JSON would give it)
and raises `ConfigError` naming the offending field. Durations accept ``30s``, ``5m``,
``4h``, ``1d`` or plain seconds.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from esplanade.ipsec.selectors import TrafficSelector
from esplanade.ipsec.transforms import Mode, ProtocolId
from esplanade.keyexchange.ikev2.auth.identity import Identity
from esplanade.keyexchange.ikev2.errors import ConfigError
from esplanade.keyexchange.ikev2.proposals import ProposalSpec, ProposalSyntaxError

AuthKind = Literal["psk", "pubkey"]
StartAction = Literal["none", "start", "trap"]
DpdAction = Literal["clear", "trap", "restart"]
CloseAction = Literal["none", "trap", "start"]

DEFAULT_IKE_PROPOSALS = ("aes256gcm16-prfsha256-ecp256", "aes256-sha256-modp2048")
DEFAULT_ESP_PROPOSALS = ("aes256gcm16", "aes128gcm16")


def parse_duration(value: object, field_name: str) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0:
            raise ConfigError(field_name, "must not be negative")
        return float(value)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(field_name, f"not a duration: {value!r}")
    text = value.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    mult = units.get(text[-1])
    num = text[:-1] if mult else text
    try:
        n = float(num)
    except ValueError:
        raise ConfigError(field_name, f"not a duration: {value!r}") from None
    if n < 0:
        raise ConfigError(field_name, "must not be negative")
    return n * (mult or 1)


@dataclass(frozen=True, slots=True)
class RetransmitConfig:
    """strongSwan's retransmit_timeout / retransmit_base / retransmit_tries."""

    timeout: float = 4.0
    base: float = 1.8
    tries: int = 5

    def delay(self, attempt: int) -> float:
        return float(self.timeout * self.base**attempt)


@dataclass(frozen=True, slots=True)
class AuthConfig:
    auth: AuthKind = "psk"
    id: Identity = field(default_factory=lambda: Identity.parse("%any"))
    certs: tuple[x509.Certificate, ...] = ()  # end-entity first, then intermediates
    private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | None = field(default=None, repr=False)
    rsa_pss: bool = False


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """A virtual IP pool (swanctl `pools.<name>`): addresses, DNS servers, split-tunnel subnets."""

    name: str
    addrs: ipaddress.IPv4Network | ipaddress.IPv6Network
    dns: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = ()
    subnets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


@dataclass(frozen=True, slots=True)
class ChildConfig:
    name: str
    local_ts: tuple[TrafficSelector, ...] = (TrafficSelector.any(),)
    remote_ts: tuple[TrafficSelector, ...] = (TrafficSelector.any(),)
    esp_proposals: tuple[ProposalSpec, ...] = ()
    mode: Mode = Mode.TUNNEL
    rekey_time: float = 3600.0
    life_time: float = 3960.0
    rand_time: float = 360.0
    rekey_bytes: int = 0
    life_bytes: int = 0
    rekey_packets: int = 0
    life_packets: int = 0
    start_action: StartAction = "none"
    dpd_action: DpdAction = "clear"
    close_action: CloseAction = "none"
    replay_window: int = 32
    ah_proposals: tuple[ProposalSpec, ...] = ()  # AH instead of ESP (integrity only, RFC 4302)
    if_id_in: int = 0  # XFRM interface id of the inbound SA and policies (route-based VPN)
    if_id_out: int = 0

    @property
    def proposals(self) -> tuple[ProposalSpec, ...]:
        """What this child offers and accepts: its AH proposals if it has any, else ESP."""
        return self.ah_proposals or self.esp_proposals

    @property
    def pfs_group(self) -> int:
        for p in self.proposals:
            if p.ke:
                return int(p.ke[0])
        return 0


@dataclass(frozen=True, slots=True)
class ConnectionConfig:
    name: str
    local_addrs: tuple[str, ...] = ()
    remote_addrs: tuple[str, ...] = ()
    local_port: int = 500
    remote_port: int = 500
    local: AuthConfig = field(default_factory=AuthConfig)
    remote: AuthConfig = field(default_factory=AuthConfig)
    psk: bytes = field(default=b"", repr=False)
    cacerts: tuple[x509.Certificate, ...] = ()
    crls: tuple[x509.CertificateRevocationList, ...] = ()
    proposals: tuple[ProposalSpec, ...] = ()
    version: int = 2
    dpd_delay: float = 0.0
    dpd_timeout: float = 0.0  # IKEv2 uses retransmission to declare a peer dead
    rekey_time: float = 14400.0
    reauth_time: float = 0.0
    over_time: float = 1440.0
    rand_time: float = 1440.0
    encap: bool = False
    fragmentation: bool = True
    fragment_size: int = 1280
    keepalive_interval: float = 20.0
    pools: tuple[PoolConfig, ...] = ()
    vips: tuple[str, ...] = ()  # "0.0.0.0" / "::" request any address from the responder's pool
    send_certreq: bool = True
    send_cert: Literal["always", "ifasked", "never"] = "ifasked"
    children: tuple[ChildConfig, ...] = ()
    retransmit: RetransmitConfig = field(default_factory=RetransmitConfig)
    unique: Literal["no", "never", "replace", "keep"] = "no"
    # How a responder narrows the Child SAs of a peer governed by the access policy: to the exact
    # hosts/protocols/ports granted, or address-only to the site networks holding them (the
    # dataplane's per-identity filter stays exact either way). Ignored for ungoverned peers.
    access_narrowing: Literal["exact", "networks"] = "exact"
    # What a responder grants an authenticated peer whose IKE identity binds to no policy identity:
    # nothing ("deny": every Child SA refused) or what it negotiates within the connection's
    # selectors ("negotiated": site-to-site). From a connection document the default is "deny"
    # for a connection that hands out virtual IPs from pools (remote access), else "negotiated".
    unbound_peers: Literal["deny", "negotiated"] = "negotiated"

    def child(self, name: str) -> ChildConfig:
        for c in self.children:
            if c.name == name:
                return c
        raise KeyError(f"connection {self.name} has no child {name!r}")

    @property
    def uses_additional_ke(self) -> bool:
        return any(p.has_additional_ke for p in self.proposals)

    # -- swanctl-like dictionaries -----------------------------------------------------
    @classmethod
    def from_dict(
        cls,
        name: str,
        d: Mapping[str, Any],
        *,
        secrets: Mapping[str, bytes] | None = None,
        pools: Mapping[str, PoolConfig] | None = None,
    ) -> ConnectionConfig:
        f = f"connections.{name}"
        known = {
            "version", "local_addrs", "remote_addrs", "local_port", "remote_port", "local", "remote",
            "proposals", "dpd_delay", "dpd_timeout", "rekey_time", "reauth_time", "over_time", "rand_time",
            "encap", "fragmentation", "fragment_size", "pools", "vips", "children", "send_certreq", "send_cert",
            "cacerts", "crls", "keyingtries", "unique", "mobike", "retransmit", "psk", "access_narrowing",
            "unbound_peers",
        }  # fmt: skip
        for key in d:
            if key not in known:
                raise ConfigError(f"{f}.{key}", "unknown setting")
        version = int(d.get("version", 2))
        if version != 2:
            raise ConfigError(f"{f}.version", "only IKEv2 (2) is supported")
        if d.get("mobike") not in (None, False, "no"):
            raise ConfigError(f"{f}.mobike", "MOBIKE is not supported")
        try:
            proposals = tuple(
                ProposalSpec.parse(p, ProtocolId.IKE) for p in _list(d.get("proposals", DEFAULT_IKE_PROPOSALS))
            )
        except ProposalSyntaxError as exc:
            raise ConfigError(f"{f}.proposals", str(exc)) from None
        if not proposals:
            raise ConfigError(f"{f}.proposals", "no proposals")
        proposals = _with_classic_fallback(proposals)
        rekey_time = parse_duration(d.get("rekey_time", "4h"), f"{f}.rekey_time")
        over_time = parse_duration(d.get("over_time", rekey_time * 0.1), f"{f}.over_time")
        rand_time = parse_duration(d.get("rand_time", over_time), f"{f}.rand_time")
        if rand_time > rekey_time and rekey_time:
            raise ConfigError(f"{f}.rand_time", "must not exceed rekey_time")
        local_addrs = tuple(_list(d.get("local_addrs", ())))
        remote_addrs = tuple(_list(d.get("remote_addrs", ())))
        for i, a in enumerate(local_addrs + remote_addrs):
            if a in ("%any", "0.0.0.0", "::"):
                continue
            try:
                ipaddress.ip_address(a)
            except ValueError:
                which = "local_addrs" if i < len(local_addrs) else "remote_addrs"
                raise ConfigError(f"{f}.{which}", f"{a!r} is not an IP address") from None
        local = _auth(d.get("local", {}), f"{f}.local", local=True)
        remote = _auth(d.get("remote", {}), f"{f}.remote", local=False)
        psk = b""
        if "psk" in d:
            psk = d["psk"].encode() if isinstance(d["psk"], str) else bytes(d["psk"])
        elif secrets is not None and "psk" in (local.auth, remote.auth):
            psk = secrets.get(str(remote.id), secrets.get(str(local.id), b""))
        if "psk" in (local.auth, remote.auth) and not psk:
            raise ConfigError(f"{f}.psk", "psk authentication without a shared secret")
        pool_objs: list[PoolConfig] = []
        for pname in _list(d.get("pools", ())):
            if pools is None or pname not in pools:
                raise ConfigError(f"{f}.pools", f"unknown pool {pname!r}")
            pool_objs.append(pools[pname])
        children_d = d.get("children", {})
        if not isinstance(children_d, Mapping):
            raise ConfigError(f"{f}.children", "must be a mapping of child names")
        children = tuple(_child(cname, cd, f"{f}.children.{cname}") for cname, cd in children_d.items())
        send_cert = d.get("send_cert", "ifasked")
        if send_cert not in ("always", "ifasked", "never"):
            raise ConfigError(f"{f}.send_cert", "must be always, ifasked or never")
        unique = d.get("unique", "no")
        if unique not in ("no", "never", "replace", "keep"):
            raise ConfigError(f"{f}.unique", "must be no, never, replace or keep")
        access_narrowing = d.get("access_narrowing", "exact")
        if access_narrowing not in ("exact", "networks"):
            raise ConfigError(f"{f}.access_narrowing", "must be exact or networks")
        unbound_peers = d.get("unbound_peers", "deny" if pool_objs else "negotiated")
        if unbound_peers not in ("deny", "negotiated"):
            raise ConfigError(f"{f}.unbound_peers", "must be deny or negotiated")
        fragment_size = int(d.get("fragment_size", 1280))
        if not 576 <= fragment_size <= 65535:
            raise ConfigError(f"{f}.fragment_size", "must be between 576 and 65535")
        try:
            cacerts = tuple(_load_certs(c) for c in _list_objs(d.get("cacerts", ())))
        except ValueError as exc:
            raise ConfigError(f"{f}.cacerts", str(exc)) from None
        retransmit = RetransmitConfig()
        if "retransmit" in d:
            r = d["retransmit"]
            retransmit = RetransmitConfig(
                parse_duration(r.get("timeout", 4.0), f"{f}.retransmit.timeout"),
                float(r.get("base", 1.8)),
                int(r.get("tries", 5)),
            )
        return cls(
            name=name,
            local_addrs=local_addrs,
            remote_addrs=remote_addrs,
            local_port=int(d.get("local_port", 500)),
            remote_port=int(d.get("remote_port", 500)),
            local=local,
            remote=remote,
            psk=psk,
            cacerts=cacerts,
            crls=tuple(d.get("crls", ())),
            proposals=proposals,
            dpd_delay=parse_duration(d.get("dpd_delay", 0), f"{f}.dpd_delay"),
            dpd_timeout=parse_duration(d.get("dpd_timeout", 0), f"{f}.dpd_timeout"),
            rekey_time=rekey_time,
            reauth_time=parse_duration(d.get("reauth_time", 0), f"{f}.reauth_time"),
            over_time=over_time,
            rand_time=rand_time,
            encap=_bool(d.get("encap", False), f"{f}.encap"),
            fragmentation=_bool(d.get("fragmentation", True), f"{f}.fragmentation"),
            fragment_size=fragment_size,
            pools=tuple(pool_objs),
            vips=tuple(_list(d.get("vips", ()))),
            send_certreq=_bool(d.get("send_certreq", True), f"{f}.send_certreq"),
            send_cert=send_cert,
            children=children,
            retransmit=retransmit,
            unique=unique,
            access_narrowing=access_narrowing,
            unbound_peers=unbound_peers,
        )


def _with_classic_fallback(proposals: tuple[ProposalSpec, ...]) -> tuple[ProposalSpec, ...]:
    """A proposal with additional key exchanges is followed by the same proposal without them.

    strongSwan 5.9.8 rejects every proposal that carries a transform type it does not know
    (ADDKE1..7), so a PQ-enabled initiator must also offer a classic proposal to fall back to.
    """
    out: list[ProposalSpec] = []
    for p in proposals:
        out.append(p)
    for p in proposals:
        if p.has_additional_ke:
            classic = ProposalSpec(p.protocol, p.encr, p.integ, p.prf, p.ke, (), p.esn)
            if classic not in out:
                out.append(classic)
    return tuple(out)


def _list(v: object) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [x.strip() for x in v.split(",") if x.strip()]
    if isinstance(v, Sequence):
        return [str(x) for x in v]
    raise ValueError(f"not a list: {v!r}")


def _bool(v: object, field_name: str) -> bool:
    if isinstance(v, bool):
        return v
    if v in ("yes", "true", "1", 1):
        return True
    if v in ("no", "false", "0", 0):
        return False
    raise ConfigError(field_name, f"not a boolean: {v!r}")


def _load_certs(v: object) -> x509.Certificate:
    if isinstance(v, x509.Certificate):
        return v
    if isinstance(v, bytes):
        return x509.load_pem_x509_certificate(v) if v.startswith(b"-----") else x509.load_der_x509_certificate(v)
    raise ValueError(f"not a certificate: {type(v).__name__}")


def _auth(d: Mapping[str, Any], f: str, local: bool) -> AuthConfig:
    auth = d.get("auth", "psk")
    if auth not in ("psk", "pubkey"):
        raise ConfigError(f"{f}.auth", f"unsupported auth {auth!r} (psk or pubkey)")
    try:
        ident = Identity.parse(str(d.get("id", "%any")))
    except ValueError as exc:
        raise ConfigError(f"{f}.id", str(exc)) from None
    try:
        certs = tuple(_load_certs(c) for c in _list_objs(d.get("certs", ())))
    except ValueError as exc:
        raise ConfigError(f"{f}.certs", str(exc)) from None
    key = d.get("private_key")
    if isinstance(key, bytes):
        try:
            key = serialization.load_pem_private_key(key, None)
        except (ValueError, TypeError):
            raise ConfigError(f"{f}.private_key", "cannot load the private key") from None
    if key is not None and not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{f}.private_key", "only RSA and ECDSA keys are supported")
    if local and auth == "pubkey":
        if not certs:
            raise ConfigError(f"{f}.certs", "pubkey authentication needs a certificate")
        if key is None:
            raise ConfigError(f"{f}.private_key", "pubkey authentication needs the private key")
        if ident.is_any:
            from esplanade.keyexchange.ikev2.auth.identity import identity_of_certificate

            ident = identity_of_certificate(certs[0])
        elif not ident.matches_certificate(certs[0]):
            raise ConfigError(f"{f}.id", f"identity {ident} is not in the certificate")
    if local and ident.is_any:
        raise ConfigError(f"{f}.id", "the local identity must be set")
    return AuthConfig(auth, ident, certs, key, bool(d.get("rsa_pss", False)))


def _list_objs(v: object) -> list[object]:
    if v is None:
        return []
    if isinstance(v, list | tuple):
        return list(v)
    return [v]


def _child(name: str, d: Mapping[str, Any], f: str) -> ChildConfig:
    def ts(key: str) -> tuple[TrafficSelector, ...]:
        try:
            out = tuple(TrafficSelector.parse(t) for t in _list(d.get(key, "0.0.0.0/0")))
        except ValueError as exc:
            raise ConfigError(f"{f}.{key}", str(exc)) from None
        if not out:
            raise ConfigError(f"{f}.{key}", "no traffic selectors")
        return out

    try:
        esp = tuple(ProposalSpec.parse(p, ProtocolId.ESP) for p in _list(d.get("esp_proposals", DEFAULT_ESP_PROPOSALS)))
    except ProposalSyntaxError as exc:
        raise ConfigError(f"{f}.esp_proposals", str(exc)) from None
    if any(p.has_additional_ke for p in esp):
        esp = _with_classic_fallback(esp)
    try:
        ah = tuple(ProposalSpec.parse(p, ProtocolId.AH) for p in _list(d.get("ah_proposals", ())))
    except ProposalSyntaxError as exc:
        raise ConfigError(f"{f}.ah_proposals", str(exc)) from None
    if ah and "esp_proposals" in d:
        raise ConfigError(f"{f}.ah_proposals", "AH and ESP together (an SA bundle) are not supported; choose one")
    if_ids = {}
    for key in ("if_id_in", "if_id_out"):
        try:
            if_ids[key] = int(d.get(key, 0))
        except (TypeError, ValueError):
            raise ConfigError(f"{f}.{key}", "must be an XFRM interface id (0..2^32-1)") from None
        if not 0 <= if_ids[key] <= 0xFFFFFFFF:
            raise ConfigError(f"{f}.{key}", "must be an XFRM interface id (0..2^32-1)")
    mode_s = d.get("mode", "tunnel")
    if mode_s not in ("tunnel", "transport"):
        raise ConfigError(f"{f}.mode", "must be tunnel or transport")
    rekey_time = parse_duration(d.get("rekey_time", "1h"), f"{f}.rekey_time")
    life_time = parse_duration(d.get("life_time", rekey_time * 1.1), f"{f}.life_time")
    if rekey_time and life_time and life_time <= rekey_time:
        raise ConfigError(f"{f}.life_time", "must exceed rekey_time")
    rand_time = parse_duration(d.get("rand_time", life_time - rekey_time), f"{f}.rand_time")
    if rekey_time and rand_time > rekey_time:
        raise ConfigError(f"{f}.rand_time", "must not exceed rekey_time")
    start = d.get("start_action", "none")
    if start not in ("none", "start", "trap"):
        raise ConfigError(f"{f}.start_action", "must be none, start or trap")
    dpd = d.get("dpd_action", "clear")
    if dpd not in ("clear", "trap", "restart"):
        raise ConfigError(f"{f}.dpd_action", "must be clear, trap or restart")
    close = d.get("close_action", "none")
    if close not in ("none", "trap", "start"):
        raise ConfigError(f"{f}.close_action", "must be none, trap or start")
    rb, lb = int(d.get("rekey_bytes", 0)), int(d.get("life_bytes", 0))
    rp, lp = int(d.get("rekey_packets", 0)), int(d.get("life_packets", 0))
    if rb and lb and lb <= rb:
        raise ConfigError(f"{f}.life_bytes", "must exceed rekey_bytes")
    if rp and lp and lp <= rp:
        raise ConfigError(f"{f}.life_packets", "must exceed rekey_packets")
    return ChildConfig(
        name=name,
        local_ts=ts("local_ts"),
        remote_ts=ts("remote_ts"),
        esp_proposals=esp,
        mode=Mode.TUNNEL if mode_s == "tunnel" else Mode.TRANSPORT,
        rekey_time=rekey_time,
        life_time=life_time,
        rand_time=rand_time,
        rekey_bytes=rb,
        life_bytes=lb,
        rekey_packets=rp,
        life_packets=lp,
        start_action=start,
        dpd_action=dpd,
        close_action=close,
        ah_proposals=ah,
        if_id_in=if_ids["if_id_in"],
        if_id_out=if_ids["if_id_out"],
    )
