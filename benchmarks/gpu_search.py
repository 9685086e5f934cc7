"""Exact search at 1M vectors on the GPU against the CPU and against the memory-bandwidth bound, in one run.

    python benchmarks/gpu_search.py [--n 1000000] [--dim 512] [--queries 1000] [--repeats 20] [--json OUT]

On clustered unit vectors (benchmarks/ann.py's generator), k = 10, inner product:
- "faiss cpu flat": the project's exact index (focalsearch.ann.build_index(kind="flat")) on every core;
- "faiss gpu flat": the same index after focalsearch.ann.to_gpu_if_available, when this faiss build has
  GPUs (faiss-gpu); otherwise the row says why it is missing;
- "torch cuda fp32/fp16": the same exact search as one matrix product and top-k on the GPU, which is what
  a GPU flat index does; its single-query time is set against the bandwidth bound (a single query must
  read every vector once: n x dim x bytes / the card's measured copy bandwidth).
For each: one query at a time (p50 / p99 ms over --repeats x 10 queries, after 20 warm-up) and --queries in
one batch (queries/s), with recall@10 of the batch's answers against exact search (faiss.knn).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ann import clustered_vectors, recall, single_query_latency  # noqa: E402  (benchmarks/ann.py, beside this file)

from focalsearch import ann  # noqa: E402

K = 10


def measure(search, queries: np.ndarray, truth: np.ndarray, repeats: int) -> dict:
    """p50/p99 of single-query searches (benchmarks/ann.py's loop), one batch of all the queries, and its recall@10."""
    p50, p99, _ = single_query_latency(lambda q: search(q[None, :])[0], queries[: repeats * 10])
    batch_s = min(_timed(lambda: search(queries)) for _ in range(3))
    return {"p50_ms": p50, "p99_ms": p99, "batch_queries_per_s": len(queries) / batch_s,
            "recall@10": recall(search(queries), truth)}


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def torch_rows(x: np.ndarray, queries: np.ndarray, truth: np.ndarray, repeats: int) -> tuple[list[dict], dict]:
    import torch

    if not torch.cuda.is_available():
        return [{"index": "torch cuda", "missing": "no CUDA device"}], {}
    device = torch.device("cuda")
    # The copy bandwidth (read + write of a 4 GiB buffer) bounds how fast one query can scan the vectors.
    buffer = torch.empty(2**30, dtype=torch.float32, device=device)
    copy = torch.empty_like(buffer)
    copy.copy_(buffer)
    torch.cuda.synchronize()
    copy_s = min(_timed(lambda: (copy.copy_(buffer), torch.cuda.synchronize())) for _ in range(5))
    bandwidth = 2 * buffer.numel() * 4 / copy_s
    del buffer, copy
    card = {"name": torch.cuda.get_device_name(0), "copy_bandwidth_gb_s": bandwidth / 1e9}
    rows = []
    for dtype, label in ((torch.float32, "fp32"), (torch.float16, "fp16")):
        vectors = torch.from_numpy(x).to(device=device, dtype=dtype)

        def search(q: np.ndarray, vectors=vectors, dtype=dtype):
            scores = torch.from_numpy(q).to(device=device, dtype=dtype) @ vectors.T
            positions = scores.topk(K, dim=1).indices.cpu().numpy()  # .cpu() waits for the GPU
            return positions

        row = {"index": f"torch cuda {label}", **measure(search, queries, truth, repeats)}
        row["bandwidth_bound_ms"] = vectors.numel() * vectors.element_size() / bandwidth * 1e3
        rows.append(row)
        del vectors
        torch.cuda.empty_cache()
    return rows, card


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=20, help="rounds of 10 single-query searches")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    started = time.perf_counter()
    data = clustered_vectors(args.n + args.queries, args.dim, args.clusters, 2.0, args.seed)
    x, queries = data[: args.n], np.ascontiguousarray(data[args.n:])
    print(f"{args.n:,} x {args.dim} vectors, {args.queries} queries, {os.cpu_count()} CPU cores; "
          f"data {time.perf_counter() - started:.0f} s", flush=True)

    truth = ann.faiss.knn(queries, x, K, metric=ann.faiss.METRIC_INNER_PRODUCT)[1]  # as benchmarks/ann.py
    flat = ann.build_index(x, kind="flat")
    rows = [{"index": "faiss cpu flat", **measure(lambda q: ann.search(flat, q, K)[1], queries, truth, args.repeats)}]
    on_gpu = ann.to_gpu_if_available(flat)
    if on_gpu.device == "cpu":
        rows.append({"index": "faiss gpu flat", "missing": "this faiss build has no GPU support (faiss-cpu)"})
    else:
        rows.append({"index": "faiss gpu flat", **measure(lambda q: ann.search(on_gpu, q, K)[1], queries, truth, args.repeats)})
    gpu_rows, card = torch_rows(x, queries, truth, args.repeats)
    rows += gpu_rows

    cpu = rows[0]
    print(f"{'index':<18}{'p50 ms':>9}{'p99 ms':>9}{'batch q/s':>12}{'recall@10':>11}{'x cpu p50':>11}{'bound ms':>10}")
    for row in rows:
        if "missing" in row:
            print(f"{row['index']:<18}missing: {row['missing']}")
            continue
        bound = f"{row['bandwidth_bound_ms']:>10.3f}" if "bandwidth_bound_ms" in row else f"{'-':>10}"
        print(f"{row['index']:<18}{row['p50_ms']:>9.3f}{row['p99_ms']:>9.3f}{row['batch_queries_per_s']:>12,.0f}"
              f"{row['recall@10']:>11.3f}{cpu['p50_ms'] / row['p50_ms']:>11.1f}{bound}")
    if card:
        print(f"card: {card['name']}, copy bandwidth {card['copy_bandwidth_gb_s']:,.0f} GB/s (read + write)")
    if args.json:
        args.json.write_text(json.dumps({"n": args.n, "dim": args.dim, "queries": args.queries, "card": card,
                                         "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                                         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
