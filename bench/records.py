"""The benchmark record: one measured figure, with the peer measured in the same run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Figure:
    name: str
    value: float
    unit: str
    peer: str | None = None
    peer_value: float | None = None
    higher_is_better: bool = True
    group: str = ""
    notes: str = ""

    @property
    def ratio(self) -> float | None:
        """value / peer_value, so > 1 means "more than the peer"."""
        if self.peer_value in (None, 0) or self.peer is None:
            return None
        return self.value / self.peer_value  # type: ignore[operator]

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if v not in (None, "")}
        if self.ratio is not None:
            data["ratio"] = round(self.ratio, 3)
        return data


def ratio_spread(name: str, ratios: Sequence[float], group: str) -> list[Figure]:
    """`<name>.min`, `.median` and `.max` of a ratio to strongSwan over several same-run sets."""
    ordered = sorted(ratios)
    notes = f"{len(ordered)} same-run sets: " + ", ".join(f"{r:.2f}" for r in ordered)
    picks = (("min", ordered[0]), ("median", ordered[len(ordered) // 2]), ("max", ordered[-1]))
    return [Figure(f"{name}.{label}", value, "x strongSwan", group=group, notes=notes) for label, value in picks]
