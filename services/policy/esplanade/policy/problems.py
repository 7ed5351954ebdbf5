"""What is wrong with a policy: located problems and the error that carries all of them.

A `Problem` names where (a path into the policy document, and the line and column when the
policy came from a YAML file) and what. Loading never stops at the first problem: every
problem is collected and the whole policy is rejected together.
"""

from __future__ import annotations

from dataclasses import dataclass

# A path into the policy document: ("rules", 3, "groups", 1) is the second group of the
# fourth rule. Strings are mapping keys, ints are list indexes.
Path = tuple[str | int, ...]


def format_path(path: Path) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


@dataclass(frozen=True, slots=True)
class Problem:
    path: Path
    message: str
    line: int = 0  # 1-based; 0 when unknown (documents from the store carry no lines)
    column: int = 0

    def __str__(self) -> str:
        if self.line:
            return f"line {self.line}, column {self.column}: {self.message}"
        where = format_path(self.path)
        return f"{where}: {self.message}" if where else self.message


class PolicyError(Exception):
    """A policy (file, document set or single document) was rejected; nothing of it applies."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        count = len(self.problems)
        head = f"policy rejected: {count} problem{'s' if count != 1 else ''}"
        super().__init__("\n".join([head, *(f"  {p}" for p in self.problems)]))
