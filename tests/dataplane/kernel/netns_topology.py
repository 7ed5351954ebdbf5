"""Network namespaces for kernel-backend tests: one alone, or two peers joined by a veth pair.

Used on the host (no ESP: policies, bypass, ACQUIRE) and inside the VM (full ESP traffic).
Topology of `NetnsPair` (names carry the test prefix, e.g. `xfrm-a-1234`):

    ns A  lo 10.1.0.1/32 fd01::1/128          ns B  lo 10.2.0.1/32 fd02::1/128
          veth 192.168.77.1/24 fd00:77::1/64 ===== veth 192.168.77.2/24 fd00:77::2/64
          routes to B's inner addresses via .2       routes to A's inner addresses via .1

The inner addresses ("protected subnets") sit on lo so tunnel-mode traffic has distinct
inner and outer addresses. Test code may shell out to `ip`; product code never does.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

PREFIX = os.environ.get("ESPLANADE_TEST_NETNS_PREFIX", "xfrm-")
_counter = itertools.count(1)
NO_DAD = ("net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")


def unique_name(role: str) -> str:
    return f"{PREFIX}{role}-{os.getpid() % 100000}-{next(_counter)}"


def run(*argv: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def ip_batch(commands: list[str], netns: str | None = None) -> None:
    """Run `ip` commands in one process (fast, also under TCG), in `netns` if given."""
    argv = ["ip", *(["-n", netns] if netns else []), "-batch", "-"]
    proc = subprocess.run(argv, input="\n".join(commands) + "\n", capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ip -batch failed: {proc.stderr.strip()}")


def in_netns(netns: str, *argv: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return run("ip", "netns", "exec", netns, *argv, check=check, timeout=timeout)


@contextlib.contextmanager
def netns(role: str = "ns") -> Iterator[str]:
    name = unique_name(role)
    ip_batch([f"netns add {name}"])
    ip_batch(["link set lo up"], netns=name)
    in_netns(name, "sysctl", "-qw", *NO_DAD)
    try:
        yield name
    finally:
        run("ip", "netns", "del", name, check=False)


@dataclass(frozen=True)
class Side:
    netns: str
    veth: str
    outer4: str
    outer6: str
    inner4: str
    inner6: str


@dataclass(frozen=True)
class NetnsPair:
    a: Side
    b: Side


@contextlib.contextmanager
def netns_pair() -> Iterator[NetnsPair]:
    suffix = f"{os.getpid() % 100000}-{next(_counter)}"
    a = Side(f"{PREFIX}a-{suffix}", "va", "192.168.77.1", "fd00:77::1", "10.1.0.1", "fd01::1")
    b = Side(f"{PREFIX}b-{suffix}", "vb", "192.168.77.2", "fd00:77::2", "10.2.0.1", "fd02::1")
    try:
        ip_batch([f"netns add {a.netns}", f"netns add {b.netns}"])
        for side in (a, b):  # no duplicate address detection: addresses are usable at once
            in_netns(side.netns, "sysctl", "-qw", *NO_DAD)
        ip_batch([f"link add {a.veth} netns {a.netns} type veth peer name {b.veth} netns {b.netns}"])
        for me, peer in ((a, b), (b, a)):
            ip_batch(
                [
                    "link set lo up",
                    f"addr add {me.outer4}/24 dev {me.veth}",
                    f"addr add {me.outer6}/64 dev {me.veth} nodad",
                    f"addr add {me.inner4}/32 dev lo",
                    f"addr add {me.inner6}/128 dev lo nodad",
                    f"link set {me.veth} up",
                    f"route add {peer.inner4}/32 via {peer.outer4} src {me.inner4}",
                    f"route add {peer.inner6}/128 via {peer.outer6} src {me.inner6}",
                ],
                netns=me.netns,
            )
        yield NetnsPair(a, b)
    finally:
        for side in (a, b):
            run("ip", "netns", "del", side.netns, check=False)
