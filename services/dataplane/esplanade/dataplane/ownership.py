"""Which Child SAs and policies this dataplane node carries: the one place that decides.

Today one node owns everything. Scale-out replaces `owns` with rendezvous hashing of the
Child SA id over the live members under `dataplane/nodes/` (with `dataplane/owners/<id>`
recording the winner under its lease); every caller already asks here and nowhere else.
"""

from __future__ import annotations

from esplanade.ipsec.sa import ChildSaRecord
from esplanade.ipsec.spd import SpdPolicy


class SaOwnership:
    def __init__(self, node: str) -> None:
        self.node = node

    def owns(self, record: ChildSaRecord) -> bool:
        return True

    def carries_policy(self, policy: SpdPolicy) -> bool:
        """Every node holds every policy (the SPD is small and each node must classify all traffic)."""
        return True
