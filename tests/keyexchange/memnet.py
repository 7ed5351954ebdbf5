"""Two (or more) IKE dispatchers joined by an in-memory network with a fake clock."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from esplanade.keyexchange.ikev2.dispatcher import IkeDispatcher
from esplanade.keyexchange.ikev2.events import Datagram, Event, InstallInboundSa

Drop = Callable[[Datagram], bool]


@dataclass
class Node:
    name: str
    ip: str
    engine: IkeDispatcher
    events: list[Event] = field(default_factory=list)
    auto_ack: bool = True
    held_installs: list[InstallInboundSa] = field(default_factory=list)

    def of(self, cls: type) -> list:
        return [e for e in self.events if isinstance(e, cls)]


class MemNet:
    def __init__(self) -> None:
        self.now = 1000.0
        self.nodes: dict[str, Node] = {}
        self.in_flight: list[tuple[Datagram, str]] = []
        self.drop: Drop | None = None
        self.nat: dict[str, tuple[str, int]] = {}  # node ip -> translated (ip, port) as seen by peers
        self.delivered = 0
        self.nat_reverse: dict[str, tuple[str, int]] = {}
        self.received: list[tuple[Datagram, tuple[str, int]]] = []
        self.log: list[Datagram] = []

    def add(self, name: str, ip: str, engine: IkeDispatcher) -> Node:
        n = Node(name, ip, engine)
        self.nodes[ip] = n
        return n

    def add_nat(self, inside_ip: str, public_ip: str, port_base: int) -> None:
        """Source-NAT `inside_ip` to public_ip:port_base (IKE 500) / port_base+1 (4500)."""
        self.nat[inside_ip] = (public_ip, port_base)
        self.nat_reverse[public_ip] = (inside_ip, port_base)
        self.nodes[public_ip] = self.nodes[inside_ip]

    def collect(self, node: Node) -> None:
        for d in node.engine.datagrams_to_send():
            self.log.append(d)
            self.in_flight.append((d, node.ip))
        while (ev := node.engine.next_event()) is not None:
            node.events.append(ev)
            if isinstance(ev, InstallInboundSa):
                if node.auto_ack:
                    node.engine.inbound_sa_installed(ev.ike_sa, ev.child_id, self.now)
                else:
                    node.held_installs.append(ev)
        if node.engine.datagrams_to_send.__self__._datagrams:  # type: ignore[attr-defined]
            self.collect(node)

    def step(self) -> bool:
        """Deliver everything in flight once; True if anything moved."""
        for n in self.nodes.values():
            self.collect(n)
        if not self.in_flight:
            return False
        batch, self.in_flight = self.in_flight, []
        for d, sender_ip in batch:
            if self.drop is not None and self.drop(d):
                continue
            dst = self.nodes.get(d.remote[0])
            if dst is None:
                continue
            src = d.local
            if sender_ip in self.nat:
                nat_ip, nat_port = self.nat[sender_ip]
                src = (nat_ip, nat_port + (0 if d.local[1] == 500 else 1))
            local = d.remote
            if local[0] in self.nat_reverse:
                real_ip, base = self.nat_reverse[local[0]]
                local = (real_ip, 500 if local[1] == base else 4500)
            self.delivered += 1
            self.received.append((d, src))
            dst.engine.receive_datagram(d.wire_bytes(), local, src, self.now)
            self.collect(dst)
        return True

    def run(self, max_steps: int = 100) -> None:
        for _ in range(max_steps):
            if not self.step():
                return
        raise AssertionError("network did not settle")

    def advance(self, seconds: float) -> None:
        """Move the clock forward, firing timers in order."""
        end = self.now + seconds
        while True:
            self.run()
            timers = [t for n in self.nodes.values() if (t := n.engine.get_timer()) is not None and t <= end]
            if not timers:
                break
            self.now = max(self.now, min(timers))
            for n in self.nodes.values():
                t = n.engine.get_timer()
                if t is not None and t <= self.now:
                    n.engine.handle_timer(self.now)
                    self.collect(n)
        self.now = end
        self.run()
