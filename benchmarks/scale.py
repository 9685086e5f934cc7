"""Scale-out figures, measured side by side in one run: the Ray engine's overhead and the streamed FAISS build.

    python benchmarks/scale.py [--json OUT] [--sizes 200000,1000000] [--dim 512] [--images 320]
                               [--repeats 2] [--model vit-b16] [--skip-ray] [--skip-faiss]

(a) Ray-engine overhead. On a generated folder of photo-like JPEGs (1-4 MP) and a FocalLens-CLIP of
    CLIP ViT-B/16's shape (random weights; benchmarks/throughput.py; --model picks another), `focalsearch index FOLDER
    -i color -i shape --json` runs as a user types it, each time into a fresh index and in a fresh
    process, with `--engine local` and with `--engine ray` against a Ray instance started
    beforehand with `ray start --head --num-cpus <cores>` (a cluster is up before its jobs are), plus
    one `--engine ray` run with no address that starts its own. Runs are interleaved and each is the
    best of --repeats. Reported: the summary's images_per_second (all of the command's own work:
    the plan, Ray's start-up where it does it, the actors' model load, the commits) and the wall time of
    the process. Goal: Ray (on a running instance) / local >= 0.8.

(b) Streamed FAISS build. For each size, a LanceDB table of that many clustered unit vectors
    (`--dim`) is written as the Ray engine writes it, in a process of its own: fragments of 4,096
    rows committed every 49,152 rows by the project's Store; then a fresh process builds the condition's search index exactly as a query process does (search.build_condition_index: above 50,000 rows an IVF
    index streamed from the table, its lists in a file), and another fresh process builds it the way
    it was built before (the whole table read into memory, faiss lists in memory). Peak RSS is each
    build process's own VmHWM (it counts the mapped file pages a process touched too). Goal: the
    streamed build's peak at the largest size <= 1.3 x its peak at the smallest. Also reported at
    the largest size: the build's phases (training on the sample, assignment, writing the lists,
    tuning), and the steps of an index run that stay on one node, in the Ray engine's driver: the
    commits (their mean, and the last, with the table at its full size), compacting the table,
    writing the catalog.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
# At the top, not inside measure_ray: a renamed helper then breaks every run of this script (and its
# smoke run in tests/test_benchmarks_smoke.py), not only the Ray part that a smoke run skips.
from throughput import VIT_SHAPES, make_photos, vit_checkpoint  # noqa: E402  (benchmarks/throughput.py, beside this file)

RAY_GOAL = 0.8
FAISS_GOAL = 1.3
INSTRUCTIONS = ("color", "shape")


# ---------------------------------------------------------------- (a) Ray overhead

def _command(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        raise SystemExit(f"the {name} command is not installed; run the README's install line")
    return found


def index_once(folder: Path, index: Path, model: str, engine: str, address: str | None) -> dict:
    command = [_command("focalsearch"), "index", str(folder), "--index", str(index), "--model", model,
               "--engine", engine, "--json", "--commit-every", "60"]
    for instruction in INSTRUCTIONS:
        command += ["-i", instruction]
    if address:
        command += ["--ray-address", address]
    env = {**os.environ, "FOCALSEARCH_VERSION_GRACE_SECONDS": "0"}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr[-800:]}")
    summary = json.loads(done.stdout)
    return {"images_per_second": summary["images_per_second"], "encoded": summary["encoded"],
            "seconds": summary["seconds"], "wall_seconds": round(wall, 2)}


def measure_ray(args, scratch: Path) -> dict:
    folder = scratch / "photos"
    make_photos(folder, args.images)
    model = str(vit_checkpoint(args.model, scratch / args.model)) if args.model in VIT_SHAPES else args.model
    cores = len(os.sched_getaffinity(0))
    subprocess.run([_command("ray"), "start", "--head", f"--num-cpus={cores}", "--include-dashboard=false",
                    "--disable-usage-stats"], check=True, capture_output=True)
    runs: dict[str, list[dict]] = {"local": [], "ray": [], "ray (starts its own)": []}
    try:
        for repeat in range(args.repeats):
            for label, engine, address in (("local", "local", None), ("ray", "ray", "auto"),
                                           ("ray (starts its own)", "ray", None)):
                if label == "ray (starts its own)" and repeat > 0:
                    continue  # one run shows the start-up cost; it is not part of the goal
                if label == "ray (starts its own)":
                    subprocess.run([_command("ray"), "stop", "--force"], capture_output=True)
                index = scratch / f"index-{label.split()[0]}-{repeat}"
                result = index_once(folder, index, model, engine, address)
                runs[label].append(result)
                print(f"  {label:<22} run {repeat + 1}: {result['images_per_second']:.2f} img/s, "
                      f"wall {result['wall_seconds']:.1f} s", flush=True)
                shutil.rmtree(index)
                if label == "ray (starts its own)" and repeat + 1 < args.repeats:
                    subprocess.run([_command("ray"), "start", "--head", f"--num-cpus={cores}", "--include-dashboard=false",
                                    "--disable-usage-stats"], check=True, capture_output=True)
    finally:
        subprocess.run([_command("ray"), "stop", "--force"], capture_output=True)
    best = {label: max(r, key=lambda x: x["images_per_second"]) for label, r in runs.items() if r}
    ratio = best["ray"]["images_per_second"] / best["local"]["images_per_second"]
    return {
        "model": (f"{args.model} (FocalLens-CLIP of the shape benchmarks/throughput.py gives it, random weights)"
                  if args.model in VIT_SHAPES else args.model),
        "images": args.images, "instructions": list(INSTRUCTIONS), "cores": cores, "runs": runs, "best": best,
        "ray_over_local": round(ratio, 3),
        "ray_starting_its_own_over_local": round(best["ray (starts its own)"]["images_per_second"]
                                                 / best["local"]["images_per_second"], 3),
        "goal": f"ray / local >= {RAY_GOAL}", "goal_met": ratio >= RAY_GOAL,
    }


# ---------------------------------------------------------------- (b) streamed FAISS build

def make_table(root: Path, n: int, dim: int, seed: int = 0, fragment_rows: int = 4096, commit_rows: int = 49_152) -> None:
    """A one-condition index of ``n`` clustered unit vectors, written as the Ray engine writes: fragments
    of ``fragment_rows`` rows (what its workers write) committed every ``commit_rows`` rows (what its driver
    does), never all in memory. Prints the driver's costs: the commits, then compaction and the catalog write."""
    from focalsearch.store import FileRecord, Store, row_id, rows_table

    store = Store(root, create=True)
    condition = store.ensure_condition("color", "synthetic", "focallens", dim)
    target = store.fragment_target(condition)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    pending, commits = [], []
    for lo in range(0, n, fragment_rows):
        hi = min(n, lo + fragment_rows)
        block = centres[rng.integers(0, len(centres), hi - lo)] + rng.standard_normal((hi - lo, dim)).astype(np.float32) * 0.05
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        paths = [f"/photos/{i // 1000:04d}/img-{i:08d}.jpg" for i in range(lo, hi)]
        pending += target.write(rows_table(dim, [FileRecord(row_id(p), p, 100_000, 0, "", 640, 480) for p in paths], block))
        if hi % commit_rows == 0 or hi == n:
            started = time.perf_counter()
            store.append_fragments(condition, pending)
            commits.append(time.perf_counter() - started)
            pending = []
    started = time.perf_counter()
    store.compact(condition, cleanup_seconds=0)
    compact = time.perf_counter() - started
    started = time.perf_counter()
    store.mark_updated(condition, roots=["/photos"])
    catalog = time.perf_counter() - started
    print(json.dumps({"fragment_rows": fragment_rows, "commits": len(commits), "commit_seconds_mean": round(float(np.mean(commits)), 4),
                      "commit_seconds_last": round(commits[-1], 4), "fragments_before_compaction": -(-n // fragment_rows),
                      "compact_seconds": round(compact, 2), "catalog_write_seconds": round(catalog, 3)}))


def child_build(root: Path, mode: str) -> None:
    """Runs in a fresh process: build the condition's search index, print what it built as JSON."""
    from focalsearch import ann, search
    from focalsearch.store import Store

    store = Store(root)
    condition = store.conditions()[0]
    started = time.perf_counter()
    if mode == "streamed":
        built = search.build_condition_index(store, condition)
        index = built.ann
    else:  # the way every index was built before: one read of the whole table, lists in memory
        _, _, vectors = store.snapshot(condition)
        index = ann.build_index(vectors)
    seconds = time.perf_counter() - started
    print(json.dumps({"kind": index.kind, "params": index.params, "recall_at_10": index.recall_at_10,
                      "on_disk": index.data_file is not None, "phases": index.build_seconds,
                      "seconds": round(seconds, 2), "peak_rss_mib": round(own_peak_mib(), 1)}))


def own_peak_mib() -> float:
    """This process's peak resident set size (VmHWM), since its exec.

    Not the parent's wait4 ru_maxrss: the kernel folds the memory image a child was forked (or
    vforked) from into that figure at exec, so a child of a large parent reports at least the
    parent's peak (here it added up to ~400 MiB after the parent had written a 1M-row table).
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_child(*args: str) -> dict:
    """Run this script in a fresh process with ``args``; the JSON object it prints last."""
    command = [sys.executable, __file__, *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr[-800:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_faiss(args, scratch: Path) -> dict:
    sizes = sorted(int(s) for s in args.sizes.split(","))
    rows = []
    for n in sizes:
        root = scratch / f"table-{n}"
        started = time.perf_counter()
        single_node = run_child("--child-make", str(root), "--child-rows", str(n), "--dim", str(args.dim))
        print(f"  {n:,} x {args.dim} table written in {time.perf_counter() - started:.0f} s", flush=True)
        vector_mib = n * args.dim * 4 / 2**20
        row = {"n": n, "dim": args.dim, "vector_mib": round(vector_mib, 3), "single_node": single_node}
        for mode in ("streamed", "whole"):
            shutil.rmtree(root / "faiss", ignore_errors=True)
            built = run_child("--child-build", str(root), "--child-mode", mode)
            peak = built["peak_rss_mib"]
            row[mode] = built
            print(f"  {n:,} {mode:<8}: peak RSS {peak:,.0f} MiB ({peak / vector_mib:.2f} x the vectors), "
                  f"{built['seconds']:.0f} s, {built['kind']} {built['params']} recall@10 {built['recall_at_10']}", flush=True)
        rows.append(row)
        shutil.rmtree(root)
    small, large = rows[0], rows[-1]
    ratio = large["streamed"]["peak_rss_mib"] / small["streamed"]["peak_rss_mib"]
    whole_ratio = large["whole"]["peak_rss_mib"] / small["whole"]["peak_rss_mib"]
    return {"sizes": rows, "streamed_peak_ratio": round(ratio, 3), "whole_peak_ratio": round(whole_ratio, 3),
            "goal": f"streamed peak at {large['n']:,} <= {FAISS_GOAL} x at {small['n']:,}", "goal_met": ratio <= FAISS_GOAL}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--sizes", default="200000,1000000")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--model", default="vit-b16",
                        help="for the Ray runs: vit-b16 or vit-l14-336 (random weights, benchmarks/throughput.py), or any --model")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--skip-faiss", action="store_true")
    parser.add_argument("--scratch", type=Path, default=None, help="folder for generated data (default: a temp folder)")
    parser.add_argument("--child-build", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-mode", help=argparse.SUPPRESS)
    parser.add_argument("--child-make", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-rows", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_make:
        make_table(args.child_make, args.child_rows, args.dim)
        return
    if args.child_build:
        child_build(args.child_build, args.child_mode)
        return

    scratch = Path(tempfile.mkdtemp(prefix="focalsearch-scale-", dir=args.scratch))
    report = {"machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "cores": len(os.sched_getaffinity(0))},
              "date": time.strftime("%Y-%m-%d")}
    try:
        if not args.skip_faiss:
            print("streamed FAISS build:", flush=True)
            report["faiss"] = measure_faiss(args, scratch)
            f = report["faiss"]
            print(f"streamed build peak ratio {f['streamed_peak_ratio']:.2f} (goal <= {FAISS_GOAL}: "
                  f"{'met' if f['goal_met'] else 'MISSED'}); whole-table build {f['whole_peak_ratio']:.2f}", flush=True)
        if not args.skip_ray:
            print("Ray engine overhead:", flush=True)
            report["ray"] = measure_ray(args, scratch)
            r = report["ray"]
            print(f"ray / local = {r['ray_over_local']:.2f} (goal >= {RAY_GOAL}: {'met' if r['goal_met'] else 'MISSED'}); "
                  f"a run that starts its own Ray: {r['ray_starting_its_own_over_local']:.2f}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
