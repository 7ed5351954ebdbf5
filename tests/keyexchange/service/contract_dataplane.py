"""A test dataplane that follows the `Dataplane` contract keyexchange relies on, as a process.

Until the real dataplane service lands, this is what sits between keyexchange and the wire
in the service tests: it owns UDP 500/4500, relays IKE over `RelayIke` (payload without the
non-ESP marker), watches `sas/child/` and `spd/` in the store, installs the Child SAs into
the test ESP tunnel (tests/keyexchange/esp_tunnel.py) on a TUN device, writes
`dataplane/acks/<child>/<node>`, picks the outbound SA by SPD lookup (lowest priority value
wins; a trap entry raises an `acquire`), checks decrypted packets against the Child SA's
selectors (a miss is counted as `policy_mismatch` and dropped), and serves `GetCounters`
and `WatchEvents`.

    python -m tests.keyexchange.service.contract_dataplane --store DB --kek RING --ip 198.18.0.2 \
        --listen 127.0.0.1:50062 --tun esp0 --node dp1
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import os
import socket
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from esplanade.ipsec.sa import ChildSaRecord
from esplanade.ipsec.spd import PolicyDirection, SpdPolicy
from esplanade.store import schema
from esplanade.store.base import EventType, Resync, Store, WatchBatch
from esplanade.store.embedded import EmbeddedStore
from esplanade.store.sealing import Keyring, Sealer
from esplanade.v1 import dataplane_pb2, dataplane_pb2_grpc, ipsec_pb2
from tests.keyexchange.esp_tunnel import EspState, open_tun

log = logging.getLogger("contract_dataplane")
MARKER = b"\x00\x00\x00\x00"


@dataclass
class Installed:
    record: ChildSaRecord
    inbound: EspState
    outbound: EspState


@dataclass
class Counts:
    bytes_in: int = 0
    bytes_out: int = 0
    packets_in: int = 0
    packets_out: int = 0


@dataclass
class ContractDataplane:
    store: Store
    sealer: Sealer
    ip: str
    node: str
    tun_fd: int
    children: dict[str, Installed] = field(default_factory=dict)
    by_spi: dict[int, Installed] = field(default_factory=dict)
    policies: dict[str, SpdPolicy] = field(default_factory=dict)
    drops: dict[str, int] = field(default_factory=dict)
    relays: set[asyncio.Queue[dataplane_pb2.IkeDatagram]] = field(default_factory=set)
    watchers: set[asyncio.Queue[dataplane_pb2.DataplaneEvent]] = field(default_factory=set)
    socks: dict[int, socket.socket] = field(default_factory=dict)
    acquired: dict[str, float] = field(default_factory=dict)

    def drop(self, why: str) -> None:
        self.drops[why] = self.drops.get(why, 0) + 1

    def emit(self, kind: str, child_sa: str = "", policy: str = "", spi: int = 0) -> None:
        ev = dataplane_pb2.DataplaneEvent(
            time=time.time(), kind=kind, child_sa=child_sa, policy=policy, spi=spi, node=self.node
        )
        for q in self.watchers:
            q.put_nowait(ev)

    # -- UDP ---------------------------------------------------------------------------------
    def open_sockets(self) -> None:
        loop = asyncio.get_running_loop()
        for port in (500, 4500):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((self.ip, port))
            s.setblocking(False)
            self.socks[port] = s
            loop.add_reader(s.fileno(), self.on_udp, port)
        loop.add_reader(self.tun_fd, self.on_tun)

    def on_udp(self, port: int) -> None:
        s = self.socks[port]
        while True:
            try:
                data, addr = s.recvfrom(65535)
            except BlockingIOError:
                return
            if port == 4500:
                if len(data) == 1 and data[0] == 0xFF:
                    continue
                if data[:4] != MARKER:
                    self.on_esp(data)
                    continue
                data = data[4:]
            dg = dataplane_pb2.IkeDatagram(
                local_addr=self.ip, local_port=port, remote_addr=addr[0], remote_port=addr[1], payload=data
            )
            for q in self.relays:
                q.put_nowait(dg)

    def send_ike(self, dg: dataplane_pb2.IkeDatagram) -> None:
        port = 4500 if dg.local_port == 4500 else 500
        data = MARKER + dg.payload if port == 4500 else dg.payload
        try:
            self.socks[port].sendto(data, (dg.remote_addr, dg.remote_port))
        except OSError:
            self.drop("ike_send_errors")

    # -- ESP -----------------------------------------------------------------------------------
    def on_esp(self, data: bytes) -> None:
        if len(data) < 8:
            self.drop("short")
            return
        inst = self.by_spi.get(struct.unpack("!I", data[:4])[0])
        if inst is None:
            self.drop("unknown_spi")
            return
        out = inst.inbound.decrypt(data)
        if out is None:
            self.drop("auth_or_replay")
            return
        inner, nh = out
        if nh not in (4, 41) or not inner:
            return
        src, dst, proto, port = _five(inner)
        rec = inst.record
        if not (
            any(t.matches(src, proto, port) for t in rec.inbound.remote_ts)
            and any(t.matches(dst, proto, port) for t in rec.inbound.local_ts)
        ):
            self.drop("policy_mismatch")
            return
        os.write(self.tun_fd, inner)

    def on_tun(self) -> None:
        while True:
            try:
                pkt = os.read(self.tun_fd, 65535)
            except BlockingIOError:
                return
            if not pkt or pkt[0] >> 4 != 4:
                self.drop("not_ipv4")
                continue
            src, dst, proto, port = _five(pkt)
            best: SpdPolicy | None = None
            for p in self.policies.values():
                if p.direction != PolicyDirection.OUT:
                    continue
                hit = p.local_ts.matches(src, proto, port) and p.remote_ts.matches(dst, proto, port)
                if hit and (best is None or p.priority < best.priority):
                    best = p
            if best is None:
                self.drop("no_policy")
                continue
            inst = self.children.get(best.child_sa) if best.child_sa else None
            if inst is None:
                if best.trap:
                    last = self.acquired.get(best.id, 0.0)
                    if time.monotonic() - last > 5.0:
                        self.acquired[best.id] = time.monotonic()
                        self.emit("acquire", policy=best.id)
                self.drop("no_sa")
                continue
            st = inst.outbound
            esp = st.encrypt(pkt, 4)
            sa = st.sa
            if sa.encap is None:
                self.drop("no_encap")
                continue
            self.socks[4500].sendto(esp, (sa.dst, sa.encap.dst_port))

    # -- the store -----------------------------------------------------------------------------
    async def follow(self, prefix: str) -> None:
        kvs, revision = await self.store.range(prefix)
        for kv in kvs:
            await self.apply(kv.key, kv.value)
        async for item in self.store.watch(prefix, revision + 1):
            if isinstance(item, Resync):
                for kv in item.kvs:
                    await self.apply(kv.key, kv.value)
                continue
            assert isinstance(item, WatchBatch)
            for ev in item.events:
                if ev.type == EventType.PUT:
                    await self.apply(ev.kv.key, ev.kv.value)
                else:
                    self.remove(ev.kv.key)

    async def apply(self, key: str, value: bytes) -> None:
        if key.startswith(schema.prefix("spd")):
            p = SpdPolicy.from_document(json.loads(value))
            self.policies[p.id] = p
            return
        record = ChildSaRecord.from_document(json.loads(value), self.sealer.bind(key).open)
        old = self.children.get(record.id)
        inst = Installed(record, EspState(record.inbound, child_id=record.id), EspState(record.outbound))
        if old is not None:  # an update keeps the counters and sequence numbers
            inst.inbound, inst.outbound = old.inbound, old.outbound
        self.children[record.id] = inst
        self.by_spi[record.inbound.spi] = inst
        await self.store.put(schema.install_ack(record.id, self.node), json.dumps({"at": time.time()}).encode())
        self.emit("installed", child_sa=record.id, spi=record.inbound.spi)

    def remove(self, key: str) -> None:
        if key.startswith(schema.prefix("spd")):
            self.policies.pop(key[len(schema.prefix("spd")) :], None)
            return
        cid = key[len(schema.prefix("sas", "child")) :]
        inst = self.children.pop(cid, None)
        if inst is not None:
            self.by_spi.pop(inst.record.inbound.spi, None)
            self.emit("deleted", child_sa=cid, spi=inst.record.inbound.spi)
            asyncio.get_running_loop().create_task(self.store.delete(schema.install_ack(cid, self.node)))


def _five(pkt: bytes) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address, int, int]:
    ihl = (pkt[0] & 0x0F) * 4
    proto = pkt[9]
    src, dst = ipaddress.IPv4Address(pkt[12:16]), ipaddress.IPv4Address(pkt[16:20])
    port = -1
    if proto in (6, 17) and len(pkt) >= ihl + 4:
        port = struct.unpack("!H", pkt[ihl + 2 : ihl + 4])[0]  # destination port
    elif proto == 1 and len(pkt) >= ihl + 2:
        port = pkt[ihl] << 8 | pkt[ihl + 1]
    return src, dst, proto, port


class Servicer(dataplane_pb2_grpc.DataplaneServicer):
    def __init__(self, dp: ContractDataplane) -> None:
        self.dp = dp

    async def RelayIke(
        self, request_iterator: AsyncIterator[dataplane_pb2.IkeDatagram], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[dataplane_pb2.IkeDatagram]:
        q: asyncio.Queue[dataplane_pb2.IkeDatagram] = asyncio.Queue()
        self.dp.relays.add(q)

        async def outgoing() -> None:
            async for dg in request_iterator:
                self.dp.send_ike(dg)

        task = asyncio.create_task(outgoing())
        try:
            while True:
                yield await q.get()
        finally:
            task.cancel()
            self.dp.relays.discard(q)

    async def GetCounters(
        self, request: dataplane_pb2.GetCountersRequest, context: grpc.aio.ServicerContext
    ) -> dataplane_pb2.GetCountersResponse:
        reply = dataplane_pb2.GetCountersResponse(node=self.dp.node)
        for cid, inst in self.dp.children.items():
            if request.child_sa and cid != request.child_sa:
                continue
            for direction, st in ((ipsec_pb2.DIRECTION_IN, inst.inbound), (ipsec_pb2.DIRECTION_OUT, inst.outbound)):
                reply.sas.append(
                    ipsec_pb2.SaCounters(
                        child_sa=cid,
                        spi=st.sa.spi,
                        direction=direction,
                        packets=st.packets,
                        bytes=st.bytes,
                        owner=self.dp.node,
                    )
                )
        for why, n in self.dp.drops.items():
            reply.drops.append(ipsec_pb2.DropCounter(reason=why, packets=n))
        return reply

    async def WatchEvents(
        self, request: dataplane_pb2.WatchDataplaneEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[dataplane_pb2.DataplaneEvent]:
        q: asyncio.Queue[dataplane_pb2.DataplaneEvent] = asyncio.Queue()
        self.dp.watchers.add(q)
        try:
            while True:
                yield await q.get()
        finally:
            self.dp.watchers.discard(q)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", required=True)
    ap.add_argument("--kek", required=True)
    ap.add_argument("--ip", required=True)
    ap.add_argument("--listen", default="127.0.0.1:50062")
    ap.add_argument("--tun", default="esp0")
    ap.add_argument("--node", default="dp1")
    ap.add_argument("--no-udp", action="store_true", help="leave UDP 500/4500 to keyexchange (transport=socket)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    store = EmbeddedStore(args.store)
    await store.connect()
    sealer = Sealer(Keyring.parse(args.kek, "--kek"))
    dp = ContractDataplane(store, sealer, args.ip, args.node, open_tun(args.tun))
    if args.no_udp:
        asyncio.get_running_loop().add_reader(dp.tun_fd, dp.on_tun)
    else:
        dp.open_sockets()
    server = grpc.aio.server()
    dataplane_pb2_grpc.add_DataplaneServicer_to_server(Servicer(dp), server)
    server.add_insecure_port(args.listen)
    await server.start()
    tasks = [
        asyncio.create_task(dp.follow(schema.prefix("sas", "child"))),
        asyncio.create_task(dp.follow(schema.prefix("spd"))),
    ]
    print("ready", flush=True)
    await asyncio.gather(*tasks)


if __name__ == "__main__":
    asyncio.run(main())
