"""XFRM interfaces (`ip link add NAME type xfrm if_id N`): route-based VPN.

Policies and SAs that carry an `if_id` only match packets routed through the XFRM
interface with that id, so a route (not a selector) decides what enters the tunnel, and
decrypted packets arrive on the interface (firewall and routing see them there). Created
through pyroute2's IPRoute (link kind "xfrm", IFLA_XFRM_IF_ID; IFLA_XFRM_LINK optional).
"""

from __future__ import annotations

import errno
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from esplanade.dataplane.backend import AlreadyExists, DataplaneError, InvalidArgument, NotFound, Unsupported


def _iproute(netns: str | None) -> Any:
    # imported here: the whole pyroute2 package (IPRoute and the rest) costs seconds to import
    # in a slow interpreter, and most dataplanes never create an interface
    from pyroute2 import AsyncIPRoute

    return AsyncIPRoute(netns=netns) if netns else AsyncIPRoute()


async def create_xfrm_interface(
    name: str, if_id: int, *, netns: str | None = None, link: str | None = None, up: bool = True
) -> int:
    """Create the interface and return its ifindex."""
    if not 0 < if_id <= 0xFFFFFFFF:
        raise InvalidArgument(f"XFRM interface {name!r}: if_id {if_id} must be 1..2^32-1")
    if not name or len(name) > 15:
        raise InvalidArgument(f"XFRM interface name {name!r} must be 1-15 characters")
    async with _iproute(netns) as ipr:
        spec: dict[str, Any] = {"ifname": name, "kind": "xfrm", "xfrm_if_id": if_id}
        try:
            if link is not None:
                found = await ipr.link_lookup(ifname=link)
                if not found:
                    raise NotFound(f"XFRM interface {name!r}: underlying device {link!r} not found")
                spec["xfrm_link"] = found[0]
            await ipr.link("add", **spec)
            index = int((await ipr.link_lookup(ifname=name))[0])
            if up:
                await ipr.link("set", index=index, state="up")
        except NetlinkError as exc:
            raise _translate(exc, f"XFRM interface {name!r} (if_id {if_id})") from exc
    return index


async def delete_xfrm_interface(name: str, *, netns: str | None = None) -> None:
    async with _iproute(netns) as ipr:
        found = await ipr.link_lookup(ifname=name)
        if not found:
            raise NotFound(f"XFRM interface {name!r} not found")
        try:
            await ipr.link("del", index=found[0])
        except NetlinkError as exc:
            raise _translate(exc, f"XFRM interface {name!r}") from exc


def _translate(exc: NetlinkError, what: str) -> DataplaneError:
    code = exc.code
    if code == errno.EEXIST:
        return AlreadyExists(f"{what} already exists")
    if code in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPROTONOSUPPORT):
        return Unsupported(f"{what}: the kernel has no XFRM interfaces (CONFIG_XFRM_INTERFACE)")
    if code in (errno.ENODEV, errno.ENOENT):
        return NotFound(f"{what}: device not found")
    if code in (errno.EINVAL, errno.ERANGE):
        return InvalidArgument(f"{what}: rejected by the kernel ({exc})")
    return DataplaneError(f"{what}: {exc}")
