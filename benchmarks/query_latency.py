"""Where the time of a cold `focalsearch query` goes: imports, model load, encode, search, printing.

    python benchmarks/query_latency.py [--model demo] [--repeats 5] [--kinds image,text] [--images N] [--json OUT]

It indexes examples/colorshape under "color" once (--images N: only its first N images), then for an
image query and a text query (--kinds: either alone) runs
(a) `focalsearch query` end to end in a fresh process, and (b) the same steps timed one by one in
another fresh process, `--repeats` times each, and prints the median of every stage.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "colorshape"
QUERY_IMAGE = EXAMPLES / "images" / "00014-blue-triangle-on-black.png"

# Runs in a fresh interpreter, so that every import is cold; prints one JSON line of stage times.
STAGES = r"""
import json, sys, time
t = {}
start = time.perf_counter()
import typer, focalsearch.cli
t["import cli"] = time.perf_counter() - start
mark = time.perf_counter()
import torch, transformers
t["import torch + transformers"] = time.perf_counter() - mark
mark = time.perf_counter()
import lancedb, faiss
t["import lancedb + faiss"] = time.perf_counter() - mark
from focalsearch.api import FocalSearch
from focalsearch.images import open_query_image
from focalsearch.search import load_condition_index, search_index
index, image, text = sys.argv[1], sys.argv[2], sys.argv[3]
mark = time.perf_counter()
engine = FocalSearch(index)
condition = engine.condition("color")
t["open index"] = time.perf_counter() - mark
mark = time.perf_counter()
from focalsearch.models import needed_towers
towers = needed_towers(condition.encoder, condition.instruction, image_query=bool(image))
encoder = engine._load_encoder((condition.model, condition.encoder, condition.prompts), towers)
t["load model"] = time.perf_counter() - mark
mark = time.perf_counter()
if image:
    vector = encoder.encode_images([open_query_image(image).image], condition.instruction)[0]
else:
    vector = encoder.encode_texts([text])[0]
t["encode query"] = time.perf_counter() - mark
mark = time.perf_counter()
hits = search_index(load_condition_index(engine._open_store(), condition), vector, 10)
t["load FAISS + search"] = time.perf_counter() - mark
mark = time.perf_counter()
lines = [f"{h.rank:>4}  {h.score:7.4f}  {h.path}" for h in hits]
sys.stderr.write("\n".join(lines) + "\n")
t["print"] = time.perf_counter() - mark
t["total in process"] = time.perf_counter() - start
print(json.dumps(t))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kinds", default="image,text", help="comma-separated query kinds: image, text")
    parser.add_argument("--images", type=int, default=None, help="index only the first N example images (a smoke run)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    if not kinds or set(kinds) - {"image", "text"}:
        parser.error(f"--kinds takes image, text or both, not {args.kinds!r}")
    results = {}
    with tempfile.TemporaryDirectory() as root:
        index = str(Path(root) / "index")
        folder = EXAMPLES
        if args.images is not None:
            folder = Path(root) / "images"
            folder.mkdir()
            for path in sorted((EXAMPLES / "images").glob("*.png"))[: args.images]:
                shutil.copy(path, folder / path.name)
        cli = [sys.executable, "-m", "focalsearch.cli"]
        subprocess.run([*cli, "index", str(folder), "-i", "color", "--model", args.model, "--index", index],
                       check=True, capture_output=True)
        queries = {"image": ("image query", str(QUERY_IMAGE), ""), "text": ("text query", "", "blue")}
        for kind, image, text in (queries[k] for k in kinds):
            command = [*cli, "query", "-i", "color", "--index", index] + ([image] if image else ["--text", text])
            walls, stages = [], []
            for _ in range(args.repeats):
                started = time.perf_counter()
                subprocess.run(command, check=True, capture_output=True)
                walls.append(time.perf_counter() - started)
                out = subprocess.run([sys.executable, "-c", STAGES, index, image, text], check=True, capture_output=True, text=True)
                stages.append(json.loads(out.stdout.strip().splitlines()[-1]))
            median = {name: float(np.median([s[name] for s in stages])) for name in stages[0]}
            median["focalsearch query, wall"] = float(np.median(walls))
            results[kind] = median
    print(f"cold query breakdown, model {args.model}, median of {args.repeats} fresh processes (seconds)")
    names = list(next(iter(results.values())))
    print(f"{'stage':<30}" + "".join(f"{kind:>14}" for kind in results))
    for name in names:
        print(f"{name:<30}" + "".join(f"{results[kind][name]:>14.3f}" for kind in results))
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "repeats": args.repeats, "seconds": results}, indent=2))


if __name__ == "__main__":
    main()
