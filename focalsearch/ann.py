"""FAISS indexes over the store's L2-normalised float32 vectors (inner product = cosine).

The only module that imports faiss. Indexes are derived data: LanceDB is the source of truth, positions
0..n-1 in an index are positions in the vector array it was built from, and the caller decides staleness
from the `meta` dict saved beside the index.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import zlib
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
TARGET_RECALL: float = 0.95
# Median single-query search time the tuner may spend for recall (2-core CPU; see benchmarks/ann.py).
LATENCY_BUDGET_MS: float = 2.0
LATENCY_QUERIES = 50

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


def _ivf_nlist(n: int) -> int:
    # ~4*sqrt(n) lists, but keep >= 39 training points per centroid (below that faiss k-means warns).
    return max(1, min(int(4 * np.sqrt(n)), n // 39))


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
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.cp.spherical = True  # centroids on the unit sphere, like the data
        train = x[np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False))]
        index.train(train)
        index.add(x)
        params = {"nlist": nlist}
        knob, value, limit = "nprobe", 1, nlist

    if tune_queries is not None:
        q = _as_matrix(tune_queries, "tune_queries")
    else:
        q = x[np.sort(rng.choice(n, size=min(n, TUNE_QUERIES), replace=False))]
        if TUNE_NOISE > 0:
            noise = rng.standard_normal(q.shape).astype(np.float32)
            q = q + TUNE_NOISE * noise / np.linalg.norm(noise, axis=1, keepdims=True)
            q = np.ascontiguousarray(q / np.linalg.norm(q, axis=1, keepdims=True), dtype=np.float32)
    k = min(TUNE_K, n)
    truth = _exact_positions(x, q, k)
    accepted: tuple[int, float] | None = None
    while True:
        params[knob] = value
        _apply_params(index, kind, params)
        recall = _recall(index.search(q, k)[1], truth)
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
    return AnnIndex(index, kind, params, float(recall))


def _median_ms(index: faiss.Index, queries: np.ndarray, k: int) -> float:
    """Median wall time of one query at a time, as a user's search sees it."""
    index.search(queries[:LATENCY_QUERIES], k)  # warm the caches first: a fresh index reads cold pages
    times = []
    for q in queries[:LATENCY_QUERIES]:
        started = time.perf_counter()
        index.search(q[None, :], k)
        times.append(time.perf_counter() - started)
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


def _unchanged_since_saved(stat: os.stat_result, doc: dict, side_stat: os.stat_result) -> bool:
    """Whether the index file is provably the one save_index checksummed, without reading it.

    Any write to a file moves its ctime, and a replacement changes its inode. File timestamps are
    coarse (a few ms), so a write within the same tick as the recorded ctime could leave it unmoved;
    as in git's "racily clean" rule, the identity is trusted only when the sidecar was written in a
    strictly later tick than the index's last change, and save_index waits a tick to make that so.
    Not caught: another process writing the file in the instant between save_index's rename and its
    stat, or the storage corrupting bytes underneath the filesystem.
    """
    recorded = doc.get("index_identity")
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
    tmp_index = _temp_in(path.parent, path.name)
    tmp_side = None
    try:
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
        checksum = verify and not _unchanged_since_saved(stat, doc, side.stat())
        if checksum and _crc32(path) != int(doc["index_crc32"]):
            raise ValueError("index file checksum does not match its sidecar")
        index = _read_faiss(path, kind, mmap)  # already the concrete class; no downcast_index (it would free)
        if not isinstance(index, _INDEX_TYPES[kind]) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(f"index file holds {type(index).__name__}, sidecar says {kind}")
        if index.ntotal != ntotal or index.d != dim:
            raise ValueError("index size or dimension does not match its sidecar")
        _apply_params(index, kind, params)
    except Exception as exc:  # missing, unreadable or inconsistent: the caller rebuilds from the store
        log.info("not using index %s: %s", path, exc)
        return None
    return AnnIndex(index, kind, params, None if recall is None else float(recall)), meta


def to_gpu_if_available(ann: AnnIndex) -> AnnIndex:
    """Move a flat or IVF index to GPU 0 when this faiss build has GPUs; HNSW (CPU-only in faiss) stays."""
    if ann.device != "cpu" or ann.kind == "hnsw":
        return ann
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() <= 0:
        return ann
    res = faiss.StandardGpuResources()  # must outlive the GPU index, hence kept on the AnnIndex
    gpu_index = faiss.index_cpu_to_gpu(res, 0, ann.index)  # copies nprobe; faiss-gpu caps search k at 2048
    return AnnIndex(gpu_index, ann.kind, ann.params, ann.recall_at_10, device="gpu:0", _gpu_resources=res)
