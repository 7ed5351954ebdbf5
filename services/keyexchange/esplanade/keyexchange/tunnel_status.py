"""Whether each configured connection is up, and if not, why: the `esplanade.tunnel.up` gauge
and the tunnels of `esplanade ctl status`.

A connection is up when one of its IKE SAs is established and carries an installed Child SA.
When it is not, the reason is the last thing that went wrong for it (a failed exchange with
its notify, a timeout of a dead peer, a deleted IKE SA), or what it is doing now
(connecting), or that nothing brought it up yet.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from esplanade.keyexchange.ikev2.child_sa import ChildState
from esplanade.keyexchange.ikev2.dispatcher import IkeDispatcher
from esplanade.keyexchange.ikev2.events import (
    ChildSaDeleted,
    Event,
    IkeSaDeleted,
    IkeSaEstablished,
    NegotiationFailed,
)
from esplanade.keyexchange.ikev2.ike_sa import IkeState

UP_STATES = frozenset({IkeState.ESTABLISHED, IkeState.REKEYING, IkeState.REKEYED})
CARRYING = frozenset({ChildState.INSTALLED, ChildState.REKEYING})
TIMEOUT = "TIMEOUT"


def failure_reason(ev: NegotiationFailed) -> str:
    """A bounded label for a failed negotiation: the notify name, or TIMEOUT for a dead peer."""
    if not ev.notify:
        return TIMEOUT if "did not answer" in ev.reason else "ERROR"
    return ev.notify_name


@dataclass(frozen=True)
class TunnelState:
    connection: str
    up: bool
    reason: str
    ike_sas: int
    child_sas: int
    since: float  # wall-clock seconds of the last change we saw (0: none yet)


class TunnelStatus:
    def __init__(
        self, dispatcher: IkeDispatcher, connection_of: dict[str, str], clock: Callable[[], float] = time.time
    ) -> None:
        self.dispatcher = dispatcher
        self.connection_of = connection_of
        self.clock = clock
        self._last: dict[str, tuple[str, float]] = {}  # connection -> (what happened, when)
        self._established: set[str] = set()  # IKE SA ids that reached ESTABLISHED

    def observe(self, ev: Event) -> None:
        connection = self.connection_of.get(ev.ike_sa, "")
        if not connection:
            return
        now = self.clock()
        if isinstance(ev, IkeSaEstablished):
            self._established.add(ev.ike_sa)
            self._last[connection] = ("established", now)
        elif isinstance(ev, NegotiationFailed):
            where = f"{ev.exchange} " if ev.exchange else ""
            self._last[connection] = (f"{where}failed: {failure_reason(ev)} ({ev.reason})", now)
        elif isinstance(ev, IkeSaDeleted):
            if ev.ike_sa in self._established:
                self._established.discard(ev.ike_sa)
                self._last[connection] = (f"IKE SA deleted: {ev.reason or 'no reason given'}", now)
        elif isinstance(ev, ChildSaDeleted) and ev.reason:
            self._last[connection] = (f"Child SA deleted: {ev.reason}", now)

    def states(self) -> list[TunnelState]:
        sas = list(self.dispatcher.sas.values())
        out = []
        for name in sorted(self.dispatcher.configs):
            mine = [sa for sa in sas if sa.config.name == name and sa.state != IkeState.DELETED]
            established = [sa for sa in mine if sa.state in UP_STATES]
            children = sum(
                1
                for sa in established
                for c in sa.children.values()
                if c.state in (ChildState.INSTALLED, ChildState.REKEYING)
            )
            what, when = self._last.get(name, ("", 0.0))
            up = bool(established) and children > 0
            if up:
                reason = "established"
            elif established:
                reason = "IKE SA established, no Child SA installed"
            elif mine:
                reason = f"connecting ({mine[0].state.value})" + (f"; last: {what}" if what else "")
            else:
                reason = what or "not initiated"
            out.append(TunnelState(name, up, reason, len(mine), children, when))
        return out
