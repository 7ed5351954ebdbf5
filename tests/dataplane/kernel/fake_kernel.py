"""A stand-in for `XfrmClient` with kernel-like refusals (duplicates, missing entries), an
injectable failure at the n-th change, and per-SA packet counts that drive the sequence
numbers the way the kernel's do."""

from __future__ import annotations

from esplanade.dataplane.backend import AlreadyExists, DataplaneError, NotFound, Unsupported
from esplanade.dataplane.kernel.xfrm_policy import XfrmPolicy, XfrmPolicyKey
from esplanade.dataplane.kernel.xfrm_sa import XfrmReplayState, XfrmSa, XfrmSaId, XfrmSaState


class FakeKernel:
    """The subset of XfrmClient the backend uses, with kernel-like refusals."""

    def __init__(self) -> None:
        self.sas: dict[XfrmSaId, XfrmSa] = {}
        self.policies: dict[XfrmPolicyKey, XfrmPolicy] = {}
        self.changes = 0
        self.fail_at: int | None = None  # the n-th change (1-based) raises
        self.failure: DataplaneError = Unsupported("injected failure")
        self.packets: dict[XfrmSaId, int] = {}

    def _change(self) -> None:
        self.changes += 1
        if self.fail_at == self.changes:
            raise self.failure

    def add_sa(self, sa: XfrmSa) -> None:
        self._change()
        if sa.id in self.sas:
            raise AlreadyExists(f"{sa.id} already exists")
        self.sas[sa.id] = sa

    def delete_sa(self, sa_id: XfrmSaId, *, mark: tuple[int, int] | None = None) -> None:
        self._change()
        if self.sas.pop(sa_id, None) is None:
            raise NotFound(f"{sa_id} not found")

    def add_policy(self, policy: XfrmPolicy) -> None:
        self._change()
        if policy.key in self.policies:
            raise AlreadyExists(f"{policy.key} already exists")
        self.policies[policy.key] = policy

    def update_policy(self, policy: XfrmPolicy) -> None:
        self._change()
        self.policies[policy.key] = policy

    def delete_policy(self, key: XfrmPolicyKey) -> None:
        self._change()
        if self.policies.pop(key, None) is None:
            raise NotFound(f"{key} not found")

    def dump_sas(self) -> list[XfrmSaState]:
        out = []
        for sa in self.sas.values():
            packets = self.packets.get(sa.id, 0)
            out.append(XfrmSaState(sa, 100 * packets, packets, 0, 0, 0, 0, 0, self.replay(sa)))
        return out

    def dump_policies(self) -> list[XfrmPolicy]:
        return list(self.policies.values())

    def get_policy(self, key: XfrmPolicyKey) -> XfrmPolicy:
        if key not in self.policies:
            raise NotFound(f"{key} not found")
        return self.policies[key]

    def replay(self, sa: XfrmSa) -> XfrmReplayState:
        """Sequence numbers: where the SA started (`initial_replay`) plus the packets since."""
        start = sa.initial_replay or XfrmReplayState()
        sent = self.packets.get(sa.id, 0)
        return XfrmReplayState(
            oseq=(start.last_sent + sent) & 0xFFFFFFFF,
            oseq_hi=(start.last_sent + sent) >> 32,
            seq=(start.highest_received + sent) & 0xFFFFFFFF,
            seq_hi=(start.highest_received + sent) >> 32,
        )

    def get_replay_state(self, sa_id: XfrmSaId, *, src: str = "", reqid: int = 0) -> XfrmReplayState:
        if sa_id not in self.sas:
            raise NotFound(f"{sa_id} not found")
        return self.replay(self.sas[sa_id])
