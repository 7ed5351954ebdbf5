"""The benchmark record: one measured figure, with the peer measured in the same run."""

from __future__ import annotations

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
