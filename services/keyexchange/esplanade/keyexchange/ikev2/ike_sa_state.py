"""An established IKE SA as a document, and back: how IKE SAs move between keyexchange instances.

`state_of(sa, now, wall)` captures an IKE SA at a quiescent point (no request of ours in
flight, nothing queued, no response held): everything needed to go on exactly where it was,
with the message IDs intact: the next request ID and the next expected peer ID, the last
response (for the peer's retransmissions), the keys (SK_d, SK_a*, SK_e*, SK_p*), the negotiated
suite, NAT and peer features, identities, virtual IPs and every Child SA with its keys.

Secrets are passed through `seal(field, bytes) -> str` and come back through
`open_(field, str) -> bytes` (the store's `SealedDocuments` binding; tests may use identity
functions), so the document itself never holds key bytes.

Times: monotonic deadlines are written as wall-clock instants and turned back into the
restoring process's monotonic clock.

The SK payload IV counter (AEAD) is a nonce: the restored SA continues `IV_COUNTER_SKIP`
above the persisted value, so messages the previous owner sent after its last persist (a
request in flight, a retransmission) can never share an IV with the new owner's.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from esplanade.ipsec.selectors import TrafficSelector
from esplanade.ipsec.transforms import Mode
from esplanade.keyexchange.config import ConnectionConfig
from esplanade.keyexchange.ikev2.access import AccessGrant
from esplanade.keyexchange.ikev2.auth.identity import Identity
from esplanade.keyexchange.ikev2.child_sa import ChildSa, ChildState
from esplanade.keyexchange.ikev2.crypto.keymat import ChildKeys, IkeKeys
from esplanade.keyexchange.ikev2.crypto.prf import PRFS
from esplanade.keyexchange.ikev2.events import Datagram
from esplanade.keyexchange.ikev2.payloads import Proposal, Transform
from esplanade.keyexchange.ikev2.proposals import Suite, match_proposal, spec_of_proposal

STATE_VERSION = 1
IV_COUNTER_SKIP = 1 << 16
IKE_KEY_FIELDS = ("sk_d", "sk_ai", "sk_ar", "sk_ei", "sk_er", "sk_pi", "sk_pr")
CHILD_KEY_FIELDS = ("encr_i", "integ_i", "encr_r", "integ_r")

Seal = Callable[[str, bytes], str]
Open = Callable[[str, str], bytes]


class StateError(ValueError):
    """The document does not describe a restorable IKE SA (never names key bytes)."""


class NotQuiescent(StateError):
    """The IKE SA has an exchange in progress; capture it after the exchange completes."""


# -- pieces ---------------------------------------------------------------------------------
def suite_document(suite: Suite) -> dict[str, Any]:
    proposal = suite.to_proposal()
    return {
        "protocol": int(proposal.protocol),
        "number": proposal.number,
        "spi": proposal.spi.hex(),
        "transforms": [[t.type, t.id, t.key_length] for t in proposal.transforms],
    }


def suite_from(document: dict[str, Any]) -> Suite:
    proposal = Proposal(
        int(document["number"]),
        int(document["protocol"]),
        bytes.fromhex(document["spi"]),
        tuple(Transform(int(t), int(i), None if k is None else int(k)) for t, i, k in document["transforms"]),
    )
    spec = spec_of_proposal(proposal)
    suite = match_proposal(proposal, spec) if spec is not None else None
    if suite is None:
        raise StateError("the stored suite is not a valid proposal")
    return suite


def _selector(ts: TrafficSelector) -> list[Any]:
    return [str(ts.start_addr), str(ts.end_addr), ts.protocol, ts.start_port, ts.end_port]


def _selector_from(value: list[Any]) -> TrafficSelector:
    start, end, protocol, start_port, end_port = value
    return TrafficSelector(
        ipaddress.ip_address(start), ipaddress.ip_address(end), int(protocol), int(start_port), int(end_port)
    )


def _to_wall(deadline: float | None, now: float, wall: float) -> float | None:
    return None if deadline is None else wall + (deadline - now)


def _to_monotonic(instant: float | None, now: float, wall: float) -> float | None:
    return None if instant is None else now + (float(instant) - wall)


def _address(value: list[Any]) -> tuple[str, int]:
    return (str(value[0]), int(value[1]))


def child_document(child: ChildSa, now: float, wall: float, seal: Seal) -> dict[str, Any]:
    prefix = f"child.{child.id}."
    return {
        "id": child.id,
        "name": child.name,
        "spi_in": child.spi_in,
        "spi_out": child.spi_out,
        "suite": suite_document(child.suite),
        "keys": {f: seal(prefix + f, getattr(child.keys, f)) for f in CHILD_KEY_FIELDS},
        "nonces": [seal(prefix + "ni", child.nonces[0]), seal(prefix + "nr", child.nonces[1])],
        "initiator": child.initiator,
        "local_ts": [_selector(ts) for ts in child.local_ts],
        "remote_ts": [_selector(ts) for ts in child.remote_ts],
        "mode": int(child.mode),
        "created_at": _to_wall(child.created_at, now, wall),
        "rekey_at": _to_wall(child.rekey_at, now, wall),
        "expire_at": _to_wall(child.expire_at, now, wall),
        "state": child.state.value,
        "rekey_of": child.rekey_of,
    }


def child_from(document: dict[str, Any], now: float, wall: float, open_: Open) -> ChildSa:
    prefix = f"child.{document['id']}."
    keys = ChildKeys(*(open_(prefix + f, document["keys"][f]) for f in CHILD_KEY_FIELDS))
    ni, nr = document["nonces"]
    created = _to_monotonic(document["created_at"], now, wall)
    return ChildSa(
        id=str(document["id"]),
        name=str(document["name"]),
        spi_in=int(document["spi_in"]),
        spi_out=int(document["spi_out"]),
        suite=suite_from(document["suite"]),
        keys=keys,
        initiator=bool(document["initiator"]),
        local_ts=tuple(_selector_from(v) for v in document["local_ts"]),
        remote_ts=tuple(_selector_from(v) for v in document["remote_ts"]),
        mode=Mode(int(document["mode"])),
        created_at=created if created is not None else now,
        rekey_at=_to_monotonic(document["rekey_at"], now, wall),
        expire_at=_to_monotonic(document["expire_at"], now, wall),
        state=ChildState(document["state"]),
        nonces=(open_(prefix + "ni", ni), open_(prefix + "nr", nr)),
        rekey_of=str(document.get("rekey_of", "")),
    )


# -- the IKE SA -----------------------------------------------------------------------------
def quiescent(sa: Any) -> bool:
    """No exchange of ours in flight or queued, no held response, no half-finished rekey."""
    return (
        sa.outstanding is None
        and not sa.queue
        and not sa.deferred
        and sa.held is None
        and not sa.active_responder_tasks
        and not sa.rekeying_children
        and sa.ike_rekey_task is None
        and not sa.pending_followups
        and not sa.reassembly
        and sa.keys is not None
        and sa.suite is not None
    )


def state_of(sa: Any, now: float, wall: float, seal: Seal) -> dict[str, Any]:
    if not quiescent(sa):
        raise NotQuiescent(f"IKE SA {sa.id} has an exchange in progress")
    keys: IkeKeys = sa.keys
    cached = None
    if sa.cached_response is not None:
        message_id, datagrams = sa.cached_response
        cached = {
            "message_id": message_id,
            "datagrams": [[d.data.hex(), list(d.local), list(d.remote), d.non_esp_marker] for d in datagrams],
        }
    return {
        "version": STATE_VERSION,
        "id": sa.id,
        "connection": sa.config.name,
        "initiator": sa.initiator,
        "local": list(sa.local),
        "remote": list(sa.remote),
        "spi_i": sa.spi_i.hex(),
        "spi_r": sa.spi_r.hex(),
        "state": sa.state.value,
        "created_at": _to_wall(sa.created_at, now, wall),
        "established_at": _to_wall(sa.established_at, now, wall),
        "suite": suite_document(sa.suite),
        "prf": int(sa.prf.prf_id),
        "keys": {f: seal(f, getattr(keys, f)) for f in IKE_KEY_FIELDS},
        "iv_counters": [sa.out_cipher.iv_counter, sa.in_cipher.iv_counter],
        "nat_local": sa.nat_local,
        "nat_remote": sa.nat_remote,
        "peer_fragmentation": sa.peer_fragmentation,
        "peer_intermediate": sa.peer_intermediate,
        "peer_sig_hashes": list(sa.peer_sig_hashes),
        "peer_certreq": sa.peer_certreq,
        "peer_id": [sa.peer_id.id_type, sa.peer_id.data.hex()] if sa.peer_id is not None else None,
        # the policy identity that governed the peer at IKE_AUTH (None: not governed), so that a
        # successor keeps it governed: nothing more for it once that identity no longer binds
        "governed_by": sa.access.identity if sa.access is not None else None,
        "virtual_ips": list(sa.virtual_ips),
        "assigned_ips": list(sa.assigned_ips),
        "dns": list(sa.dns),
        "split_subnets": list(sa.split_subnets),
        "children": [child_document(c, now, wall, seal) for c in sa.children.values()],
        "rekey_of": sa.rekey_of,
        "reauth_of": sa.reauth_of,
        "next_request_id": sa.next_request_id,
        "next_peer_id": sa.next_peer_id,
        "cached_response": cached,
        "last_request_digest": sa.last_request_digest.hex(),
        "rekey_at": _to_wall(sa.rekey_at, now, wall),
        "reauth_at": _to_wall(sa.reauth_at, now, wall),
        "expire_at": _to_wall(sa.expire_at, now, wall),
        "keepalive_at": _to_wall(sa.keepalive_at, now, wall),
        "delete_deadline": _to_wall(sa.delete_deadline, now, wall),
        "last_inbound": _to_wall(sa.last_inbound, now, wall),
        "last_outbound": _to_wall(sa.last_outbound, now, wall),
        "deletes_after_install": {
            k: [mid, _to_wall(at, now, wall)] for k, (mid, at) in sa.deletes_after_install.items()
        },
        "child_seq": sa._child_seq,
        "initial_contact": sa.initial_contact,
        "counters": dict(sa.counters),
    }


def restore_into(sa: Any, document: dict[str, Any], now: float, wall: float, open_: Open) -> None:
    """Fill a freshly constructed IkeSa (same id, config, role, addresses, SPIs) from `document`."""
    from esplanade.keyexchange.ikev2.ike_sa import IkeState

    if document.get("version") != STATE_VERSION:
        raise StateError(f"IKE SA state version {document.get('version')!r} is not {STATE_VERSION}")
    sa.state = IkeState(document["state"])
    sa.created_at = _to_monotonic(document["created_at"], now, wall)
    sa.established_at = _to_monotonic(document["established_at"], now, wall)
    sa.suite = suite_from(document["suite"])
    sa.prf = PRFS[int(document["prf"])]
    sa.install_keys(IkeKeys(*(open_(f, document["keys"][f]) for f in IKE_KEY_FIELDS)))
    out_counter, in_counter = document["iv_counters"]
    sa.out_cipher.iv_counter = int(out_counter) + IV_COUNTER_SKIP
    sa.in_cipher.iv_counter = int(in_counter)
    sa.nat_local = bool(document["nat_local"])
    sa.nat_remote = bool(document["nat_remote"])
    sa.peer_fragmentation = bool(document["peer_fragmentation"])
    sa.peer_intermediate = bool(document["peer_intermediate"])
    sa.peer_sig_hashes = tuple(int(h) for h in document["peer_sig_hashes"])
    sa.peer_certreq = bool(document["peer_certreq"])
    peer = document["peer_id"]
    sa.peer_id = Identity(int(peer[0]), bytes.fromhex(peer[1])) if peer is not None else None
    governed_by = document.get("governed_by")  # absent in documents of older versions: not known
    # The grant itself is asked afresh for every later Child SA (`current_access`); what the
    # successor needs is only that the peer was governed.
    sa.access = AccessGrant(str(governed_by), (), (), ()) if governed_by is not None else None
    sa.virtual_ips = [str(a) for a in document["virtual_ips"]]
    sa.assigned_ips = [str(a) for a in document["assigned_ips"]]
    sa.dns = [str(a) for a in document["dns"]]
    sa.split_subnets = [str(a) for a in document["split_subnets"]]
    sa.children = {c["id"]: child_from(c, now, wall, open_) for c in document["children"]}
    sa.rekey_of = str(document["rekey_of"])
    sa.reauth_of = str(document["reauth_of"])
    sa.next_request_id = int(document["next_request_id"])
    sa.next_peer_id = int(document["next_peer_id"])
    cached = document["cached_response"]
    sa.cached_response = (
        None
        if cached is None
        else (
            int(cached["message_id"]),
            [
                Datagram(bytes.fromhex(data), _address(local), _address(remote), bool(marker))
                for data, local, remote, marker in cached["datagrams"]
            ],
        )
    )
    sa.last_request_digest = bytes.fromhex(document["last_request_digest"])
    sa.rekey_at = _to_monotonic(document["rekey_at"], now, wall)
    sa.reauth_at = _to_monotonic(document["reauth_at"], now, wall)
    sa.expire_at = _to_monotonic(document["expire_at"], now, wall)
    sa.keepalive_at = _to_monotonic(document["keepalive_at"], now, wall)
    sa.delete_deadline = _to_monotonic(document["delete_deadline"], now, wall)
    sa.last_inbound = _to_monotonic(document["last_inbound"], now, wall)
    sa.last_outbound = _to_monotonic(document["last_outbound"], now, wall)
    sa.deletes_after_install = {
        str(k): (int(mid), float(_to_monotonic(at, now, wall) or now))
        for k, (mid, at) in document["deletes_after_install"].items()
    }
    sa._child_seq = int(document["child_seq"])
    sa.initial_contact = bool(document["initial_contact"])
    sa.counters = {str(k): int(v) for k, v in document["counters"].items()}


def header_of(document: dict[str, Any]) -> tuple[str, str, bool, tuple[str, int], tuple[str, int], bytes, bytes]:
    """(id, connection, initiator, local, remote, spi_i, spi_r): what an IkeSa is constructed from."""
    try:
        return (
            str(document["id"]),
            str(document["connection"]),
            bool(document["initiator"]),
            _address(document["local"]),
            _address(document["remote"]),
            bytes.fromhex(document["spi_i"]),
            bytes.fromhex(document["spi_r"]),
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise StateError(f"IKE SA state is malformed: {type(exc).__name__}") from None


def config_matches(config: ConnectionConfig, document: dict[str, Any]) -> bool:
    return config.name == document.get("connection")
