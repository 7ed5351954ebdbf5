"""Netlink errno -> typed `DataplaneError`, with a message that says what the kernel refused.

The mapping depends on the operation: ENOENT on a delete means "not there", on an SA add
it means the crypto API could not build the algorithm. The original `XfrmNetlinkError`
(errno, kernel extended-ACK text) stays attached as `__cause__`. Messages never contain
key material: they are built from SA identities (SPI, addresses, algorithm names).
"""

from __future__ import annotations

import errno

from esplanade.dataplane.backend import AlreadyExists, DataplaneError, InvalidArgument, NotFound, Unsupported
from esplanade.dataplane.kernel.xfrm_socket import XfrmNetlinkError


class PermissionDenied(DataplaneError):
    """The process lacks CAP_NET_ADMIN in the namespace it programs."""

    code = "PERMISSION_DENIED"


class ResourceExhausted(DataplaneError):
    """The kernel ran out of memory or buffer space for the request."""

    code = "RESOURCE_EXHAUSTED"


class KernelUnavailable(DataplaneError):
    """The kernel did not answer the netlink request in time."""

    code = "UNAVAILABLE"


def translate(exc: XfrmNetlinkError, what: str, *, adding_sa: bool = False) -> DataplaneError:
    """The `DataplaneError` for a failed request about `what` (e.g. "SA esp spi 0x... to 192.0.2.2")."""
    code = exc.errno
    detail = f"{exc.errno_name}" + (f": {exc.kernel_message}" if exc.kernel_message else "")
    error: DataplaneError
    if code == errno.EEXIST:
        error = AlreadyExists(f"{what} already exists in the kernel ({detail})")
    elif code in (errno.ENOENT, errno.ESRCH) and adding_sa:
        error = Unsupported(f"kernel crypto API cannot instantiate the algorithms of {what} ({detail})")
    elif code in (errno.ENOENT, errno.ESRCH, errno.ENODEV):
        error = NotFound(f"{what} not found in the kernel ({detail})")
    elif code == errno.ENOSYS:
        error = Unsupported(f"kernel lacks an algorithm of {what} ({detail})")
    elif code == errno.EPROTONOSUPPORT:
        error = Unsupported(f"kernel lacks the IPsec protocol of {what}, e.g. CONFIG_INET_ESP ({detail})")
    elif code in (errno.EAFNOSUPPORT, errno.EOPNOTSUPP):
        error = Unsupported(f"kernel does not support {what} ({detail})")
    elif code in (errno.EINVAL, errno.ERANGE, errno.E2BIG, errno.EMSGSIZE):
        error = InvalidArgument(f"kernel rejected {what} as invalid ({detail})")
    elif code in (errno.EPERM, errno.EACCES):
        error = PermissionDenied(f"not permitted to change {what}: needs CAP_NET_ADMIN ({detail})")
    elif code in (errno.ENOMEM, errno.ENOBUFS):
        error = ResourceExhausted(f"kernel out of memory for {what} ({detail})")
    elif code == errno.ETIMEDOUT:
        error = KernelUnavailable(f"no answer from the kernel about {what} ({detail})")
    else:
        error = DataplaneError(f"kernel refused {what} ({detail})")
    error.__cause__ = exc
    return error
