"""Per-socket IPsec settings for the IKE sockets: policy bypass and ESP-in-UDP decapsulation.

`bypass_ipsec(sock)` gives a socket its own ALLOW policy in both directions
(IP_XFRM_POLICY / IPV6_XFRM_POLICY), so IKE packets skip the SPD even when a policy would
otherwise protect, trap or block traffic between the gateways: strongSwan's kernel-netlink
`bypass_socket()`. `enable_esp_in_udp(sock)` sets UDP_ENCAP_ESPINUDP on the NAT-T socket
(port 4500) so the kernel takes ESP-in-UDP packets off it and hands the rest (IKE with
the non-ESP marker) to the application, RFC 3948.
"""

from __future__ import annotations

import socket

from esplanade.dataplane.kernel.xfrm_messages import (
    UDP_ENCAP_ESPINUDP,
    XfrmPolicyAction,
    XfrmPolicyDir,
    xfrm_userpolicy_info,
)

IP_XFRM_POLICY = 17
IPV6_XFRM_POLICY = 35
UDP_ENCAP = 100
_NLMSG_HEADER_BYTES = 16
_USERPOLICY_INFO_BYTES = 168


def _allow_policy(family: int, direction: XfrmPolicyDir) -> bytes:
    msg = xfrm_userpolicy_info()
    msg.update(sel_family=family, dir=direction, action=XfrmPolicyAction.ALLOW)
    msg["attrs"] = []
    msg["header"] = {"type": 0, "flags": 0, "sequence_number": 0, "pid": 0}
    msg.encode()
    return bytes(msg.data[_NLMSG_HEADER_BYTES : _NLMSG_HEADER_BYTES + _USERPOLICY_INFO_BYTES])


def bypass_ipsec(sock: socket.socket) -> None:
    """Exempt this socket's traffic from every IPsec policy, in and out. Raises OSError."""
    if sock.family == socket.AF_INET:
        level, option = socket.IPPROTO_IP, IP_XFRM_POLICY
    elif sock.family == socket.AF_INET6:
        level, option = socket.IPPROTO_IPV6, IPV6_XFRM_POLICY
    else:
        raise ValueError(f"cannot bypass IPsec on a {sock.family!r} socket")
    for direction in (XfrmPolicyDir.OUT, XfrmPolicyDir.IN):
        sock.setsockopt(level, option, _allow_policy(sock.family, direction))


def enable_esp_in_udp(sock: socket.socket) -> None:
    """Let the kernel decapsulate ESP-in-UDP (RFC 3948) arriving on this UDP socket."""
    sock.setsockopt(socket.IPPROTO_UDP, UDP_ENCAP, UDP_ENCAP_ESPINUDP)
