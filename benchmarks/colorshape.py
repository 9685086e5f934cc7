"""ColorShape R@1 per condition on the held-out split: clip, clip+text and FocalLens (training
phrasings, and three held-out tiers: new wordings, synonyms known only from captions, and questions
whose frame and attribute word both come from captions only).

    python benchmarks/colorshape.py [--clip demo-clip] [--focallens demo] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from focalsearch.bench.colorshape import SETUPS, run
from focalsearch.synth.colorshape import ATTRIBUTES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", default="demo-clip", help="plain CLIP checkpoint for the clip and clip+text baselines")
    parser.add_argument("--focallens", default="demo", help="FocalLens-CLIP checkpoint")
    parser.add_argument("--per-condition", type=int, default=200, help="queries per condition")
    parser.add_argument("--distractors", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    started = time.perf_counter()
    results = run(args.clip, args.focallens, args.per_condition, args.distractors, args.seed, args.device)
    seconds = time.perf_counter() - started
    header = f"{'setup':<28}" + "".join(f"{a:>12}" for a in ATTRIBUTES) + f"{'mean':>10}"
    print(f"ColorShape R@1, held-out compositions, {args.per_condition} queries per condition, 1 positive + {args.distractors} distractors")
    print(header)
    for setup in SETUPS:
        r = results[setup]
        print(f"{setup:<28}" + "".join(f"{r.per_condition[a]:>12.3f}" for a in ATTRIBUTES) + f"{r.mean:>10.3f}")
    gap = results["focallens"].mean - max(results["clip"].mean, results["clip+text"].mean)
    drop = results["focallens"].mean - results["focallens_heldout_phrasing"].mean
    synonyms = results["focallens"].mean - results["focallens_heldout_synonyms"].mean
    questions = results["focallens"].mean - results["focallens_heldout_questions"].mean
    print(f"focallens - best baseline: {gap * 100:+.1f} points")
    print(f"training - held-out phrasing: {drop * 100:+.1f} points; training - held-out synonyms: {synonyms * 100:+.1f} points; "
          f"training - held-out questions: {questions * 100:+.1f} points")
    print(f"{seconds:.0f} s")
    if args.json:
        payload = {
            "results": {name: result.to_dict() for name, result in results.items()},
            "models": {"clip": args.clip, "focallens": args.focallens},
            "items": {"per_condition": args.per_condition, "distractors": args.distractors, "seed": args.seed},
            "seconds": round(seconds, 1),
        }
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
