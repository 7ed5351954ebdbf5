"""IKE_INTERMEDIATE (RFC 9242) carrying an additional key exchange (RFC 9370 §2.2.2).

Each exchange runs under the keys of the previous step; afterwards both sides compute
SKEYSEED(n) = prf(SK_d(n-1), SK(n) | Ni | Nr) and rederive all SK_* keys. Every message
also extends the IntAuth chains that IKE_AUTH signs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from esplanade.ipsec.transforms import TransformType
from esplanade.keyexchange.ikev2.constants import ExchangeType, NotifyType
from esplanade.keyexchange.ikev2.crypto.keyexchange import KeyExchange, new_key_exchange
from esplanade.keyexchange.ikev2.crypto.keymat import skeyseed_additional
from esplanade.keyexchange.ikev2.errors import CryptoError
from esplanade.keyexchange.ikev2.ike_sa import IkeState, notify_name
from esplanade.keyexchange.ikev2.message import Message, intauth_octets
from esplanade.keyexchange.ikev2.payloads import KePayload, NotifyPayload, Payload
from esplanade.keyexchange.ikev2.tasks.base import Task

if TYPE_CHECKING:
    from esplanade.keyexchange.ikev2.ike_sa import IkeSa


def extend_int_auth(ike: IkeSa, msg: Message, plain: bytes, from_initiator: bool) -> None:
    assert ike.keys is not None
    octets = intauth_octets(msg, plain)
    if from_initiator:
        ike.int_auth_i = ike.prf(ike.keys.sk_pi, ike.int_auth_i + octets)
    else:
        ike.int_auth_r = ike.prf(ike.keys.sk_pr, ike.int_auth_r + octets)


def rekey_after_additional(ike: IkeSa, shared: bytes) -> None:
    assert ike.keys is not None
    ike.derive_keys(skeyseed_additional(ike.prf, ike.keys.sk_d, shared, ike.ni, ike.nr))
    ike.shared_secrets.append(shared)


class IkeIntermediate(Task):
    name = "ike_intermediate"
    exchange = ExchangeType.IKE_INTERMEDIATE

    def __init__(self, transform_type: TransformType | int = TransformType.ADDKE1, method: int = 0) -> None:
        super().__init__()
        self.transform_type = transform_type
        self.method = method
        self.ke: KeyExchange | None = None

    def build_request(self, ike: IkeSa) -> list[Payload] | None:
        self.ke = new_key_exchange(self.method, initiator=True)
        return [KePayload(self.method, self.ke.public_value())]

    def on_encoded(self, ike: IkeSa, msg: Message, data: bytes) -> None:
        extend_int_auth(ike, msg, data, from_initiator=ike.initiator)

    def process_response(self, ike: IkeSa, msg: Message, now: float) -> bool:
        extend_int_auth(ike, msg, msg.inner_plain, from_initiator=False)
        err = ike.notify_error_in(msg)
        if err is not None:
            ike.fail(err.type, f"IKE_INTERMEDIATE refused: {notify_name(err.type)}", self.name)
            return False
        ke = next((p for p in msg.payloads if isinstance(p, KePayload)), None)
        if ke is None or ke.group != self.method or self.ke is None:
            ike.fail(NotifyType.INVALID_SYNTAX, "IKE_INTERMEDIATE response without the negotiated KE", self.name)
            return False
        try:
            self.ke.process_peer(ke.data)
        except CryptoError as exc:
            ike.fail(NotifyType.INVALID_SYNTAX, str(exc), self.name)
            return False
        rekey_after_additional(ike, self.ke.shared_secret)
        if not any(isinstance(t, IkeIntermediate) for t in ike.queue):
            ike.set_state(IkeState.AUTH_SENT)
        return False

    def process_request(self, ike: IkeSa, msg: Message, now: float) -> list[Payload] | None:
        extend_int_auth(ike, msg, msg.inner_plain, from_initiator=True)
        ke = next((p for p in msg.payloads if isinstance(p, KePayload)), None)
        if not ike.pending_additional_ke or ke is None or ke.group != ike.pending_additional_ke[0]:
            return [NotifyPayload(NotifyType.INVALID_SYNTAX)]
        ike.pending_additional_ke.pop(0)
        self.ke = new_key_exchange(ke.group, initiator=False)
        try:
            self.ke.process_peer(ke.data)
        except CryptoError:
            return [NotifyPayload(NotifyType.INVALID_SYNTAX)]
        shared = self.ke.shared_secret
        # the response goes out under the old keys; switch after it is encoded
        self.after_send.append(lambda _now: rekey_after_additional(ike, shared))
        return [KePayload(ke.group, self.ke.public_value())]
