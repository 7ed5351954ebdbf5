"""Netlink errno -> typed DataplaneError, depending on what was being done."""

from __future__ import annotations

import errno

import pytest

from esplanade.dataplane.backend import (
    AlreadyExists,
    DataplaneError,
    InvalidArgument,
    NotFound,
    Unsupported,
)
from esplanade.dataplane.kernel.xfrm_errors import KernelUnavailable, PermissionDenied, ResourceExhausted, translate
from esplanade.dataplane.kernel.xfrm_socket import XfrmNetlinkError

CASES = [
    (errno.EEXIST, False, AlreadyExists, "already exists"),
    (errno.ENOENT, False, NotFound, "not found"),
    (errno.ESRCH, False, NotFound, "not found"),
    (errno.ENOENT, True, Unsupported, "crypto API"),
    (errno.ENOSYS, True, Unsupported, "lacks an algorithm"),
    (errno.EPROTONOSUPPORT, True, Unsupported, "CONFIG_INET_ESP"),
    (errno.EAFNOSUPPORT, False, Unsupported, "does not support"),
    (errno.EOPNOTSUPP, False, Unsupported, "does not support"),
    (errno.EINVAL, True, InvalidArgument, "invalid"),
    (errno.ERANGE, False, InvalidArgument, "invalid"),
    (errno.EPERM, False, PermissionDenied, "CAP_NET_ADMIN"),
    (errno.EACCES, False, PermissionDenied, "CAP_NET_ADMIN"),
    (errno.ENOMEM, False, ResourceExhausted, "out of memory"),
    (errno.ENOBUFS, False, ResourceExhausted, "out of memory"),
    (errno.ETIMEDOUT, False, KernelUnavailable, "no answer"),
    (errno.EIO, False, DataplaneError, "refused"),
]


@pytest.mark.parametrize(("code", "adding_sa", "kind", "words"), CASES)
def test_errno_maps_to_a_typed_error(code: int, adding_sa: bool, kind: type, words: str) -> None:
    cause = XfrmNetlinkError(code, "add SA", "Requested type not found")
    error = translate(cause, "SA esp spi 0x00001000 to 192.0.2.2", adding_sa=adding_sa)
    assert type(error) is kind
    assert words in str(error)
    assert "SA esp spi 0x00001000 to 192.0.2.2" in str(error)
    assert errno.errorcode[code] in str(error) and "Requested type not found" in str(error)
    assert error.__cause__ is cause


def test_codes_are_grpc_status_names() -> None:
    assert {PermissionDenied.code, ResourceExhausted.code, KernelUnavailable.code} == {
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "UNAVAILABLE",
    }
