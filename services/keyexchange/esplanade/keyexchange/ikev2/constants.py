"""IANA IKEv2 numbers (RFC 7296 §3 and later RFCs) used on the wire.

Transform IDs live in `esplanade.ipsec.transforms`; this module holds the rest of the
registry: exchange types, payload types, notify types, authentication methods, ID types.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

IKE_VERSION = 0x20  # major 2, minor 0
IKE_HEADER_LEN = 28
NON_ESP_MARKER = b"\x00\x00\x00\x00"
IKE_PORT = 500
NATT_PORT = 4500


class ExchangeType(IntEnum):
    IKE_SA_INIT = 34
    IKE_AUTH = 35
    CREATE_CHILD_SA = 36
    INFORMATIONAL = 37
    IKE_INTERMEDIATE = 43  # RFC 9242
    IKE_FOLLOWUP_KE = 44  # RFC 9370


class HeaderFlag(IntFlag):
    NONE = 0
    INITIATOR = 0x08
    VERSION = 0x10
    RESPONSE = 0x20


class PayloadType(IntEnum):
    NONE = 0
    SA = 33
    KE = 34
    IDI = 35
    IDR = 36
    CERT = 37
    CERTREQ = 38
    AUTH = 39
    NONCE = 40
    NOTIFY = 41
    DELETE = 42
    VENDOR = 43
    TSI = 44
    TSR = 45
    SK = 46
    CP = 47
    EAP = 48
    SKF = 53  # RFC 7383


class NotifyType(IntEnum):
    # errors (RFC 7296 §3.10.1)
    UNSUPPORTED_CRITICAL_PAYLOAD = 1
    INVALID_IKE_SPI = 4
    INVALID_MAJOR_VERSION = 5
    INVALID_SYNTAX = 7
    INVALID_MESSAGE_ID = 9
    INVALID_SPI = 11
    NO_PROPOSAL_CHOSEN = 14
    INVALID_KE_PAYLOAD = 17
    AUTHENTICATION_FAILED = 24
    SINGLE_PAIR_REQUIRED = 34
    NO_ADDITIONAL_SAS = 35
    INTERNAL_ADDRESS_FAILURE = 36
    FAILED_CP_REQUIRED = 37
    TS_UNACCEPTABLE = 38
    INVALID_SELECTORS = 39
    TEMPORARY_FAILURE = 43
    CHILD_SA_NOT_FOUND = 44
    STATE_NOT_FOUND = 47  # RFC 9370
    # status types
    INITIAL_CONTACT = 16384
    SET_WINDOW_SIZE = 16385
    ADDITIONAL_TS_POSSIBLE = 16386
    IPCOMP_SUPPORTED = 16387
    NAT_DETECTION_SOURCE_IP = 16388
    NAT_DETECTION_DESTINATION_IP = 16389
    COOKIE = 16390
    USE_TRANSPORT_MODE = 16391
    HTTP_CERT_LOOKUP_SUPPORTED = 16392
    REKEY_SA = 16393
    ESP_TFC_PADDING_NOT_SUPPORTED = 16394
    NON_FIRST_FRAGMENTS_ALSO = 16395
    MOBIKE_SUPPORTED = 16396
    MULTIPLE_AUTH_SUPPORTED = 16404
    EAP_ONLY_AUTHENTICATION = 16417
    CHILDLESS_IKEV2_SUPPORTED = 16418
    IKEV2_FRAGMENTATION_SUPPORTED = 16430  # RFC 7383
    SIGNATURE_HASH_ALGORITHMS = 16431  # RFC 7427
    INTERMEDIATE_EXCHANGE_SUPPORTED = 16438  # RFC 9242
    ADDITIONAL_KEY_EXCHANGE = 16441  # RFC 9370

    @property
    def is_error(self) -> bool:
        return self.value < 16384


def notify_is_error(notify_type: int) -> bool:
    return notify_type < 16384


def known_notify(value: int, default: NotifyType = NotifyType.INVALID_SYNTAX) -> NotifyType:
    """The NotifyType for a received number, or `default` for one we do not know."""
    try:
        return NotifyType(value)
    except ValueError:
        return default


class AuthMethod(IntEnum):
    RSA_SIG = 1
    PSK = 2
    DSS_SIG = 3
    ECDSA_256 = 9
    ECDSA_384 = 10
    ECDSA_521 = 11
    NULL = 13
    DIGITAL_SIGNATURE = 14  # RFC 7427


class IdType(IntEnum):
    IPV4_ADDR = 1
    FQDN = 2
    RFC822_ADDR = 3
    IPV6_ADDR = 5
    DER_ASN1_DN = 9
    DER_ASN1_GN = 10
    KEY_ID = 11


class CertEncoding(IntEnum):
    X509_SIGNATURE = 4
    CRL = 7
    HASH_AND_URL_X509 = 12


class CfgType(IntEnum):
    REQUEST = 1
    REPLY = 2
    SET = 3
    ACK = 4


class CfgAttr(IntEnum):
    INTERNAL_IP4_ADDRESS = 1
    INTERNAL_IP4_NETMASK = 2
    INTERNAL_IP4_DNS = 3
    INTERNAL_IP4_NBNS = 4
    INTERNAL_IP4_DHCP = 6
    APPLICATION_VERSION = 7
    INTERNAL_IP6_ADDRESS = 8
    INTERNAL_IP6_DNS = 10
    INTERNAL_IP6_DHCP = 12
    INTERNAL_IP4_SUBNET = 13
    SUPPORTED_ATTRIBUTES = 14
    INTERNAL_IP6_SUBNET = 15


class HashAlgorithm(IntEnum):
    """RFC 7427 §7 hash algorithm identifiers (SIGNATURE_HASH_ALGORITHMS)."""

    SHA1 = 1
    SHA2_256 = 2
    SHA2_384 = 3
    SHA2_512 = 4
    IDENTITY = 5


ATTR_KEY_LENGTH = 14  # transform attribute type (RFC 7296 §3.3.5)
