"""ANN index types on clustered, normalised vectors: build time, single-query latency, recall, memory.

    python benchmarks/ann.py [--n 1000000] [--dim 512] [--json OUT]

For each index type FocalSearch can choose (flat, hnsw, ivf, built and tuned by focalsearch.ann exactly
as the indexer builds them) and for LanceDB's own vector search over the same vectors, it reports build
time, p50/p99 latency of one query at a time, recall@10 against exact search on held-out queries drawn
from the same clusters, and memory (the serialised index size). It also sweeps each knob (efSearch,
nprobe) to show recall against latency. The goal line checks the type the project chooses for n.
For the FAISS types it also saves the index and times what a cold query pays to open it: load
(memory-mapped) plus one search ("load ms"), and, beside it, a full CRC32 of the file ("crc ms"),
which a load skips when the file is provably untouched since it was saved (focalsearch.ann.load_index).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from focalsearch import ann

GOAL_P50_MS = 2.0
GOAL_RECALL = 0.95
K = 10


def clustered_vectors(n: int, dim: int, clusters: int, spread: float, seed: int) -> np.ndarray:
    """n unit vectors around `clusters` random centres; `spread` is the noise norm relative to the centre."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, dim), np.float32)
    for lo in range(0, n, 100_000):
        hi = min(n, lo + 100_000)
        noise = rng.standard_normal((hi - lo, dim)).astype(np.float32) * (spread / np.sqrt(dim))
        block = centres[rng.integers(0, clusters, hi - lo)] + noise
        out[lo:hi] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(f, t)) / len(t) for f, t in zip(found, truth)]))


def single_query_latency(search_one, queries: np.ndarray) -> tuple[float, float, np.ndarray]:
    """p50 and p99 in ms over one-at-a-time queries, plus the positions found."""
    for q in queries[:20]:  # warm caches
        search_one(q)
    times, found = [], []
    for q in queries:
        started = time.perf_counter()
        found.append(search_one(q))
        times.append((time.perf_counter() - started) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99)), np.array(found)


def cold_load(built: "ann.AnnIndex", query: np.ndarray) -> tuple[int, float, float]:
    """(file bytes, ms to load the saved index as a query process does and search once, ms of a full checksum).

    The file is freshly written, so it is in the page cache: these are the CPU costs, not disk reads.
    """
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "index.faiss"
        ann.save_index(built, path, {})
        started = time.perf_counter()
        loaded, _ = ann.load_index(path)
        ann.search(loaded, query, K)
        load_ms = (time.perf_counter() - started) * 1000
        del loaded
        started = time.perf_counter()
        ann._crc32(path)
        return path.stat().st_size, load_ms, (time.perf_counter() - started) * 1000


def faiss_rows(x: np.ndarray, queries: np.ndarray, truth: np.ndarray, kinds: list[str]) -> list[dict]:
    rows = []
    for kind in kinds:
        started = time.perf_counter()
        built = ann.build_index(x, kind=kind, exact_max_rows=len(x))
        build_s = time.perf_counter() - started
        memory, load_ms, checksum_ms = cold_load(built, queries[0])
        p50, p99, found = single_query_latency(lambda q: ann.search(built, q, K)[1][0], queries)
        row = {"index": f"faiss {kind}", "params": dict(built.params), "build_s": build_s, "p50_ms": p50,
               "p99_ms": p99, f"recall@{K}": recall(found, truth), "memory_mb": memory / 2**20,
               "load_ms": load_ms, "checksum_ms": checksum_ms, "sweep": []}
        knob = {"hnsw": "efSearch", "ivf": "nprobe"}.get(kind)
        if knob:
            chosen = built.params[knob]
            for value in sorted({max(1, chosen // 4), max(1, chosen // 2), chosen, chosen * 2, chosen * 4}):
                params = {**built.params, knob: value}
                ann._apply_params(built.index, kind, params)
                s50, s99, sfound = single_query_latency(lambda q: ann.search(built, q, K)[1][0], queries[:300])
                row["sweep"].append({knob: value, "p50_ms": s50, "p99_ms": s99, f"recall@{K}": recall(sfound, truth[:300])})
        rows.append(row)
        del built
    return rows


def lancedb_rows(x: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> list[dict]:
    # LanceDB is the store of record; this asks whether its own vector search would do instead of FAISS.
    os.environ.setdefault("LANCE_LOG", "error")  # one deprecation warning per query otherwise
    import lancedb
    import pyarrow as pa
    from lancedb.index import IvfPq

    rows = []
    with tempfile.TemporaryDirectory() as root:
        db = lancedb.connect(root)
        started = time.perf_counter()
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
        table = db.create_table("bench", pa.table({"pos": pa.array(np.arange(len(x))), "vector": vectors}))
        write_s = time.perf_counter() - started

        def one(q, **opts):
            query = table.search(q).metric("dot").limit(K).select(["pos", "_distance"])
            for name, value in opts.items():
                query = getattr(query, name)(value)
            return query.to_arrow()["pos"].to_numpy()

        few = 200 if len(x) <= 200_000 else 40  # a brute-force scan of 1M vectors takes seconds
        p50, p99, found = single_query_latency(one, queries[:few])
        rows.append({"index": "lancedb brute force", "params": {}, "build_s": write_s, "p50_ms": p50, "p99_ms": p99,
                     f"recall@{K}": recall(found, truth[:few]), "memory_mb": None, "sweep": []})
        if len(x) >= 10_000:
            started = time.perf_counter()
            partitions = max(1, int(np.sqrt(len(x))))
            config = IvfPq(distance_type="dot", num_partitions=partitions, num_sub_vectors=x.shape[1] // 8)
            table.create_index("vector", config=config)
            build_s = time.perf_counter() - started
            for nprobes, refine in ((20, 1), (20, 10), (50, 10)):
                p50, p99, found = single_query_latency(lambda q: one(q, nprobes=nprobes, refine_factor=refine), queries[:200])
                rows.append({"index": "lancedb ivf_pq", "params": {"num_partitions": partitions, "nprobes": nprobes, "refine_factor": refine},
                             "build_s": build_s, "p50_ms": p50, "p99_ms": p99, f"recall@{K}": recall(found, truth[:200]),
                             "memory_mb": None, "sweep": []})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=2.0, help="noise norm relative to the cluster centre")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--kinds", default="flat,hnsw,ivf")
    parser.add_argument("--no-lancedb", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    started = time.perf_counter()
    data = clustered_vectors(args.n + args.queries, args.dim, args.clusters, args.spread, args.seed)
    x, queries = data[: args.n], np.ascontiguousarray(data[args.n :])
    truth = ann.faiss.knn(queries, x, K, metric=ann.faiss.METRIC_INNER_PRODUCT)[1]
    print(f"{args.n:,} x {args.dim} vectors in {args.clusters} clusters, {args.queries} held-out queries, "
          f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}); data + exact truth {time.perf_counter() - started:.0f} s")
    rows = faiss_rows(x, queries, truth, args.kinds.split(","))
    if not args.no_lancedb:
        rows += lancedb_rows(x, queries, truth)

    print(f"{'index':<22}{'params':<42}{'build s':>9}{'p50 ms':>9}{'p99 ms':>9}{'recall@10':>11}{'memory MB':>11}"
          f"{'load ms':>9}{'crc ms':>9}")
    for row in rows:
        memory = f"{row['memory_mb']:.0f}" if row["memory_mb"] is not None else "-"
        params = ", ".join(f"{k}={v}" for k, v in row["params"].items())
        load = "".join(f"{row[key]:>9.1f}" if row.get(key) is not None else f"{'-':>9}" for key in ("load_ms", "checksum_ms"))
        print(f"{row['index']:<22}{params:<42}{row['build_s']:>9.1f}{row['p50_ms']:>9.3f}{row['p99_ms']:>9.3f}{row[f'recall@{K}']:>11.3f}{memory:>11}{load}")
        for point in row["sweep"]:
            knob = next(k for k in point if k not in ("p50_ms", "p99_ms", f"recall@{K}"))
            print(f"{'':<22}{'  sweep ' + knob + '=' + str(point[knob]):<42}{'':>9}{point['p50_ms']:>9.3f}{point['p99_ms']:>9.3f}{point[f'recall@{K}']:>11.3f}")

    chosen_kind = ann.choose_kind(args.n)
    chosen = next((r for r in rows if r["index"] == f"faiss {chosen_kind}"), None)
    goals = {}
    if chosen is not None:
        goals = {
            f"chosen index ({chosen_kind}) p50 ms": {"measured": round(chosen["p50_ms"], 3), "target": GOAL_P50_MS, "holds": chosen["p50_ms"] <= GOAL_P50_MS},
            f"chosen index ({chosen_kind}) recall@10": {"measured": round(chosen[f"recall@{K}"], 4), "target": GOAL_RECALL, "holds": chosen[f"recall@{K}"] >= GOAL_RECALL},
        }
        for name, goal in goals.items():
            print(f"goal {name}: measured {goal['measured']} target {goal['target']} -> {'holds' if goal['holds'] else 'DOES NOT HOLD'}")
    if args.json:
        payload = {"n": args.n, "dim": args.dim, "clusters": args.clusters, "queries": args.queries,
                   "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "rows": rows, "goals": goals}
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
