"""A real etcd inside a test-bed node's namespace, where that node's dataplane can reach it on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

from tests.etcd_server import EtcdServer
from tests.netns_topology import inside_netns


class NetnsEtcd(EtcdServer):
    def __init__(self, directory: Path, netns: str) -> None:
        super().__init__(directory)
        self.netns = netns

    def command(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *super().command()]

    def healthy(self) -> bool:
        with inside_netns(self.netns):  # the HTTP client's socket is made in the node's namespace
            return super().healthy()
