"""Which attribute each phrasing really retrieves by: R@1 of one phrasing on every condition's items.

    python benchmarks/colorshape_phrases.py [--focallens demo] [--per-condition 100] [--tier synonyms] [--json OUT]

A row is one phrasing (by default each training word and every held-out synonym and question); a
column is the attribute its items test. A phrasing that follows its own attribute scores high in that
column only; one that reads as another attribute ("how large?" read as "how many") scores high in
that other column. Measures, changes nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from focalsearch.bench.colorshape import recall_at_1
from focalsearch.models import create_encoder
from focalsearch.synth import colorshape as cs


def phrasings(tiers: list[str]) -> list[tuple[str, str]]:
    """(attribute, phrasing): each attribute's bare training word, then every phrasing of the tiers."""
    rows = [(a, cs.TRAIN_PHRASINGS[a][0]) for a in cs.ATTRIBUTES]
    rows += [(a, p) for tier in tiers for a in cs.ATTRIBUTES for p in cs.PHRASINGS[tier][a]]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--focallens", default="demo")
    parser.add_argument("--per-condition", type=int, default=100)
    parser.add_argument("--tier", action="append", choices=sorted(cs.PHRASINGS), help="phrasing tiers (default: synonyms, questions)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    encoder = create_encoder(args.focallens)
    items = cs.benchmark_items(per_condition=args.per_condition)
    table = {}
    print(f"R@1 of each phrasing on each condition's items ({args.per_condition} per condition, {args.focallens})")
    print("attribute   phrasing".ljust(52) + "".join(c.rjust(11) for c in cs.ATTRIBUTES))
    for attribute, text in phrasings(args.tier or ["synonyms", "questions"]):
        scores = recall_at_1(items, lambda images, _ignored, text=text: encoder.encode_images(images, text)).per_condition
        table[text] = {"attribute": attribute, "r_at_1": scores}
        print(f"{attribute:<12}{text!r:<40}" + "".join(f"{scores[c]:11.2f}" for c in cs.ATTRIBUTES), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"model": args.focallens, "per_condition": args.per_condition, "phrasings": table}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
