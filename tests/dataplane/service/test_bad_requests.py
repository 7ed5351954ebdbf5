"""Bad SA and policy requests get a clear gRPC error, and nothing of them is left anywhere:
the store holds exactly what it held before, and the backend carries nothing new."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest

from demo.manual_sites import SiteService, TunnelKeys, child_sa_for, tunnel_policies
from esplanade.store import schema
from esplanade.store.embedded import EmbeddedStore
from esplanade.v1 import dataplane_pb2, ipsec_pb2
from tests.dataplane.service.conftest import store_path
from tests.netns_topology import Node, Topology

pytestmark = [pytest.mark.netns]


def store_dump(site: SiteService) -> dict[str, bytes]:
    """Every key and value under /esplanade/v1/ except the node's own membership record."""

    async def read() -> dict[str, bytes]:
        async with EmbeddedStore(store_path(site)) as store:
            kvs, _ = await store.range(schema.ROOT)
        return {kv.key: kv.value for kv in kvs if not kv.key.startswith(schema.prefix("dataplane", "nodes"))}

    return asyncio.run(read())


def backend_holds(site: SiteService) -> tuple[int, int, list[str], list[int]]:
    with site.client() as stub:
        status = stub.GetStatus(dataplane_pb2.GetStatusRequest(), timeout=10)
        listed = stub.ListPolicies(dataplane_pb2.ListPoliciesRequest(), timeout=10)
        counters = stub.GetCounters(dataplane_pb2.GetCountersRequest(), timeout=10)
    return status.child_sas, status.policies, [p.id for p in listed.policies], sorted(c.spi for c in counters.sas)


@pytest.fixture
def site(two_sites: tuple[Topology, SiteService, SiteService]) -> Iterator[tuple[SiteService, Node, Node]]:
    topo, site_a, _ = two_sites
    a, b = topo.nodes
    yield site_a, a, b
    with site_a.client() as stub:  # leave the shared site empty for the next test
        for policy in stub.ListPolicies(dataplane_pb2.ListPoliciesRequest(), timeout=10).policies:
            stub.DeletePolicy(dataplane_pb2.DeletePolicyRequest(id=policy.id), timeout=10)
        for sa in {c.child_sa for c in stub.GetCounters(dataplane_pb2.GetCountersRequest(), timeout=10).sas}:
            stub.DeleteChildSa(dataplane_pb2.DeleteChildSaRequest(id=sa), timeout=10)


def refused(site: SiteService, call: str, request: object, code: grpc.StatusCode) -> str:
    with site.client() as stub, pytest.raises(grpc.RpcError) as caught:
        getattr(stub, call)(request, timeout=20)
    error = caught.value
    assert error.code() == code, error.details()
    return str(error.details())


def install(site: SiteService, child: ipsec_pb2.ChildSa) -> dataplane_pb2.InstallChildSaRequest:
    return dataplane_pb2.InstallChildSaRequest(child_sa=child)


def test_invalid_key_length_and_unknown_transforms(site: tuple[SiteService, Node, Node]) -> None:
    service, a, b = site
    before, held = store_dump(service), backend_holds(service)
    keys = TunnelKeys.generate()
    short = child_sa_for(a, b, keys, local_is_a=True, udp=True, child_id="short-key")
    short.outbound.encr_key = b"\x42" * 7
    message = refused(service, "InstallChildSa", install(service, short), grpc.StatusCode.INVALID_ARGUMENT)
    assert "aes128gcm16 needs 20 bytes of key material, got 7" in message
    assert "42" * 7 not in message and keys.key_ab.hex() not in message

    unknown = child_sa_for(a, b, keys, local_is_a=True, udp=True, child_id="unknown-encr")
    unknown.inbound.encr = "aes128gcm12"
    message = refused(service, "InstallChildSa", install(service, unknown), grpc.StatusCode.INVALID_ARGUMENT)
    assert "inbound.encr: unknown transform 'aes128gcm12'" in message

    unknown_integ = child_sa_for(a, b, keys, local_is_a=True, udp=True, child_id="unknown-integ")
    unknown_integ.outbound.integ = "md5"
    refused(service, "InstallChildSa", install(service, unknown_integ), grpc.StatusCode.INVALID_ARGUMENT)

    transport = child_sa_for(a, b, keys, local_is_a=True, udp=True, child_id="transport")
    transport.inbound.mode = transport.outbound.mode = ipsec_pb2.MODE_TRANSPORT
    message = refused(service, "InstallChildSa", install(service, transport), grpc.StatusCode.FAILED_PRECONDITION)
    assert "tunnel mode only" in message

    bad_id = child_sa_for(a, b, keys, local_is_a=True, udp=True, child_id="a/b")
    refused(service, "InstallChildSa", install(service, bad_id), grpc.StatusCode.INVALID_ARGUMENT)
    refused(service, "DeleteChildSa", dataplane_pb2.DeleteChildSaRequest(id="nothing"), grpc.StatusCode.NOT_FOUND)
    refused(
        service,
        "UpdateChildSa",
        install(service, child_sa_for(a, b, keys, local_is_a=True, udp=True, child_id="nothing")),
        grpc.StatusCode.NOT_FOUND,
    )
    assert store_dump(service) == before
    assert backend_holds(service) == held


def test_duplicate_spi_and_duplicate_id(site: tuple[SiteService, Node, Node]) -> None:
    service, a, b = site
    keys = TunnelKeys.generate()
    with service.client() as stub:
        stub.InstallChildSa(
            install(service, child_sa_for(a, b, keys, local_is_a=True, udp=True, child_id="first")), timeout=20
        )
    before, held = store_dump(service), backend_holds(service)
    assert schema.install_ack("first", "site-a") in before and held[0] == 1

    same_inbound = child_sa_for(a, b, TunnelKeys.generate(), local_is_a=True, udp=True, child_id="second")
    same_inbound.inbound.spi = keys.spi_ba
    message = refused(service, "InstallChildSa", install(service, same_inbound), grpc.StatusCode.ALREADY_EXISTS)
    assert f"inbound SPI {keys.spi_ba:#010x} is used by Child SA 'first'" in message

    same_outbound = child_sa_for(a, b, TunnelKeys.generate(), local_is_a=True, udp=True, child_id="third")
    same_outbound.outbound.spi = keys.spi_ab
    refused(service, "InstallChildSa", install(service, same_outbound), grpc.StatusCode.ALREADY_EXISTS)

    again = child_sa_for(a, b, TunnelKeys.generate(), local_is_a=True, udp=True, child_id="first")
    refused(service, "InstallChildSa", install(service, again), grpc.StatusCode.ALREADY_EXISTS)
    # the live SA's own anti-replay floor is written by its worker whenever it likes; the
    # refusals must leave everything else exactly as it was
    own_floor = schema.replay_high_water(keys.spi_ba)
    after = store_dump(service)
    assert {k: v for k, v in after.items() if k != own_floor} == {k: v for k, v in before.items() if k != own_floor}
    assert backend_holds(service) == held


def test_overlapping_selectors(site: tuple[SiteService, Node, Node]) -> None:
    service, a, b = site
    out, inbound = tunnel_policies(a, b, "overlap")
    with service.client() as stub:
        stub.InstallPolicy(dataplane_pb2.InstallPolicyRequest(policy=out), timeout=20)
    before, held = store_dump(service), backend_holds(service)

    narrower = ipsec_pb2.SpdPolicy()
    narrower.CopyFrom(out)
    narrower.id = "overlap-narrower"
    narrower.local_ts.text = "10.80.1.0/25"
    message = refused(
        service, "InstallPolicy", dataplane_pb2.InstallPolicyRequest(policy=narrower), grpc.StatusCode.ALREADY_EXISTS
    )
    assert "overlaps policy 'overlap-out'" in message

    broken = ipsec_pb2.SpdPolicy()
    broken.CopyFrom(out)
    broken.id = "broken"
    broken.remote_ts.text = "10.80.2.0/33"
    refused(
        service, "InstallPolicy", dataplane_pb2.InstallPolicyRequest(policy=broken), grpc.StatusCode.INVALID_ARGUMENT
    )
    mixed = ipsec_pb2.SpdPolicy()
    mixed.CopyFrom(out)
    mixed.id = "mixed"
    mixed.remote_ts.text = "fd80::/64"
    refused(
        service, "InstallPolicy", dataplane_pb2.InstallPolicyRequest(policy=mixed), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert store_dump(service) == before
    assert backend_holds(service) == held

    # the same selectors at another priority, or in the other direction, are fine
    narrower.priority = 10
    with service.client() as stub:
        stub.InstallPolicy(dataplane_pb2.InstallPolicyRequest(policy=narrower), timeout=20)
        stub.InstallPolicy(dataplane_pb2.InstallPolicyRequest(policy=inbound), timeout=20)
    assert backend_holds(service)[1] == 3
