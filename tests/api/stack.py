"""A whole API stack in one background thread: real store, real policy service, fake
keyexchange/dataplane, the real FastAPI app on uvicorn over real HTTP.

    with ApiStack(tmp_path) as stack:
        stack.url, stack.tokens["admin"], stack.store_dump()
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx

from esplanade.api.app import create_app
from esplanade.api.auth import Scope, new_token, token_document
from esplanade.api.service import ApiServer, server_config
from esplanade.config.settings import Settings
from esplanade.journal.audit import AuditLog
from esplanade.policy.compiled_sync import CompiledSync
from esplanade.policy.servicer import PolicyServicer
from esplanade.policy.store_state import PolicyStore
from esplanade.rpc.server import ServiceServer
from esplanade.store import schema
from esplanade.store.base import Delete, Store
from esplanade.store.embedded import EmbeddedStore
from esplanade.store.etcd import EtcdStore
from esplanade.store.sealing import Keyring, Sealer
from esplanade.v1 import dataplane_pb2_grpc, keyexchange_pb2_grpc, policy_pb2_grpc
from tests.api.fake_services import FakeDataplane, FakeKeyExchange
from tests.conditions import wait_until
from tests.loop_thread import finish_loop_thread

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ApiStack:
    def __init__(
        self, directory: Path, *, etcd_endpoint: str | None = None, api_settings: dict[str, Any] | None = None
    ) -> None:
        self.directory = directory
        self.etcd_endpoint = etcd_endpoint
        self.ports = {name: free_port() for name in ("api", "policy", "keyexchange", "dataplane")}
        self.settings = Settings(
            store={"backend": "embedded", "path": str(directory / "store.db")},
            endpoints={
                "api": f"127.0.0.1:{self.ports['api']}",
                "policy": f"127.0.0.1:{self.ports['policy']}",
                "keyexchange": f"127.0.0.1:{self.ports['keyexchange']}",
                "dataplane": f"127.0.0.1:{self.ports['dataplane']}",
                "metrics_port_offset": 0,
            },
            api={
                "audit_log_path": str(directory / "audit.db"),
                "auth_failures_per_minute": 100_000,
                "max_body_bytes": 64 * 1024,
                **(api_settings or {}),
            },
            policy={"audit_log_path": str(directory / "policy-audit.db")},
        )
        self.url = f"http://127.0.0.1:{self.ports['api']}"
        self.tokens: dict[str, str] = {}
        self.keyexchange = FakeKeyExchange()
        self.dataplane = FakeDataplane()
        self.sealer = Sealer(Keyring.generate())
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="api-stack", daemon=True)
        self.store: Store
        self.audit_path = directory / "audit.db"

    # -- running coroutines on the stack's loop ------------------------------------------------
    def run(self, factory: Callable[[], Coroutine[Any, Any, T]], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(factory(), self.loop).result(timeout)

    def __enter__(self) -> ApiStack:
        self.thread.start()
        self.run(self._start)
        wait_until(lambda: httpx.get(self.url + "/healthz").status_code == 200, what="API up")
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.run(self._stop)
        finally:
            finish_loop_thread(self.loop, self.thread)

    def wipe_objects(self) -> None:
        """Delete every configuration and policy object (tokens stay), so that a test case
        starts from the same server state as the one before it."""

        async def wipe() -> None:
            for prefix in (schema.prefix("config"), schema.prefix("policy")):
                kvs, _ = await self.store.range(prefix)
                for start in range(0, len(kvs), 100):
                    await self.store.commit([], [Delete(kv.key) for kv in kvs[start : start + 100]])

        self.run(wipe)

    async def _start(self) -> None:
        if self.etcd_endpoint:
            self.store = EtcdStore([self.etcd_endpoint])
        else:
            self.store = EmbeddedStore(self.directory / "store.db")
        await self.store.connect()
        self.servers: list[ServiceServer] = []
        policy_server = ServiceServer(["esplanade.v1.Policy"], self.settings.grpc)
        policy_server.listen(self.settings.endpoints.policy)
        self.policy_audit = AuditLog(self.settings.policy.audit_log_path)
        self.sync = CompiledSync(self.store)
        policy_pb2_grpc.add_PolicyServicer_to_server(
            PolicyServicer(PolicyStore(self.store, self.policy_audit), self.sync), policy_server.server
        )
        self.sync_task = asyncio.create_task(self.sync.run())
        ke_server = ServiceServer(["esplanade.v1.KeyExchange"], self.settings.grpc)
        ke_server.listen(self.settings.endpoints.keyexchange)
        keyexchange_pb2_grpc.add_KeyExchangeServicer_to_server(self.keyexchange, ke_server.server)
        dp_server = ServiceServer(["esplanade.v1.Dataplane"], self.settings.grpc)
        dp_server.listen(self.settings.endpoints.dataplane)
        dataplane_pb2_grpc.add_DataplaneServicer_to_server(self.dataplane, dp_server.server)
        for server in (policy_server, ke_server, dp_server):
            await server.start()
            await server.set_serving(True)
            self.servers.append(server)
        for scope in Scope:
            token_id, token = new_token()
            doc = token_document(f"test-{scope.value}", scope, token)
            await self.store.put(schema.api_token(token_id), json.dumps(doc).encode())
            self.tokens[scope.value] = token
        self.app = create_app(self.settings, self.store, self.sealer)
        self.server = ApiServer(server_config(self.settings, self.app), self.app)
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self.server_task = asyncio.create_task(self.server.serve())
        await self.sync.ready.wait()

    async def _stop(self) -> None:
        self.server.should_exit = True
        try:
            await asyncio.wait_for(self.server_task, 10)
        except TimeoutError:
            self.server.force_exit = True
        self.sync_task.cancel()
        for server in self.servers:
            await server.stop(0)
        self.policy_audit.close()
        await self.store.close()

    # -- helpers ---------------------------------------------------------------------------------
    def client(self, scope: str | None = "admin") -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[scope]}"} if scope else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def store_dump(self, prefix: str = schema.ROOT) -> dict[str, bytes]:
        async def dump() -> dict[str, bytes]:
            kvs, _ = await self.store.range(prefix)
            return {kv.key: kv.value for kv in kvs}

        return self.run(dump)
