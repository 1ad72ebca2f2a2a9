"""A small, JSON-friendly record of what happened while reading data.

Batch functions in :mod:`fedface.data` never stop half-way because of one bad file. Instead they
record each problem in a :class:`DataReport` (kind, path, optional line, reason) and count every case
(problems and successes alike) in ``counts``, so the caller can print a summary at the end or fail
when a count is too high.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DataReport"]


@dataclass
class DataReport:
    """Counts per kind plus a list of problems ``{"kind", "path", "line"?, "reason"}``.

    ``max_stored`` caps how many problems are kept in memory (counts are always exact), so that a
    folder of a million broken files cannot exhaust memory; ``dropped`` says how many were not kept.
    """

    counts: dict[str, int] = field(default_factory=dict)
    problems: list[dict] = field(default_factory=list)
    max_stored: int = 100_000
    dropped: int = 0

    def bump(self, kind: str, n: int = 1) -> None:
        """Add ``n`` to the count of ``kind`` (creating it at 0)."""
        self.counts[kind] = self.counts.get(kind, 0) + int(n)

    def add(self, kind: str, path: str | Path | None, reason: str, line: int | None = None) -> None:
        """Record one problem and count it under ``kind``."""
        self.bump(kind)
        if len(self.problems) >= self.max_stored:
            self.dropped += 1
            return
        problem: dict[str, Any] = {"kind": str(kind), "path": "" if path is None else str(path)}
        if line is not None:
            problem["line"] = int(line)
        problem["reason"] = str(reason)
        self.problems.append(problem)

    def merge(self, other: DataReport) -> DataReport:
        """Add the counts and problems of ``other`` into this report; returns ``self``."""
        for kind, n in other.counts.items():
            self.bump(kind, n)
        room = max(0, self.max_stored - len(self.problems))
        self.problems.extend(dict(p) for p in other.problems[:room])
        self.dropped += other.dropped + max(0, len(other.problems) - room)
        return self

    def count(self, kind: str) -> int:
        """The count of ``kind`` (0 when never seen)."""
        return self.counts.get(kind, 0)

    def problems_of(self, kind: str) -> list[dict]:
        """The stored problems of one kind."""
        return [p for p in self.problems if p["kind"] == kind]

    @property
    def num_problems(self) -> int:
        return len(self.problems) + self.dropped

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return {
            "counts": {str(k): int(v) for k, v in sorted(self.counts.items())},
            "problems": [dict(p) for p in self.problems],
            "dropped": int(self.dropped),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataReport:
        report = cls(counts=dict(data.get("counts", {})), problems=list(data.get("problems", [])))
        report.dropped = int(data.get("dropped", 0))
        return report

    def summary_lines(self, max_problems: int = 10) -> list[str]:
        """Human-readable lines: the counts, then up to ``max_problems`` problems as
        ``kind: path:line: reason``."""
        lines: list[str] = []
        if self.counts:
            counts = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
            lines.append(f"counts: {counts}")
        else:
            lines.append("counts: (nothing recorded)")
        total = self.num_problems
        if total == 0:
            lines.append("no problems")
            return lines
        lines.append(f"{total} problem{'s' if total != 1 else ''}:")
        for p in self.problems[: max(0, max_problems)]:
            where = p.get("path", "")
            if p.get("line") is not None:
                where = f"{where}:{p['line']}"
            lines.append(f"  {p['kind']}: {where}: {p['reason']}")
        hidden = total - min(len(self.problems), max(0, max_problems))
        if hidden > 0:
            lines.append(f"  ... and {hidden} more")
        return lines

    def __str__(self) -> str:
        return "\n".join(self.summary_lines())
