"""Typed errors of the IKEv2 core.

A `ParseError` says what was wrong with a datagram and how RFC 7296 §2.21 wants it
answered: with an error notify (`notify` set, sent only inside an authenticated or
IKE_SA_INIT response) or silently (`notify` None: a counted drop).
"""

from __future__ import annotations

from esplanade.keyexchange.ikev2.constants import NotifyType


class IkeError(Exception):
    """Base of everything the IKEv2 core raises on purpose."""


class ParseError(IkeError):
    """A datagram or payload that does not decode. Never carries secret material."""

    notify: NotifyType | None = NotifyType.INVALID_SYNTAX


class Truncated(ParseError):
    """The bytes end before a length field says they should (usually a silent drop)."""

    notify = None


class InvalidSyntax(ParseError):
    notify = NotifyType.INVALID_SYNTAX


class InvalidMajorVersion(ParseError):
    notify = NotifyType.INVALID_MAJOR_VERSION


class UnsupportedCriticalPayload(ParseError):
    notify = NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD

    def __init__(self, payload_type: int) -> None:
        super().__init__(f"unsupported critical payload type {payload_type}")
        self.payload_type = payload_type


class IntegrityCheckFailed(IkeError):
    """An SK/SKF payload that fails its ICV or decryption: always a silent drop (§2.21.1)."""


class CryptoError(IkeError):
    """A peer's public value or a key exchange that fails validation (§2.12)."""


class NegotiationError(IkeError):
    """A request we must refuse with an error notify (NO_PROPOSAL_CHOSEN, TS_UNACCEPTABLE, ...)."""

    def __init__(self, notify: NotifyType, reason: str, data: bytes = b"") -> None:
        super().__init__(reason)
        self.notify = notify
        self.reason = reason
        self.data = data


class ConfigError(IkeError, ValueError):
    """A connection configuration that does not validate; the message names the field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
