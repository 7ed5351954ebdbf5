"""gRPC messages <-> the IPsec vocabulary (`esplanade.ipsec`), with typed refusals.

Every refusal is an `InvalidArgument` whose message names the field and never carries key
bytes. SA directions come from the position in the Child SA (`inbound` / `outbound`); keys
travel only inward (requests), never in replies.
"""

from __future__ import annotations

import ipaddress
import time

from esplanade.dataplane.backend import DataplaneEvent, InvalidArgument, SaCounters
from esplanade.ipsec.sa import ChildSaRecord, Lifetime, SecurityAssociation, TfcPolicy, UdpEncap
from esplanade.ipsec.selectors import TrafficSelector
from esplanade.ipsec.spd import PolicyAction, PolicyDirection, SpdPolicy
from esplanade.ipsec.transforms import ENCR_ALGORITHMS, INTEG_ALGORITHMS, Direction, IpProto, Mode
from esplanade.v1 import dataplane_pb2, ipsec_pb2

MAX_ID_LENGTH = 200

_PROTOCOLS: dict[int, object] = {ipsec_pb2.IPSEC_PROTOCOL_ESP: IpProto.ESP, ipsec_pb2.IPSEC_PROTOCOL_AH: IpProto.AH}
_MODES: dict[int, object] = {ipsec_pb2.MODE_TUNNEL: Mode.TUNNEL, ipsec_pb2.MODE_TRANSPORT: Mode.TRANSPORT}
_ACTIONS: dict[int, object] = {
    ipsec_pb2.POLICY_ACTION_PROTECT: PolicyAction.PROTECT,
    ipsec_pb2.POLICY_ACTION_BYPASS: PolicyAction.BYPASS,
    ipsec_pb2.POLICY_ACTION_DISCARD: PolicyAction.DISCARD,
}
_POLICY_DIRECTIONS: dict[int, object] = {
    ipsec_pb2.DIRECTION_IN: PolicyDirection.IN,
    ipsec_pb2.DIRECTION_OUT: PolicyDirection.OUT,
    ipsec_pb2.DIRECTION_FWD: PolicyDirection.FWD,
}


def check_id(kind: str, value: str) -> str:
    """An id that can be a store key component: 1..200 characters, no '/', not '.' or '..'."""
    if not value or len(value) > MAX_ID_LENGTH or "/" in value or value in (".", "..") or not value.isprintable():
        raise InvalidArgument(f"{kind} id {value!r} must be 1-{MAX_ID_LENGTH} printable characters without '/'")
    return value


def _address(field: str, value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise InvalidArgument(f"{field}: {value!r} is not an IP address") from None


def _selector(field: str, message: ipsec_pb2.TrafficSelector) -> TrafficSelector:
    try:
        return TrafficSelector.parse(message.text)
    except ValueError as exc:
        raise InvalidArgument(f"{field}: {message.text!r} is not a traffic selector ({exc})") from None


def _enum(field: str, table: dict[int, object], value: int) -> object:
    if value not in table:
        raise InvalidArgument(f"{field}: unknown value {value}")
    return table[value]


def association_from_proto(sa: ipsec_pb2.SecurityAssociation, direction: Direction, field: str) -> SecurityAssociation:
    encr = None
    if sa.encr:
        encr = ENCR_ALGORITHMS.get(sa.encr)
        if encr is None:
            raise InvalidArgument(f"{field}.encr: unknown transform {sa.encr!r}; known: {', '.join(ENCR_ALGORITHMS)}")
    integ = None
    if sa.integ:
        integ = INTEG_ALGORITHMS.get(sa.integ)
        if integ is None:
            raise InvalidArgument(
                f"{field}.integ: unknown transform {sa.integ!r}; known: {', '.join(INTEG_ALGORITHMS)}"
            )
    lt = sa.lifetime
    try:
        association = SecurityAssociation(
            spi=sa.spi,
            direction=direction,
            src=_address(f"{field}.src", sa.src),
            dst=_address(f"{field}.dst", sa.dst),
            protocol=_enum(f"{field}.protocol", _PROTOCOLS, sa.protocol),  # type: ignore[arg-type]
            mode=_enum(f"{field}.mode", _MODES, sa.mode),  # type: ignore[arg-type]
            encr=encr,
            encr_key=bytes(sa.encr_key),
            integ=integ,
            integ_key=bytes(sa.integ_key),
            esn=sa.esn,
            replay_window=sa.replay_window,
            encap=UdpEncap(sa.encap.src_port, sa.encap.dst_port) if sa.HasField("encap") else None,
            lifetime=Lifetime(
                soft_bytes=lt.soft_bytes,
                hard_bytes=lt.hard_bytes,
                soft_packets=lt.soft_packets,
                hard_packets=lt.hard_packets,
                soft_seconds=lt.soft_seconds,
                hard_seconds=lt.hard_seconds,
            ),
            tfc=TfcPolicy(sa.tfc.pad_to, sa.tfc.dummy_interval_ms),
            local_ts=tuple(_selector(f"{field}.local_ts", t) for t in sa.local_ts),
            remote_ts=tuple(_selector(f"{field}.remote_ts", t) for t in sa.remote_ts),
            reqid=sa.reqid,
            if_id=sa.if_id,
            mark=sa.mark,
        )
    except TypeError as exc:  # cannot happen for well-typed protobufs; kept as a typed refusal
        raise InvalidArgument(f"{field}: {exc}") from None
    if association.encap is not None and not (
        0 < association.encap.src_port < 65536 and 0 < association.encap.dst_port < 65536
    ):
        raise InvalidArgument(f"{field}.encap: ports must be 1-65535")
    try:
        association.validate()
    except ValueError as exc:
        raise InvalidArgument(f"{field}: {exc}") from None
    return association


def child_sa_from_proto(message: ipsec_pb2.ChildSa, now: float | None = None) -> ChildSaRecord:
    check_id("Child SA", message.id)
    if not message.HasField("inbound") or not message.HasField("outbound"):
        raise InvalidArgument("a Child SA needs both an inbound and an outbound SA")
    record = ChildSaRecord(
        id=message.id,
        connection=message.connection,
        child=message.child,
        ike_sa=message.ike_sa,
        identity=message.identity,
        inbound=association_from_proto(message.inbound, Direction.IN, "inbound"),
        outbound=association_from_proto(message.outbound, Direction.OUT, "outbound"),
        created_at=message.created_at or (time.time() if now is None else now),
        rekey_of=message.rekey_of,
        governed_by=message.governed_by,
    )
    try:
        record.validate()
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None
    return record


def policy_from_proto(message: ipsec_pb2.SpdPolicy) -> SpdPolicy:
    check_id("policy", message.id)
    if not message.HasField("local_ts") or not message.HasField("remote_ts"):
        raise InvalidArgument("a policy needs local_ts and remote_ts")
    local = _selector("local_ts", message.local_ts)
    remote = _selector("remote_ts", message.remote_ts)
    if local.version != remote.version:
        raise InvalidArgument("local_ts and remote_ts mix IPv4 and IPv6")
    action = _enum("action", _ACTIONS, message.action)
    assert isinstance(action, PolicyAction)
    if action == PolicyAction.PROTECT and message.child_sa:
        check_id("Child SA", message.child_sa)
    for field in ("tunnel_src", "tunnel_dst"):
        value = getattr(message, field)
        if value:
            _address(field, value)
    return SpdPolicy(
        id=message.id,
        direction=_enum("direction", _POLICY_DIRECTIONS, message.direction),  # type: ignore[arg-type]
        local_ts=local,
        remote_ts=remote,
        action=action,
        priority=message.priority or 1000,
        child_sa=message.child_sa,
        connection=message.connection,
        protocol=_enum("protocol", _PROTOCOLS, message.protocol),  # type: ignore[arg-type]
        mode=_enum("mode", _MODES, message.mode),  # type: ignore[arg-type]
        tunnel_src=message.tunnel_src,
        tunnel_dst=message.tunnel_dst,
        reqid=message.reqid,
        trap=message.trap,
        if_id=message.if_id,
        mark=message.mark,
    )


def _reverse(table: dict[int, object], value: object) -> int:
    return next(k for k, v in table.items() if v == value)


def policy_to_proto(policy: SpdPolicy) -> ipsec_pb2.SpdPolicy:
    return ipsec_pb2.SpdPolicy(
        id=policy.id,
        direction=_reverse(_POLICY_DIRECTIONS, policy.direction),  # type: ignore[arg-type]
        local_ts=ipsec_pb2.TrafficSelector(text=str(policy.local_ts)),
        remote_ts=ipsec_pb2.TrafficSelector(text=str(policy.remote_ts)),
        action=_reverse(_ACTIONS, policy.action),  # type: ignore[arg-type]
        priority=policy.priority,
        child_sa=policy.child_sa,
        connection=policy.connection,
        protocol=_reverse(_PROTOCOLS, policy.protocol),  # type: ignore[arg-type]
        mode=_reverse(_MODES, policy.mode),  # type: ignore[arg-type]
        tunnel_src=policy.tunnel_src,
        tunnel_dst=policy.tunnel_dst,
        reqid=policy.reqid,
        trap=policy.trap,
        if_id=policy.if_id,
        mark=policy.mark,
    )


def association_to_proto(sa: SecurityAssociation) -> ipsec_pb2.SecurityAssociation:
    """The SA without its keys (for replies and logs)."""
    message = ipsec_pb2.SecurityAssociation(
        spi=sa.spi,
        direction=ipsec_pb2.DIRECTION_IN if sa.direction == Direction.IN else ipsec_pb2.DIRECTION_OUT,
        src=sa.src,
        dst=sa.dst,
        protocol=_reverse(_PROTOCOLS, sa.protocol),  # type: ignore[arg-type]
        mode=_reverse(_MODES, sa.mode),  # type: ignore[arg-type]
        encr=sa.encr.name if sa.encr else "",
        integ=sa.integ.name if sa.integ else "",
        esn=sa.esn,
        replay_window=sa.replay_window,
        local_ts=[ipsec_pb2.TrafficSelector(text=str(t)) for t in sa.local_ts],
        remote_ts=[ipsec_pb2.TrafficSelector(text=str(t)) for t in sa.remote_ts],
        reqid=sa.reqid,
        if_id=sa.if_id,
        mark=sa.mark,
    )
    if sa.encap is not None:
        message.encap.CopyFrom(ipsec_pb2.UdpEncap(src_port=sa.encap.src_port, dst_port=sa.encap.dst_port))
    return message


def child_sa_to_proto(record: ChildSaRecord, *, with_keys: bool = False) -> ipsec_pb2.ChildSa:
    """A Child SA as the API shows it; keys only when building a request (`with_keys`)."""
    message = ipsec_pb2.ChildSa(
        id=record.id,
        connection=record.connection,
        child=record.child,
        ike_sa=record.ike_sa,
        identity=record.identity,
        created_at=record.created_at,
        rekey_of=record.rekey_of,
        governed_by=record.governed_by,
    )
    for name, sa in (("inbound", record.inbound), ("outbound", record.outbound)):
        part = association_to_proto(sa)
        if with_keys:
            part.encr_key = sa.encr_key
            part.integ_key = sa.integ_key
            lt = sa.lifetime
            part.lifetime.CopyFrom(
                ipsec_pb2.Lifetime(
                    soft_bytes=lt.soft_bytes,
                    hard_bytes=lt.hard_bytes,
                    soft_packets=lt.soft_packets,
                    hard_packets=lt.hard_packets,
                    soft_seconds=lt.soft_seconds,
                    hard_seconds=lt.hard_seconds,
                )
            )
            part.tfc.CopyFrom(ipsec_pb2.TfcPolicy(pad_to=sa.tfc.pad_to, dummy_interval_ms=sa.tfc.dummy_interval_ms))
        getattr(message, name).CopyFrom(part)
    return message


def counters_to_proto(counters: SaCounters, child_sa: str, node: str) -> ipsec_pb2.SaCounters:
    return ipsec_pb2.SaCounters(
        child_sa=child_sa,
        spi=counters.spi,
        direction=ipsec_pb2.DIRECTION_IN if counters.direction == "in" else ipsec_pb2.DIRECTION_OUT,
        packets=counters.packets,
        bytes=counters.bytes,
        owner=node,
    )


def event_to_proto(event: DataplaneEvent, node: str, when: float) -> dataplane_pb2.DataplaneEvent:
    return dataplane_pb2.DataplaneEvent(
        time=when,
        kind=event.kind.value,
        child_sa=event.child_sa,
        spi=event.spi,
        policy=event.policy,
        reason=event.reason,
        node=node,
    )
