"""Queries over several conditions (AND, NOT), every example image as the query, with `demo`.

    python benchmarks/combined_conditions.py [--k 5] [--queries N] [--json OUT]

Indexes examples/colorshape (120 images whose file names give colour, shape and background) under
"color", "shape" and "background", then asks, with each image as the query (by image_id, so the
query itself is left out), for every ordered pair A NOT B (weights 1, -1) and every pair A AND B
(weights 1, 1), and counts the top-k hits that keep A and differ in B (NOT) or share both (AND),
overall and per value of the query's B. Beside FocalSearch's fusion it scores the old one (a plain
weighted sum of cosines, where NOT favours the most different), exhaustively over the same vectors.
Goals (tests/test_search.py asserts them too): every A NOT B >= 98 % and >= 95 % for every value of
B; every A AND B >= 93 %.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from focalsearch import FocalSearch
from focalsearch.bench.combined import goals, measure, weighted_sum_ranking
from focalsearch.store import row_id

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "colorshape" / "images"
ATTRIBUTES = ("color", "shape", "background")


def attributes(path: str | Path) -> dict[str, str]:
    _, color, shape, _, background = Path(path).stem.split("-")
    return {"color": color, "shape": shape, "background": background}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--queries", type=int, default=None, help="only the first N images as queries (all by default)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    paths = [str(p.resolve()) for p in sorted(EXAMPLES.iterdir())]
    labels = [attributes(p) for p in paths]
    with tempfile.TemporaryDirectory() as folder:
        engine = FocalSearch(Path(folder) / "index", model="demo")
        engine.index([EXAMPLES], instructions=list(ATTRIBUTES))
        position = {p: i for i, p in enumerate(paths)}
        queries = range(len(paths) if args.queries is None else args.queries)

        def fused(q, conditions, k):
            hits = engine.search(image_id=row_id(paths[q]), conditions=conditions, k=k).results
            return [position[h.path] for h in hits]

        store = engine._open_store()
        vectors = {}
        for name in ATTRIBUTES:
            found = store.vectors_by_id(engine.condition(name), [row_id(p) for p in paths])
            vectors[name] = np.stack([found[row_id(p)] for p in paths])

        reports = {
            label: measure(ranking, labels, ATTRIBUTES, args.k, queries)
            for label, ranking in (("focalsearch", fused), ("weighted sum (old)", weighted_sum_ranking(vectors)))
        }
        engine.close()

    now, before = reports["focalsearch"], reports["weighted sum (old)"]
    print(f"top-{args.k} hits of {len(queries)} queries (each example image by image_id) that pass:")
    print(f"  {'query':<26} {'focalsearch':>12} {'worst value of B':>24}   {'weighted sum (old)':>18} {'worst value':>20}")
    for name, rate in now.items():
        w, wr = rate.worst_value
        ow, owr = before[name].worst_value
        print(f"  {name:<26} {rate.passed:>4}/{rate.counted:<4} {rate.rate:5.1%} {w:>14} {wr:7.1%}   "
              f"{before[name].passed:>4}/{before[name].counted:<4} {before[name].rate:6.1%} {ow:>12} {owr:7.1%}")
    verdicts = goals(now)
    for goal, holds in verdicts.items():
        print(f"goal: {goal}: {'holds' if holds else 'misses'}")
    if args.json:
        args.json.write_text(json.dumps({
            "k": args.k, "queries": len(queries),
            "rates": {label: {name: r.to_dict() for name, r in report.items()} for label, report in reports.items()},
            "goals": verdicts,
        }, indent=2))


if __name__ == "__main__":
    main()
