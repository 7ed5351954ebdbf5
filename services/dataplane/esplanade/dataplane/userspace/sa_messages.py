"""What the parent and a worker say about SAs and policies over the worker's control channel.

The channel is a private SOCK_SEQPACKET socketpair between the dataplane process and the
worker it forked; messages are JSON. SA keys travel hex-encoded inside `install_sa` and
`update_sa` (the only messages that carry them) and are never logged by either side.

Parent -> worker (each with an "id", answered by {"op": "reply", "id", "ok", ...}):

    install_sa      {child_sa, owner, inbound, outbound, next_seq, reserved_upto, replay_floor,
                     created_at}     the owner builds the SAs; `created_at` is CLOCK_MONOTONIC
    update_sa       same fields; the SPIs are the same, so counters, sequence and window stay
    sa_owner        {child_sa, owner}   a Child SA another worker owns (for steering)
    remove_sa       {child_sa}
    install_policy  {policy}            every worker holds the whole SPD
    remove_policy   {policy_id}
    grant_sequence  {spi, upto}         `upto` is durable in the store: send up to it
    counters        {}                  -> {sas: [...], drops: {reason: n}}

Worker -> parent, unasked:

    reserve_sequence {spi, upto}    persist `upto` in dataplane/seq/<spi>, then grant it
    persist_replay   {spi, upto}    persist the inbound replay floor in dataplane/replay/<spi>
    events           {events: [...]}  DataplaneEvent fields
    ike              {remote_addr, remote_port, local_addr, local_port, payload (hex)}
"""

from __future__ import annotations

from typing import Any

from esplanade.ipsec.sa import SecurityAssociation
from esplanade.ipsec.spd import SpdPolicy


def _hex(field_name: str, value: bytes) -> str:
    return value.hex()


def _unhex(field_name: str, value: str) -> bytes:
    return bytes.fromhex(value)


def association_document(association: SecurityAssociation, prefix: str) -> dict[str, Any]:
    """The SA as a channel document (keys hex-encoded)."""
    return association.to_document(_hex, prefix)


def association_from_document(document: dict[str, Any], prefix: str) -> SecurityAssociation:
    return SecurityAssociation.from_document(document, _unhex, prefix)


def policy_document(policy: SpdPolicy) -> dict[str, Any]:
    return policy.to_document()


def policy_from_document(document: dict[str, Any]) -> SpdPolicy:
    return SpdPolicy.from_document(document)
