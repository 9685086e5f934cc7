"""Queries over several conditions against single ones, on the example collection with `demo`.

    python benchmarks/combined_conditions.py [--queries 20] [--k 3] [--json OUT]

Indexes examples/colorshape (120 images whose file names give colour, shape and background) under
"color", "shape" and "background", then takes the first N images as queries (by image_id, so the
query itself is left out) and counts, over their top-k hits, how many:
- share both shape and background, under "shape" alone, "background" alone, and shape AND
  background (weights 1, 1); only queries with at least k such images in the collection count;
- share the shape but not the colour, under "shape" alone and shape but NOT colour (1, -1).
Goals (tests/test_server.py asserts them too): shape AND background >= 90 % of top-3 hits share both.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from focalsearch import FocalSearch
from focalsearch.store import row_id

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "colorshape" / "images"
GOAL_AND = 0.90


def attributes(path: str | Path) -> dict[str, str]:
    _, color, shape, _, background = Path(path).stem.split("-")
    return {"color": color, "shape": shape, "background": background}


def share_rate(engine: FocalSearch, queries: list[Path], conditions, k: int, test, eligible) -> tuple[int, int]:
    """(hits passing ``test``, hits counted) over the top-k of each eligible query."""
    passed = counted = 0
    for query in queries:
        if not eligible(query):
            continue
        hits = engine.search(image_id=row_id(str(query.resolve())), conditions=conditions, k=k).results
        passed += sum(test(attributes(query), attributes(h.path)) for h in hits)
        counted += k
    return passed, counted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    names = sorted(EXAMPLES.iterdir())
    queries = names[: args.queries]
    with tempfile.TemporaryDirectory() as folder:
        engine = FocalSearch(Path(folder) / "index", model="demo")
        engine.index([EXAMPLES], instructions=["color", "shape", "background"])

        def same(*keys):
            return lambda q, h: all(q[a] == h[a] for a in keys)

        def has_k(*keys):
            return lambda query: sum(n != query and same(*keys)(attributes(query), attributes(n)) for n in names) >= args.k

        def shape_not_color(q, h):
            return q["shape"] == h["shape"] and q["color"] != h["color"]

        rows = {
            "shape AND background: share both": [
                ("shape alone", [("shape", 1)]),
                ("background alone", [("background", 1)]),
                ("shape + background (1, 1)", [("shape", 1), ("background", 1)]),
            ],
            "shape NOT colour: same shape, other colour": [
                ("shape alone", [("shape", 1)]),
                ("shape - color (1, -1)", [("shape", 1), ("color", -1)]),
            ],
        }
        tests = {"shape AND background: share both": (same("shape", "background"), has_k("shape", "background")),
                 "shape NOT colour: same shape, other colour": (shape_not_color, lambda q: True)}
        report = {}
        for group, setups in rows.items():
            test, eligible = tests[group]
            print(f"{group} (top-{args.k} of the first {args.queries} images as queries)")
            for label, conditions in setups:
                passed, counted = share_rate(engine, queries, conditions, args.k, test, eligible)
                rate = passed / counted if counted else 0.0
                report[f"{group} | {label}"] = {"passed": passed, "counted": counted, "rate": round(rate, 3)}
                print(f"  {label:<28} {passed:>3}/{counted:<3} {rate:6.1%}")
        combined = report["shape AND background: share both | shape + background (1, 1)"]["rate"]
        verdict = "holds" if combined >= GOAL_AND else "misses"
        print(f"goal: shape AND background >= {GOAL_AND:.0%} of top-{args.k} hits share both: {combined:.1%}, {verdict}")
        engine.close()
    if args.json:
        args.json.write_text(json.dumps({"queries": args.queries, "k": args.k, "rates": report,
                                         "goal": {"shape_and_background": GOAL_AND, "holds": combined >= GOAL_AND}}, indent=2))


if __name__ == "__main__":
    main()
