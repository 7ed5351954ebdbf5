"""The policy service process: the Policy gRPC servicer and the compiled-policy sync."""

from __future__ import annotations

import logging

from esplanade.config.settings import Settings
from esplanade.journal.audit import AuditLog
from esplanade.policy.apply import recover_interrupted_apply
from esplanade.policy.compiled_sync import CompiledSync
from esplanade.policy.servicer import PolicyServicer
from esplanade.policy.store_state import PolicyStore
from esplanade.runtime.service_host import ServiceContext, run_service
from esplanade.store.factory import open_store
from esplanade.v1 import policy_pb2, policy_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = policy_pb2.DESCRIPTOR.services_by_name["Policy"].full_name


async def setup_policy(ctx: ServiceContext) -> PolicyServicer:
    """Register the servicer on `ctx.server` and start the sync; return the servicer."""
    audit = AuditLog(ctx.settings.policy.audit_log_path)
    policy_store = PolicyStore(ctx.store, audit)
    await recover_interrupted_apply(policy_store)
    sync = CompiledSync(ctx.store)
    servicer = PolicyServicer(policy_store, sync)
    policy_pb2_grpc.add_PolicyServicer_to_server(servicer, ctx.server.server)
    ctx.spawn(sync.run(), "compiled-sync")
    ctx.readiness.append(sync.ready.is_set)

    async def close_audit() -> None:
        audit.close()

    ctx.on_stop.append(close_audit)
    return servicer


async def _setup(ctx: ServiceContext) -> None:
    await setup_policy(ctx)


async def serve(settings: Settings) -> None:
    store = open_store(settings.store)
    await run_service("policy", settings.endpoints.policy, settings, store, _setup, [SERVICE_NAME])
