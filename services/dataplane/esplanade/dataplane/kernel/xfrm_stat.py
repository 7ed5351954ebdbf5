"""The XFRM error counters of a network namespace (/proc/net/xfrm_stat, CONFIG_XFRM_STATISTICS).

The kernel counts its IPsec drops per namespace, not per SA or policy. The ones an identity
filter causes (`narrowed_policies`: a decapsulated packet the filter does not grant) are

- XfrmInPolBlock: the packet matched a BLOCK policy (the filtered SA's negotiated selector);
- XfrmInNoPols: a tunnel-mode packet matched no policy at all;
- XfrmInTmplMismatch: it matched a policy whose template another SA fills.

They count every other such drop in the namespace too (DISCARD entries, cleartext packets
hitting a PROTECT policy, a peer sending outside its selectors), so they are reported as
namespace-wide deltas, attributed to no Child SA.

The file is opened once, inside the namespace (a short-lived thread enters it with setns), and
read with pread afterwards: an open /proc/net file stays bound to the namespace it was opened
in, so reads cost no namespace switch.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")
FILTER_DROP_COUNTERS = ("XfrmInPolBlock", "XfrmInNoPols", "XfrmInTmplMismatch")


def parse_xfrm_stat(text: str) -> dict[str, int]:
    counters = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].isdigit():
            counters[fields[0]] = int(fields[1])
    return counters


def _open_in(netns: str) -> int:
    """open('/proc/thread-self/net/xfrm_stat') from a thread that entered `netns`."""
    path = Path(netns) if netns.startswith("/") else NETNS_DIR / netns
    outcome: list[int | OSError] = []

    def enter_and_open() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            ns_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(ns_fd, CLONE_NEWNET) != 0:
                    code = ctypes.get_errno()
                    raise OSError(code, f"setns({path}): {os.strerror(code)}")
            finally:
                os.close(ns_fd)
            outcome.append(os.open("/proc/thread-self/net/xfrm_stat", os.O_RDONLY | os.O_CLOEXEC))
        except OSError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=enter_and_open, name="xfrm-stat-netns")  # ends in the netns, unreused
    thread.start()
    thread.join()
    result = outcome[0]
    if isinstance(result, OSError):
        raise result
    return result


class XfrmStatReader:
    """Reads the XFRM counters of one namespace (None: this process's)."""

    def __init__(self, netns: str | None) -> None:
        if netns is None:
            self._fd = os.open("/proc/self/net/xfrm_stat", os.O_RDONLY | os.O_CLOEXEC)
        else:
            self._fd = _open_in(netns)

    def read(self) -> dict[str, int]:
        chunks = []
        offset = 0
        while True:
            chunk = os.pread(self._fd, 1 << 16, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        return parse_xfrm_stat(b"".join(chunks).decode("ascii", "replace"))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
