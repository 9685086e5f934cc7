"""ColorShape R@1 per condition on the held-out split: clip, clip+text, FocalLens-CLIP, and the MLLM
family prompted only (mllm) and FocalLens-tuned (mllm_focal). Every encoder that reads the instruction
runs the training phrasings and three held-out tiers: new wordings, synonyms known only from captions,
and questions whose frame and attribute word both come from captions only. All setups score the same items.

    python benchmarks/colorshape.py [--clip demo-clip] [--focallens demo] [--mllm demo-mllm]
                                    [--mllm-focal demo-mllm-focal] [--json OUT]

An MLLM setup whose checkpoint is not installed is skipped with a note (`--mllm ''` skips it outright).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from focalsearch.bench.colorshape import ALL_SETUPS, MLLM_SETUPS, TIERS, run, setup_parts, unavailable
from focalsearch.synth.colorshape import ATTRIBUTES


def tier_gaps(results: dict, name: str) -> str:
    """'training - held-out phrasing: +x points; ...' for one model's tiers."""
    parts = []
    for suffix, tier in TIERS.items():
        if suffix and f"{name}{suffix}" in results:
            drop = results[name].mean - results[f"{name}{suffix}"].mean
            parts.append(f"training - held-out {tier if tier != 'heldout' else 'phrasing'}: {drop * 100:+.1f} points")
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", default="demo-clip", help="plain CLIP checkpoint for the clip and clip+text baselines")
    parser.add_argument("--focallens", default="demo", help="FocalLens-CLIP checkpoint")
    parser.add_argument("--mllm", default="demo-mllm", help="vision-language checkpoint, prompted only ('' skips it)")
    parser.add_argument("--mllm-focal", default="demo-mllm-focal", help="FocalLens-tuned vision-language checkpoint ('' skips it)")
    parser.add_argument("--per-condition", type=int, default=200, help="queries per condition")
    parser.add_argument("--distractors", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    mllm_models = {"mllm": args.mllm, "mllm_focal": args.mllm_focal}
    skipped = {}
    for role, model in mllm_models.items():
        reason = "not asked for (empty name)" if not model else unavailable(model)
        if reason:
            skipped[role] = reason
            print(f"note: skipping {role} ({model or 'none'}): {reason}", file=sys.stderr)
    setups = tuple(s for s in ALL_SETUPS if s not in MLLM_SETUPS or setup_parts(s)[0] not in skipped)
    started = time.perf_counter()
    results = run(args.clip, args.focallens, args.per_condition, args.distractors, args.seed, args.device, setups,
                  mllm_model=args.mllm, mllm_focal_model=args.mllm_focal)
    seconds = time.perf_counter() - started
    header = f"{'setup':<30}" + "".join(f"{a:>12}" for a in ATTRIBUTES) + f"{'mean':>10}"
    print(f"ColorShape R@1, held-out compositions, {args.per_condition} queries per condition, 1 positive + {args.distractors} distractors")
    print(header)
    for setup in setups:
        r = results[setup]
        print(f"{setup:<30}" + "".join(f"{r.per_condition[a]:>12.3f}" for a in ATTRIBUTES) + f"{r.mean:>10.3f}")
    for role in skipped:
        print(f"{role:<30} skipped: {mllm_models[role] or 'none'} is not available")
    best_baseline = max(results["clip"].mean, results["clip+text"].mean)
    for name in ("focallens", "mllm", "mllm_focal"):
        if name in results:
            print(f"{name} - best CLIP baseline: {(results[name].mean - best_baseline) * 100:+.1f} points; {tier_gaps(results, name)}")
    if "mllm" in results and "mllm_focal" in results:
        print(f"mllm_focal - mllm (what FocalLens tuning adds to the prompted model): "
              f"{(results['mllm_focal'].mean - results['mllm'].mean) * 100:+.1f} points")
    print(f"{seconds:.0f} s")
    if args.json:
        payload = {
            "results": {name: result.to_dict() for name, result in results.items()},
            "models": {"clip": args.clip, "focallens": args.focallens, **{k: v for k, v in mllm_models.items() if k not in skipped}},
            "skipped": skipped,
            "items": {"per_condition": args.per_condition, "distractors": args.distractors, "seed": args.seed},
            "seconds": round(seconds, 1),
        }
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
