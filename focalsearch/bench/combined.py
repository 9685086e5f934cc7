"""Queries over several conditions, measured over every image of a labelled collection as the query.

Each image's labels (colour, shape, background, ...) say what a hit should share with its query:
- A AND B (weights 1, 1): a hit shares both A and B with the query;
- A NOT B (weights 1, -1): a hit shares A and differs in B.
The rates are over the top-k hits of every eligible query (one with at least k images in the
collection that would pass), overall and per value of the query's B, so that no value can hide
behind the others. The old fusion (a plain weighted sum of cosines, where NOT favours whatever is
most different) is scored beside it, exhaustively over the same rows, for comparison.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

GOAL_NOT = 0.98
GOAL_NOT_PER_VALUE = 0.95
GOAL_AND = 0.93


@dataclass
class Rate:
    """Passing hits over counted hits, overall and per value of the query's second attribute."""

    passed: int = 0
    counted: int = 0
    per_value: dict[str, list[int]] = field(default_factory=dict)

    def add(self, value: str, passed: int, counted: int) -> None:
        self.passed += passed
        self.counted += counted
        cell = self.per_value.setdefault(value, [0, 0])
        cell[0] += passed
        cell[1] += counted

    @property
    def rate(self) -> float:
        return self.passed / self.counted if self.counted else 0.0

    @property
    def worst_value(self) -> tuple[str, float]:
        rates = {v: p / c for v, (p, c) in self.per_value.items() if c}
        worst = min(rates, key=rates.get) if rates else ""
        return worst, rates.get(worst, 0.0)

    def to_dict(self) -> dict:
        worst, worst_rate = self.worst_value
        return {"passed": self.passed, "counted": self.counted, "rate": round(self.rate, 4),
                "worst_value": worst, "worst_value_rate": round(worst_rate, 4),
                "per_value": {v: {"passed": p, "counted": c} for v, (p, c) in sorted(self.per_value.items())}}


def passes(kind: str, a: str, b: str, query: Mapping[str, str], hit: Mapping[str, str]) -> bool:
    if kind == "AND":
        return hit[a] == query[a] and hit[b] == query[b]
    return hit[a] == query[a] and hit[b] != query[b]


def measure(
    ranked: Callable[[int, list[tuple[str, float]], int], Sequence[int]],
    labels: Sequence[Mapping[str, str]],
    attributes: Sequence[str],
    k: int,
    queries: Sequence[int] | None = None,
) -> dict[str, Rate]:
    """Rates of ``ranked(query position, conditions, k)`` (positions of the top-k hits, the query left out).

    ``queries`` are the positions asked as queries (all by default); eligibility counts the whole
    collection. Returns {"A NOT B" or "A AND B": Rate}, for every ordered pair (NOT) and every pair (AND).
    """
    report: dict[str, Rate] = {}
    setups = [("NOT", a, b) for a, b in itertools.permutations(attributes, 2)]
    setups += [("AND", a, b) for a, b in itertools.combinations(attributes, 2)]
    for kind, a, b in setups:
        rate = report.setdefault(f"{a} {kind} {b}", Rate())
        conditions = [(a, 1.0), (b, 1.0 if kind == "AND" else -1.0)]
        for q in range(len(labels)) if queries is None else queries:
            query = labels[q]
            eligible = sum(passes(kind, a, b, query, other) for j, other in enumerate(labels) if j != q)
            if eligible < k:
                continue
            hits = ranked(q, conditions, k)
            rate.add(query[b], sum(passes(kind, a, b, query, labels[h]) for h in hits), k)
    return report


def weighted_sum_ranking(vectors: Mapping[str, np.ndarray]):
    """The old fusion, exhaustively: rank every other row by the weighted sum of its cosines."""

    def ranked(q: int, conditions: list[tuple[str, float]], k: int) -> list[int]:
        score = sum(w * (vectors[name] @ vectors[name][q]) for name, w in conditions)
        score[q] = -np.inf
        return list(np.argsort(-score, kind="stable")[:k])

    return ranked


def goals(report: Mapping[str, Rate]) -> dict[str, bool]:
    """Whether each of the issue's goals holds for this report."""
    nots = [r for name, r in report.items() if " NOT " in name]
    ands = [r for name, r in report.items() if " AND " in name]
    return {
        f"every A NOT B >= {GOAL_NOT:.0%}": all(r.rate >= GOAL_NOT for r in nots),
        f"every A NOT B, every value of B >= {GOAL_NOT_PER_VALUE:.0%}": all(r.worst_value[1] >= GOAL_NOT_PER_VALUE for r in nots),
        f"every A AND B >= {GOAL_AND:.0%}": all(r.rate >= GOAL_AND for r in ands),
    }
