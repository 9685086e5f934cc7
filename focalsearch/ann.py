"""FAISS indexes over the store's L2-normalised float32 vectors (inner product = cosine).

The only module that imports faiss. Indexes are derived data: LanceDB is the source of truth, positions
0..n-1 in an index are positions in the vector array it was built from, and the caller decides staleness
from the `meta` dict saved beside the index.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import tempfile
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from focalsearch.errors import FocalSearchError

try:
    import faiss
except ImportError as exc:  # faiss comes from an extra, since its CPU and GPU builds are exclusive
    raise FocalSearchError(
        "FAISS is not installed: pip install 'focalsearch[cpu]' (or 'focalsearch[gpu]' on a CUDA machine)"
    ) from exc

log = logging.getLogger(__name__)

EXACT_MAX_ROWS: int = 50_000
# The on-disk IVF build trains on at most this many vectors (400 MB at 1024 dims), so its memory does not grow with n.
IVF_TRAIN_MAX: int = 100_000
TARGET_RECALL: float = 0.95
# Median single-query search time the tuner may spend for recall (2-core CPU; see benchmarks/ann.py).
LATENCY_BUDGET_MS: float = 2.0
LATENCY_QUERIES = 50
# Fewer for lists mapped from a file: every list a timed query probes stays in the process's memory.
LATENCY_QUERIES_ON_DISK = 20

KINDS = ("flat", "hnsw", "ivf")
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_START, HNSW_EF_MAX = 16, 4096
TUNE_QUERIES = 200
# Tuning queries are sampled data points moved off the data by isotropic noise of this norm (cosine ~0.71 to
# the source). Unperturbed data points overstate recall badly: HNSW starts next to its own node, whose graph
# links are its neighbours (measured 0.99 at efSearch=16 where perturbed queries got 0.78). 0.0 = unperturbed.
TUNE_NOISE = 1.0
TUNE_K = 10
_FORMAT = 1


@dataclass(frozen=True)
class AnnIndex:
    """A FAISS index plus how it was built and how well it searched at build time."""

    index: faiss.Index
    kind: str
    params: dict
    # Measured recall@10 against exact search on the tuning queries; flat is exact, so always 1.0.
    recall_at_10: float | None
    device: str = "cpu"
    data_file: Path | None = None  # where an on-disk IVF index keeps its lists (build_ivf_on_disk)
    build_seconds: dict = field(default_factory=dict)  # phase -> seconds, where the builder measured them
    _gpu_resources: object = field(default=None, repr=False, compare=False)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)


def choose_kind(n: int, *, exact_max_rows: int = EXACT_MAX_ROWS) -> str:
    """"flat" up to `exact_max_rows` vectors, else "ivf".

    Measured by benchmarks/ann.py on 1M clustered 512-d vectors (2-core CPU, 2026-11-25): IVF (nlist
    4*sqrt(n), tuned nprobe 8) answered in 0.40 ms p50 at recall@10 1.000 and built in 98 s, while HNSW
    (M=32) needed efSearch 512 and 1.6 ms for recall 0.958 and took 363 s to build, with 13 % more memory.
    Since FAISS files are rebuilt from the table after every change, build time counts too.
    """
    return "flat" if n <= exact_max_rows else "ivf"


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {x.shape}")
    return x


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k with numpy: (scores, positions), each (m, min(k, n)), scores descending."""
    vectors = _as_matrix(vectors, "vectors")
    queries = _as_matrix(np.atleast_2d(queries), "queries")
    m, n = len(queries), len(vectors)
    k = max(0, min(k, n))
    scores = np.empty((m, k), dtype=np.float32)
    positions = np.empty((m, k), dtype=np.int64)
    if k == 0:
        return scores, positions
    step = max(1, (1 << 24) // n)  # bound the (queries x vectors) score block to ~64 MiB
    for lo in range(0, m, step):
        block = queries[lo : lo + step] @ vectors.T
        top = np.argpartition(-block, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n), (len(block), 1))
        top_scores = np.take_along_axis(block, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        scores[lo : lo + step] = np.take_along_axis(top_scores, order, axis=1)
        positions[lo : lo + step] = np.take_along_axis(top, order, axis=1)
    return scores, positions


def _exact_positions(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    if hasattr(faiss, "knn"):  # brute force without copying the vectors into an IndexFlatIP
        return faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)[1]
    return exact_search(vectors, queries, k)[1]


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    hits = sum(len(np.intersect1d(f[f >= 0], t)) for f, t in zip(found, truth))
    return hits / (len(truth) * k)


def _apply_params(index: faiss.Index, kind: str, params: dict) -> None:
    if kind == "hnsw":
        index.hnsw.efSearch = int(params["efSearch"])
    elif kind == "ivf":
        index.nprobe = int(params["nprobe"])


def _ivf_nlist(n: int, max_train: int | None = None) -> int:
    # ~4*sqrt(n) lists, but keep >= 39 training points per centroid (below that faiss k-means warns).
    return max(1, min(int(4 * np.sqrt(n)), min(n, max_train or n) // 39))


def build_index(
    vectors: np.ndarray,
    *,
    kind: str | None = None,
    exact_max_rows: int = EXACT_MAX_ROWS,
    target_recall: float = TARGET_RECALL,
    seed: int = 0,
    tune_queries: np.ndarray | None = None,
    latency_budget_ms: float | None = LATENCY_BUDGET_MS,
) -> AnnIndex:
    """Build an index over `vectors` (n, d); position i in results is row i of `vectors`.

    HNSW/IVF search parameters are doubled from a small value until recall@10 against exact search reaches
    `target_recall` on ~200 perturbed data points drawn with `seed` (see TUNE_NOISE), or on `tune_queries`
    when given: pass real query vectors if you have them, as text queries may sit far from the image vectors.
    Like autofaiss, the tuner keeps to a latency budget: a setting whose median single-query time exceeds
    `latency_budget_ms` is not taken (the smallest setting always is), and the recall it settles for is logged.
    n == 0 always gives an empty flat index.
    """
    x = _as_matrix(vectors, "vectors")
    n, d = x.shape
    kind = kind or choose_kind(n, exact_max_rows=exact_max_rows)
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; expected one of {KINDS}")
    if n == 0 or kind == "flat":
        index = faiss.IndexFlatIP(d)
        index.add(x)
        return AnnIndex(index, "flat", {}, 1.0)

    rng = np.random.default_rng(seed)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.add(x)
        params = {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION}
        knob, value, limit = "efSearch", HNSW_EF_START, max(HNSW_EF_START, min(HNSW_EF_MAX, n))
    else:
        nlist = _ivf_nlist(n)
        index = _trained_ivf(x[np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False))], nlist, seed)
        index.add(x)
        params = {"nlist": nlist}
        knob, value, limit = "nprobe", 1, nlist

    q = _tuning_queries(x, rng, tune_queries)
    k = min(TUNE_K, n)
    truth = _exact_positions(x, q, k)
    recall_at = lambda: _recall(index.search(q, k)[1], truth)  # noqa: E731
    params, recall = _tune(index, kind, params, knob, value, limit, recall_at, q, k, target_recall, latency_budget_ms)
    return AnnIndex(index, kind, params, float(recall))


def _tuning_queries(sample: np.ndarray, rng: np.random.Generator, given: np.ndarray | None) -> np.ndarray:
    """The given query vectors, else ~TUNE_QUERIES rows of ``sample`` moved off the data (see TUNE_NOISE)."""
    if given is not None:
        return _as_matrix(given, "tune_queries")
    q = sample[np.sort(rng.choice(len(sample), size=min(len(sample), TUNE_QUERIES), replace=False))]
    if TUNE_NOISE > 0:
        noise = rng.standard_normal(q.shape).astype(np.float32)
        q = q + TUNE_NOISE * noise / np.linalg.norm(noise, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
    return np.ascontiguousarray(q, dtype=np.float32)


def _tune(index, kind, params, knob, value, limit, recall_at, q, k, target_recall, latency_budget_ms) -> tuple[dict, float]:
    """Double ``knob`` from ``value`` until ``recall_at()`` reaches the target, within the latency budget."""
    accepted: tuple[int, float] | None = None
    while True:
        params[knob] = value
        _apply_params(index, kind, params)
        recall = recall_at()
        if accepted is not None and latency_budget_ms is not None and _median_ms(index, q, k) > latency_budget_ms:
            value, recall = accepted
            params[knob] = value
            _apply_params(index, kind, params)
            break
        if recall >= target_recall or value >= limit:
            break
        accepted = (value, recall)
        value = min(value * 2, limit)
    if recall < target_recall:
        log.warning("%s index reached recall@%d=%.3f < %.3f at %s=%d", kind, k, recall, target_recall, knob, value)
    return params, recall


def _lists_on_disk(index: faiss.Index) -> bool:
    ivf = faiss.try_extract_index_ivf(index)
    return ivf is not None and isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists)


def _trained_ivf(sample: np.ndarray, nlist: int, seed: int) -> faiss.IndexIVFFlat:
    quantizer = faiss.IndexFlatIP(sample.shape[1])
    index = faiss.IndexIVFFlat(quantizer, sample.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.cp.spherical = True  # centroids on the unit sphere, like the data
    index.train(sample)
    return index


def build_ivf_on_disk(
    read_blocks: Callable[[], Iterator[np.ndarray]],
    n: int,
    sample: np.ndarray,
    data_path: Path,
    *,
    seed: int = 0,
    tune_queries: np.ndarray | None = None,
    target_recall: float = TARGET_RECALL,
    latency_budget_ms: float | None = LATENCY_BUDGET_MS,
) -> AnnIndex:
    """An IVF index over n vectors that are never all in memory at once; its lists live in the file ``data_path``.

    ``read_blocks()`` must yield the n vectors as (m, d) float32 blocks, in the same order on every
    call (position i = the i-th vector); it is called twice: once to assign every vector to its list,
    once to write the lists into ``data_path`` (see data_path_for). ``sample`` (at most
    IVF_TRAIN_MAX rows drawn from the vectors) trains the
    centroids and seeds the tuning queries. What stays in memory: the sample, one block, the
    centroids and 8 bytes per vector (its list); the lists are written into a file of their final
    size, through a fresh memory map per block so that written pages leave the process as it goes.
    The result searches through a read-only map of that file (``AnnIndex.data_file``); save_index
    then records it beside the index.
    Recall is measured exactly as build_index measures it, without reading the lists: IVFFlat
    finds a true neighbour iff its list is probed. Tuning queries come from the sample.
    """
    sample = _as_matrix(sample, "sample")
    nlist = _ivf_nlist(n, max_train=len(sample))
    clock = time.perf_counter()
    index = _trained_ivf(sample, nlist, seed)
    quantizer = index.quantizer
    seconds = {"train": time.perf_counter() - clock}
    clock = time.perf_counter()

    assignments = np.empty(n, dtype=np.int64)
    fingerprints = []  # the write pass must see the very vectors that were assigned
    seen = 0
    for block in read_blocks():
        block = _as_matrix(block, "block")
        if seen + len(block) > n:
            raise ValueError(f"read_blocks gave more than the {n} vectors announced")
        assignments[seen : seen + len(block)] = quantizer.assign(block, 1).ravel()
        fingerprints.append(zlib.crc32(block))
        seen += len(block)
    if seen != n:
        raise ValueError(f"read_blocks gave {seen} vectors, {n} announced")
    sizes = np.bincount(assignments, minlength=nlist).astype(np.uint64)
    seconds["assign"] = time.perf_counter() - clock
    clock = time.perf_counter()
    code_size = index.code_size
    total = int(sizes.sum()) * (code_size + 8)  # faiss's OnDiskInvertedLists layout: codes, then int64 ids

    final = Path(data_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(final.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            # Allocated now, not sparse: a disk that fills while the lists are written through the
            # memory map would kill the process (SIGBUS) instead of raising here.
            if total:
                os.posix_fallocate(f.fileno(), 0, total)
        filled = np.zeros(nlist, dtype=np.int64)
        start = 0
        for number, block in enumerate(read_blocks()):
            block = _as_matrix(block, "block")
            if number >= len(fingerprints) or zlib.crc32(block) != fingerprints[number]:
                raise ValueError("read_blocks gave different vectors on its second pass")
            lists = _lists_file(tmp, sizes, code_size, total, writable=True)
            _write_block(lists, block, assignments[start : start + len(block)], start, filled)
            del lists  # unmaps: the pages written leave this process's memory
            start += len(block)
        if start != n or not np.array_equal(filled, sizes.astype(np.int64)):
            raise ValueError("read_blocks gave different vectors on its second pass")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)

    seconds["write"] = time.perf_counter() - clock
    clock = time.perf_counter()
    lists = _lists_file(final, sizes, code_size, total, writable=False)
    index.replace_invlists(lists, True)
    lists.this.disown()  # the index owns (and frees) its lists
    index.ntotal = n

    rng = np.random.default_rng(seed)
    q = _tuning_queries(sample, rng, tune_queries)
    k = min(TUNE_K, n)
    truth = _streamed_exact_positions(read_blocks, q, k)
    truth_lists = assignments[truth]
    recall_at = lambda: _recall_by_lists(quantizer, q, truth_lists, index.nprobe)  # noqa: E731
    params = {"nlist": nlist}
    params, recall = _tune(index, "ivf", params, "nprobe", 1, nlist, recall_at, q, k, target_recall, latency_budget_ms)
    seconds["tune"] = time.perf_counter() - clock
    return AnnIndex(index, "ivf", params, float(recall), data_file=final,
                    build_seconds={phase: round(t, 3) for phase, t in seconds.items()})


def data_path_for(index_path: Path) -> Path:
    """A new, unique name for the lists file of an on-disk index to be saved at ``index_path``.

    Unique per build, so a process still mapping the previous build's lists is never disturbed.
    """
    index_path = Path(index_path)
    return index_path.with_name(f"{index_path.name}.{uuid.uuid4().hex}.ivfdata")


def _lists_file(path: Path, sizes: np.ndarray, code_size: int, total: int, *, writable: bool) -> faiss.OnDiskInvertedLists:
    """faiss inverted lists laid out back to back in ``path`` (one list per slot of its exact size), mapped."""
    lists = faiss.OnDiskInvertedLists(len(sizes), code_size, str(path))
    lists.set_all_lists_sizes(faiss.swig_ptr(sizes))
    lists.totsize = total
    lists.read_only = not writable
    lists.prefetch_nthread = 0  # no read-ahead threads per search (see _read_on_disk)
    lists.do_mmap()
    return lists


def _write_block(lists, block: np.ndarray, assigned: np.ndarray, start: int, filled: np.ndarray) -> None:
    """Append a block's vectors (positions start..) to their lists."""
    order = np.argsort(assigned, kind="stable")
    grouped = assigned[order]
    bounds = np.flatnonzero(np.diff(grouped)) + 1
    for chunk in np.split(order, bounds):
        if not len(chunk):
            continue
        list_no = int(assigned[chunk[0]])
        ids = (chunk + start).astype(np.int64)
        codes = np.ascontiguousarray(block[chunk]).view(np.uint8)
        lists.update_entries(list_no, int(filled[list_no]), len(chunk), faiss.swig_ptr(ids), faiss.swig_ptr(codes))
        filled[list_no] += len(chunk)


def _streamed_exact_positions(read_blocks, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k positions of each query over all blocks, one block in memory at a time."""
    best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_positions = np.full((len(queries), k), -1, dtype=np.int64)
    start = 0
    for block in read_blocks():
        block = _as_matrix(block, "block")
        kk = min(k, len(block))
        scores, positions = faiss.knn(queries, block, kk, metric=faiss.METRIC_INNER_PRODUCT)
        scores = np.concatenate([best_scores, scores], axis=1)
        positions = np.concatenate([best_positions, positions + start], axis=1)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best_scores, best_positions = np.take_along_axis(scores, top, 1), np.take_along_axis(positions, top, 1)
        start += len(block)
    return best_positions


def _recall_by_lists(quantizer: faiss.Index, queries: np.ndarray, truth_lists: np.ndarray, nprobe: int) -> float:
    """IVFFlat's recall@k at ``nprobe``: the share of true neighbours whose list is among those probed."""
    probed = quantizer.search(queries, nprobe)[1]
    hits = sum(np.isin(t, p).sum() for t, p in zip(truth_lists, probed))
    return float(hits / truth_lists.size)


LATENCY_TRIES = 3


def _median_ms(index: faiss.Index, queries: np.ndarray, k: int) -> float:
    """Median over queries of one query's search time, as a user's search sees it on an idle machine.

    Each query's time is its best of LATENCY_TRIES: the index is built for the machine, not for
    the moment, so a busy neighbour's passing load should not make the tuner settle for less recall.
    """
    queries = queries[:LATENCY_QUERIES_ON_DISK if _lists_on_disk(index) else LATENCY_QUERIES]
    index.search(queries, k)  # warm the caches first: a fresh index reads cold pages
    times = []
    for q in queries:
        best = math.inf
        for _ in range(LATENCY_TRIES):
            started = time.perf_counter()
            index.search(q[None, :], k)
            best = min(best, time.perf_counter() - started)
        times.append(best)
    return float(np.median(times) * 1000)


def search(ann: AnnIndex, queries: np.ndarray, k: int, *, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product: (scores, positions), each (m, k') with k' <= min(k, ntotal), scores descending.

    A 1-D query gives m == 1. Trailing columns that faiss padded with -1 in every row are dropped; with
    several queries, a row with fewer hits than another keeps position -1 / score -inf in its tail.
    ``threads`` sets FAISS's OpenMP threads for this calling thread: a server answering many
    single queries at once gains more from running them side by side than from splitting each.
    """
    if threads is not None:
        faiss.omp_set_num_threads(threads)
    q = _as_matrix(np.atleast_2d(queries), "queries")
    if q.shape[1] != ann.dim:
        raise ValueError(f"query dimension {q.shape[1]} != index dimension {ann.dim}")
    k = max(0, min(k, ann.ntotal))
    if k == 0 or len(q) == 0:
        return np.empty((len(q), 0), dtype=np.float32), np.empty((len(q), 0), dtype=np.int64)
    scores, positions = ann.index.search(q, k)
    valid = positions >= 0
    keep = int(valid.sum(axis=1).max())
    scores, positions, valid = scores[:, :keep], positions[:, :keep], valid[:, :keep]
    scores[~valid] = -np.inf
    return scores, positions.astype(np.int64, copy=False)


def reconstruct(ann: AnnIndex, position: int) -> np.ndarray | None:
    """The stored vector at ``position``, where the index keeps vectors as they are (flat); else None."""
    if ann.kind != "flat" or ann.device != "cpu" or not 0 <= position < ann.ntotal:
        return None
    return np.asarray(ann.index.reconstruct(int(position)), dtype=np.float32)


def sidecar_path(path: Path) -> Path:
    """Where the JSON description of the index at `path` lives."""
    path = Path(path)
    return path.with_suffix(path.suffix + ".json")


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _identity(stat: os.stat_result) -> dict:
    return {"inode": stat.st_ino, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns}


def _unchanged_since_saved(stat: os.stat_result, recorded: dict | None, side_stat: os.stat_result) -> bool:
    """Whether the index file is provably the one save_index checksummed, without reading it.

    Any write to a file moves its ctime, and a replacement changes its inode. File timestamps are
    coarse (a few ms), so a write within the same tick as the recorded ctime could leave it unmoved;
    as in git's "racily clean" rule, the identity is trusted only when the sidecar was written in a
    strictly later tick than the index's last change, and save_index waits a tick to make that so.
    Not caught: another process writing the file in the instant between save_index's rename and its
    stat, or the storage corrupting bytes underneath the filesystem.
    """
    return recorded == _identity(stat) and recorded["ctime_ns"] < side_stat.st_mtime_ns


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _touch_past(path: Path, tick_ns: int, tries: int = 25) -> bool:
    """Move ``path``'s mtime past ``tick_ns``, waiting for the file clock; False if it never got there."""
    for _ in range(tries):
        if path.stat().st_mtime_ns > tick_ns:
            return True
        time.sleep(0.004)
        os.utime(path)
    return path.stat().st_mtime_ns > tick_ns


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_in(folder: Path, name: str) -> Path:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def save_index(ann: AnnIndex, path: Path, meta: dict) -> None:
    """Atomically write the index to `path` and its description + `meta` to `sidecar_path(path)`."""
    path, side = Path(path), sidecar_path(path)
    json.dumps(meta)  # fail on unserialisable meta before touching any file
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu_index = ann.index
    if ann.device != "cpu":
        cpu_index = faiss.index_gpu_to_cpu(ann.index)
    data = Path(ann.data_file) if ann.data_file is not None and ann.device == "cpu" else None
    if data is not None and data.parent.resolve() != path.parent.resolve():
        raise ValueError(f"an on-disk index's lists must be saved beside it: {data} is not in {path.parent}")
    tmp_index = _temp_in(path.parent, path.name)
    tmp_side = None
    try:
        if data is not None:  # the index file names its lists file; readers find it beside the index
            lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(cpu_index).invlists)
            lists.filename = data.name
            try:
                faiss.write_index(cpu_index, str(tmp_index))
            finally:
                lists.filename = str(data)
        else:
            faiss.write_index(cpu_index, str(tmp_index))
        with open(tmp_index, "rb+") as f:
            os.fsync(f.fileno())
        doc = {
            "format": _FORMAT,
            "kind": ann.kind,
            "params": ann.params,
            "recall_at_10": ann.recall_at_10,
            "ntotal": ann.ntotal,
            "dim": ann.dim,
            "index_bytes": tmp_index.stat().st_size,
            "index_crc32": _crc32(tmp_index),
            "meta": meta,
        }
        if data is not None:
            doc.update({"data_file": data.name, "data_bytes": data.stat().st_size, "data_crc32": _crc32(data),
                        "data_identity": _identity(data.stat())})
        # Drop the old sidecar first: a crash before the new one is in place then leaves no sidecar
        # (=> rebuild), never an old sidecar vouching for a new index. The size/crc also tie the pair.
        side.unlink(missing_ok=True)
        os.replace(tmp_index, path)
        doc["index_identity"] = _identity(path.stat())  # lets load_index skip re-reading an untouched file
        tmp_side = _temp_in(path.parent, side.name)
        _write_durably(tmp_side, json.dumps(doc, indent=2))
        if not _touch_past(tmp_side, doc["index_identity"]["ctime_ns"]):
            del doc["index_identity"]  # later writes could not be told apart: always checksum
            _write_durably(tmp_side, json.dumps(doc, indent=2))
        os.replace(tmp_side, side)
        _fsync_dir(path.parent)
    finally:
        for tmp in (tmp_index, tmp_side):
            if tmp is not None:
                tmp.unlink(missing_ok=True)
    remove_unused_lists(path, keep=data)


STALE_BUILD_SECONDS = 3600


def remove_unused_lists(path: Path, keep: Path | None) -> None:
    """Delete the lists files of earlier builds of the index at ``path`` (a process mapping one keeps
    its pages), and the leftovers of builds or downloads that died over an hour ago (a younger one
    may still be under way in another process)."""
    for old in path.parent.glob(f"{glob.escape(path.name)}.*.ivfdata*"):
        if keep is not None and old.name == keep.name:
            continue
        try:
            if old.suffix not in (".tmp", ".download") or time.time() - old.stat().st_mtime > STALE_BUILD_SECONDS:
                old.unlink()
        except OSError:
            pass


def index_files(path: Path) -> list[Path]:
    """Every file the saved index at ``path`` consists of: the index, its lists file if any, its sidecar."""
    path = Path(path)
    try:
        data = json.loads(sidecar_path(path).read_text(encoding="utf-8")).get("data_file")
    except (OSError, ValueError, AttributeError):
        data = None
    return [path, *([path.with_name(data)] if data else []), sidecar_path(path)]


def read_meta(path: Path) -> dict | None:
    """The `meta` saved with the index at `path`, from its sidecar alone (the index is not read)."""
    try:
        meta = json.loads(sidecar_path(path).read_text(encoding="utf-8"))["meta"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta if isinstance(meta, dict) else None


def _read_faiss(path: Path, kind: str, mmap: bool) -> faiss.Index:
    flags = []
    if mmap:
        # MMAP_IFC maps flat codes (flat, HNSW storage); plain MMAP maps IVF lists. Unsupported => normal read.
        if kind != "ivf" and hasattr(faiss, "IO_FLAG_MMAP_IFC"):
            flags.append(faiss.IO_FLAG_MMAP_IFC)
        flags.append(faiss.IO_FLAG_MMAP)
    for flag in flags:
        try:
            return faiss.read_index(str(path), flag)
        except Exception:
            pass  # this index type cannot be mapped that way
    return faiss.read_index(str(path))


def _read_on_disk(path: Path, doc: dict, verify: bool, side_stat: os.stat_result) -> tuple[faiss.Index, Path]:
    """An on-disk IVF index: its header from ``path``, its lists mapped read-only from the file beside it."""
    data = path.with_name(Path(doc["data_file"]).name)
    stat = data.stat()
    if stat.st_size != int(doc["data_bytes"]):
        raise ValueError("lists file size does not match its sidecar")
    if verify and not _unchanged_since_saved(stat, doc.get("data_identity"), side_stat) and _crc32(data) != int(doc["data_crc32"]):
        raise ValueError("lists file checksum does not match its sidecar")
    index = faiss.read_index(str(path), faiss.IO_FLAG_SKIP_IVF_DATA | faiss.IO_FLAG_READ_ONLY)
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    if not isinstance(lists, faiss.OnDiskInvertedLists) or lists.totsize != stat.st_size:
        raise ValueError("index file does not describe its lists file")
    lists.filename = str(data)
    # faiss would start 32 threads per search to read the probed lists ahead; the page cache reads
    # ahead already, and beside busy processes those threads made a 0.05 ms search take 4 ms.
    lists.prefetch_nthread = 0
    lists.do_mmap()
    return index, data


_INDEX_TYPES = {"flat": faiss.IndexFlatIP, "hnsw": faiss.IndexHNSWFlat, "ivf": faiss.IndexIVFFlat}


def load_index(path: Path, *, mmap: bool = True, verify: bool = True) -> tuple[AnnIndex, dict] | None:
    """Read an index saved by `save_index`: (AnnIndex, meta), or None if either file is missing or broken.

    `verify` checks the index file's CRC32 (one sequential read of the whole file, about 0.5 s per GB
    from the page cache), unless the file is provably untouched since save_index checksummed it (same
    inode, size and timestamps; see _unchanged_since_saved), which keeps a cold query on a
    memory-mapped index from reading all of it. The size is always checked.
    A memory-mapped index is read-only: search it, do not add to it.
    """
    path, side = Path(path), sidecar_path(path)
    try:
        doc = json.loads(side.read_text(encoding="utf-8"))
        kind, params, ntotal, dim = doc["kind"], doc["params"], int(doc["ntotal"]), int(doc["dim"])
        meta, recall = doc["meta"], doc["recall_at_10"]
        if doc.get("format") != _FORMAT or kind not in KINDS or not isinstance(params, dict):
            raise ValueError(f"unsupported sidecar {doc.get('format')!r}/{kind!r}")
        stat = path.stat()
        if stat.st_size != int(doc["index_bytes"]):
            raise ValueError("index file size does not match its sidecar")
        checksum = verify and not _unchanged_since_saved(stat, doc.get("index_identity"), side.stat())
        if checksum and _crc32(path) != int(doc["index_crc32"]):
            raise ValueError("index file checksum does not match its sidecar")
        if doc.get("data_file"):
            index, data = _read_on_disk(path, doc, verify, side.stat())
        else:
            index, data = _read_faiss(path, kind, mmap), None  # already the concrete class; no downcast_index (it would free)
        if not isinstance(index, _INDEX_TYPES[kind]) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(f"index file holds {type(index).__name__}, sidecar says {kind}")
        if index.ntotal != ntotal or index.d != dim:
            raise ValueError("index size or dimension does not match its sidecar")
        _apply_params(index, kind, params)
    except Exception as exc:  # missing, unreadable or inconsistent: the caller rebuilds from the store
        log.info("not using index %s: %s", path, exc)
        return None
    return AnnIndex(index, kind, params, None if recall is None else float(recall), data_file=data), meta


def to_gpu_if_available(ann: AnnIndex) -> AnnIndex:
    """Move a flat or IVF index to GPU 0 when this faiss build has GPUs; HNSW (CPU-only in faiss) stays."""
    if ann.device != "cpu" or ann.kind == "hnsw":
        return ann
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() <= 0:
        return ann
    res = faiss.StandardGpuResources()  # must outlive the GPU index, hence kept on the AnnIndex
    gpu_index = faiss.index_cpu_to_gpu(res, 0, ann.index)  # copies nprobe; faiss-gpu caps search k at 2048
    return AnnIndex(gpu_index, ann.kind, ann.params, ann.recall_at_10, device="gpu:0", _gpu_resources=res)
