"""Which Child SAs this dataplane node carries: the one place that decides.

Two modes (`dataplane.ownership`):

* ``single``: this node carries every Child SA in the store (one dataplane per store).
* ``rendezvous``: several nodes share the store. Each Child SA has one owner, recorded in
  `dataplane/owners/<child_sa_id>` under the owner's membership lease; the node that should
  own it is the rendezvous (HRW) winner of its *affinity key* over the live members that
  accept SAs (`esplanade.cluster.rendezvous`, weighted by advertised capacity).
  `ownership_sync.OwnershipSync` claims and releases the records; this class only answers.

A node carries an SA only while three things hold: the owner record names this node, it was
written under the lease this node holds now, and that lease is provably alive (counted from
the send time of the last successful keepalive, `esplanade.cluster.lease_clock`). A node cut
off from the store therefore stops carrying its SAs before etcd can expire its lease and let
a survivor claim them: two nodes never send under one SA at the same time.

Affinity key: the local tunnel address of the SA (`inbound.dst`). Traffic reaches an owner
because the owner holds that address (`tunnel_steering`), so every SA behind one address
(rekeyed pairs, several Child SAs of one peer) must live on the same node.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from esplanade.cluster.rendezvous import choose
from esplanade.ipsec.sa import ChildSaRecord
from esplanade.ipsec.spd import SpdPolicy


@dataclass(frozen=True, slots=True)
class OwnerRecord:
    """`dataplane/owners/<child_sa_id>` as read from the store."""

    node: str
    lease: int
    revision: int  # mod_revision of the key


def affinity_key(record: ChildSaRecord) -> str:
    return record.inbound.dst


def desired_owner(record: ChildSaRecord, members: Mapping[str, float]) -> str | None:
    return choose(affinity_key(record), members)


class SaOwnership:
    def __init__(
        self,
        node: str,
        *,
        mode: str = "single",
        lease_id: Callable[[], int] = lambda: 0,
        lease_valid: Callable[[], bool] = lambda: True,
    ) -> None:
        self.node = node
        self.mode = mode
        self.lease_id = lease_id
        self.lease_valid = lease_valid
        self.owners: dict[str, OwnerRecord] = {}  # child_sa_id -> its owner record (any node)
        self.releasing: set[str] = set()  # ours, being handed over: stop carrying now

    @property
    def shared(self) -> bool:
        return self.mode == "rendezvous"

    def holds_record(self, child_sa_id: str) -> bool:
        """The owner record names us under our current lease (whether or not the lease is provable now)."""
        owner = self.owners.get(child_sa_id)
        lease = self.lease_id()
        return owner is not None and owner.node == self.node and lease != 0 and owner.lease == lease

    def owns(self, record: ChildSaRecord) -> bool:
        if not self.shared:
            return True
        return self.holds_record(record.id) and record.id not in self.releasing and self.lease_valid()

    def owner_of(self, child_sa_id: str) -> str:
        if not self.shared:
            return self.node
        owner = self.owners.get(child_sa_id)
        return owner.node if owner is not None else ""

    def carries_policy(self, policy: SpdPolicy) -> bool:
        """Every node holds every policy (the SPD is small and each node must classify all traffic)."""
        return True
