"""Figures: medians and p99 over repeated trials, and the table they make."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def p99(xs: Sequence[float]) -> float:
    """The 99th percentile (nearest rank): with fewer than 100 samples, the largest."""
    if not xs:
        return math.nan
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


@dataclass
class Figure:
    """One row of the table."""

    key: str  # "B1"
    what: str
    ours: str  # the measured figure, in words ("+38 ms median, +95 ms p99")
    baseline: str  # the same-run baseline, in words ("—" where the issue names none)
    ratio: str  # ours against the baseline ("0.93x"), or the absolute figure's unit
    goal: str
    met: bool | None  # None: not measured (why in ``notes``)
    notes: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return {True: "met", False: "MISSED", None: "not measured"}[self.met]


def table(figures: Sequence[Figure]) -> str:
    """A Markdown table (it reads as plain text on a terminal too)."""
    head = ["#", "figure", "ours", "baseline (same run)", "ratio", "goal", "verdict"]
    rows = [[f.key, f.what, f.ours, f.baseline, f.ratio, f.goal, f.verdict] for f in figures]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def signed_ms(seconds: float) -> str:
    """A difference: +5.0 ms, -3.2 ms."""
    return f"{seconds * 1000:+.1f} ms"
