"""The query side: derived FAISS indexes kept in step with their tables, and ranked hits.

Glue between the store (LanceDB) and ann (FAISS); neither of them knows the other.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc

from focalsearch import ann, objectstore
from focalsearch.store import Condition, Store, row_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    """One search result: its fused score, and its cosine under each condition of the query."""

    rank: int
    path: str
    score: float
    image_id: str = ""
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The file name: the path's last part (of a local path or an object URI)."""
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def to_dict(self) -> dict:
        return {
            "rank": self.rank, "path": self.path, "name": self.name, "score": round(self.score, 6), "image_id": self.image_id,
            "scores": {k: round(v, 6) for k, v in self.scores.items()},
        }


@dataclass(frozen=True)
class QueryPart:
    """One condition of a query: its search index, the query's vector under it, and its weight."""

    condition: Condition
    index: "ConditionIndex"
    vector: np.ndarray
    weight: float = 1.0
    from_text: bool = False  # a text query: its cosines to images are on another scale than image to image


@dataclass(frozen=True)
class ConditionIndex:
    """A condition's FAISS index with the row paths that its positions stand for."""

    ann: ann.AnnIndex
    paths: pa.Array
    table_version: int
    data_files: dict = field(default_factory=dict)  # the table's data files it was built from (size, mtime)
    _positions: dict = field(default_factory=dict, repr=False, compare=False)  # row id -> position, filled on first use
    _calibration: dict = field(default_factory=dict, repr=False, compare=False)  # see same_levels, filled on first use

    def stored_vector(self, image_id: str) -> np.ndarray | None:
        """A row's vector straight from a flat index (the same table version), or None where it cannot tell."""
        if self.ann.kind != "flat":
            return None
        if not self._positions and len(self.paths):
            self._positions.update((row_id(p), i) for i, p in enumerate(self.paths.to_pylist()))
        position = self._positions.get(image_id)
        return None if position is None else ann.reconstruct(self.ann, position)


def faiss_files(store: Store, condition: Condition) -> tuple[Path, Path]:
    """Where a condition's FAISS index and the paths of its positions are kept."""
    folder = store.root / "faiss"
    return folder / f"{condition.table}.faiss", folder / f"{condition.table}.paths.arrow"


def _read_paths(path: Path) -> pa.Array | None:
    try:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_file(source).read_all()["path"].combine_chunks()
    except (OSError, pa.ArrowException, KeyError):
        return None


def _write_paths(path: Path, paths: pa.Array) -> None:
    tmp = path.with_name(path.name + ".tmp")
    table = pa.table({"path": paths})
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


# Rows per block when a large condition's search index is built from a stream of its table
# (8192 x 512 float32 = 16 MiB; larger blocks raised the build's peak memory, see Store.read_batches).
STREAM_BLOCK_ROWS = 8192


def build_condition_index(store: Store, condition: Condition, *, exact_max_rows: int = ann.EXACT_MAX_ROWS) -> ConditionIndex:
    """Build the FAISS index from the table and persist it beside the table.

    Up to ``exact_max_rows`` rows: an exact index, built in memory. Above: an IVF index built from
    a stream of the table (ann.build_ivf_on_disk), so memory does not grow with the table; where
    its folder cannot be written (a read-only index, a full disk) it is built in memory instead.
    """
    for attempt in range(BUILD_ATTEMPTS):
        version = store.version(condition)
        try:
            return _build_at(store, condition, version, exact_max_rows)
        except Exception:
            # A build of a large table takes a while; an indexer may commit, compact and clean up
            # the version it was reading meanwhile. Then build the new version; otherwise fail.
            if attempt + 1 == BUILD_ATTEMPTS or store.version(condition) == version:
                raise
            log.info("the table of %s changed while its search index was built; building again", condition.table)
    raise AssertionError("unreachable")


BUILD_ATTEMPTS = 3


def _build_at(store: Store, condition: Condition, version: int, exact_max_rows: int) -> ConditionIndex:
    files = store.data_files(condition)
    index_file, paths_file = faiss_files(store, condition)
    paths = _paths_at(store, condition, version)
    index = None
    if len(paths) > exact_max_rows:
        try:
            index = _build_streamed(store, condition, version, paths, index_file)
        except (OSError, RuntimeError) as exc:  # faiss raises RuntimeError for I/O errors
            log.info("building the FAISS index of %s in memory: %s", condition.table, exc)
    if index is None:
        index = ann.build_index(_vectors_at(store, condition, version, paths), exact_max_rows=exact_max_rows)
    meta = {"table": condition.table, "table_version": version, "rows": len(paths), "data_files": files}
    try:
        index_file.parent.mkdir(parents=True, exist_ok=True)
        _write_paths(paths_file, paths)
        ann.save_index(index, index_file, meta)
        if store.uri is not None:
            _upload(store, index_file, paths_file)
    except Exception as exc:  # FAISS raises RuntimeError for a full disk
        # Derived data: a read-only or full index folder costs a rebuild next time, nothing more.
        log.info("not saving the FAISS index of %s: %s", condition.table, exc)
    return ConditionIndex(ann.to_gpu_if_available(index), paths, version, files)


def _paths_at(store: Store, condition: Condition, version: int) -> pa.Array:
    batches = store.read_batches(condition, ["path"], version=version, batch_rows=STREAM_BLOCK_ROWS)
    chunks = [batch.column("path") for batch in batches]
    return pa.concat_arrays(chunks) if chunks else pa.array([], pa.string())


def _vector_blocks(store: Store, condition: Condition, version: int, paths: pa.Array):
    """A callable streaming the table's vectors at ``version`` in blocks, row order checked against ``paths``."""
    def blocks():
        start = 0
        for batch in store.read_batches(condition, ["path", "vector"], version=version, batch_rows=STREAM_BLOCK_ROWS):
            if not batch.column("path").equals(paths.slice(start, len(batch))):
                raise RuntimeError(f"rows of {condition.table} came back in another order")
            start += len(batch)
            yield batch.column("vector").flatten().to_numpy().reshape(-1, condition.dim)
    return blocks


def _vectors_at(store: Store, condition: Condition, version: int, paths: pa.Array) -> np.ndarray:
    blocks = list(_vector_blocks(store, condition, version, paths)())
    return np.concatenate(blocks) if blocks else np.empty((0, condition.dim), np.float32)


def _build_streamed(store: Store, condition: Condition, version: int, paths: pa.Array, index_file: Path) -> ann.AnnIndex:
    n = len(paths)
    rng = np.random.default_rng(0)
    positions = np.sort(rng.choice(n, size=min(n, ann.IVF_TRAIN_MAX), replace=False))
    sample = np.empty((len(positions), condition.dim), dtype=np.float32)
    for lo in range(0, len(positions), 8192):  # in pieces: one take of all of it holds ~2x the sample at once
        taken = store.take_positions(condition, positions[lo:lo + 8192], ["vector"], version=version)
        sample[lo:lo + len(taken)] = taken.column("vector").combine_chunks().flatten().to_numpy().reshape(-1, condition.dim)
    blocks = _vector_blocks(store, condition, version, paths)
    return ann.build_ivf_on_disk(blocks, n, sample, ann.data_path_for(index_file))


def _upload(store: Store, index_file: Path, paths_file: Path) -> None:
    """Put a condition's FAISS files beside its tables in the bucket, for other machines' query processes.

    The sidecar goes last: a reader that finds it finds the files it describes. The lists file of
    the build it replaces is removed afterwards (each build's has its own name).
    """
    index, *data, side = ann.index_files(index_file)
    before = _bucket_sidecar(store, side)
    for local in [*data, paths_file, index, side]:
        objectstore.upload(local, f"{store.uri}/faiss/{local.name}")
    previous = (before or {}).get("data_file")
    if previous and previous not in {d.name for d in data}:
        objectstore.delete(f"{store.uri}/faiss/{previous}")


def _bucket_sidecar(store: Store, side: Path) -> dict | None:
    data = objectstore.read(f"{store.uri}/faiss/{side.name}")
    if isinstance(data, str):
        return None
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _fetch(store: Store, index_file: Path, paths_file: Path, version: int) -> None:
    """Copy a condition's FAISS files from the bucket into the local cache, when the bucket's copy
    was built from the table's version ``version``."""
    side = ann.sidecar_path(index_file)
    doc = _bucket_sidecar(store, side)
    if doc is None or not isinstance(doc.get("meta"), dict) or doc["meta"].get("table_version") != version:
        return
    data = [index_file.with_name(Path(doc["data_file"]).name)] if doc.get("data_file") else []
    try:
        for local in [*data, paths_file, index_file]:
            objectstore.download(f"{store.uri}/faiss/{local.name}", local)
        side.parent.mkdir(parents=True, exist_ok=True)
        tmp = side.with_name(side.name + ".download")
        tmp.write_text(json.dumps(doc), encoding="utf-8")
        tmp.replace(side)
        ann.remove_unused_lists(index_file, keep=data[0] if data else None)
    except OSError as exc:
        log.info("not using the bucket's FAISS files of %s: %s", index_file.stem, exc)


def built_from_current_table(store: Store, condition: Condition, table_version, data_files, version: int) -> bool:
    """Whether an index built from ``table_version`` with these data files stands for the table now.

    The version must be the table's current one, and every data file it was built from must still
    be there, the same size and age: new files are allowed (a new version then says it is stale);
    a missing, truncated or rewritten one means the table's data is not what it was built from.
    """
    current = store.data_files(condition)
    return (
        table_version == version and isinstance(data_files, dict)
        and all(current.get(name) == list(stat) for name, stat in data_files.items())
    )


def load_condition_index(store: Store, condition: Condition, **build_options) -> ConditionIndex:
    """The condition's FAISS index, rebuilt from the table when missing, broken or stale.

    For an index in object storage the local files are a cache: when they are not fresh, the copy
    in the bucket is fetched, and used if it was built from the table's current version.
    """
    index_file, paths_file = faiss_files(store, condition)
    version = store.version(condition)
    meta = ann.read_meta(index_file)
    if store.uri is not None and (meta is None or meta.get("table_version") != version):
        _fetch(store, index_file, paths_file, version)
    loaded = ann.load_index(index_file)
    if loaded is not None:
        index, meta = loaded
        paths = _read_paths(paths_file)
        fresh = meta.get("table") == condition.table and built_from_current_table(
            store, condition, meta.get("table_version"), meta.get("data_files"), version
        )
        if fresh and paths is not None and len(paths) == index.ntotal == meta.get("rows"):
            return ConditionIndex(ann.to_gpu_if_available(index), paths, version, meta["data_files"])
    return build_condition_index(store, condition, **build_options)


def search_index(index: ConditionIndex, query: np.ndarray, k: int, *, instruction: str = "", threads: int | None = None) -> list[Hit]:
    """The top-k hits by inner product under one condition (named ``instruction`` in their scores)."""
    scores, positions = ann.search(index.ann, np.asarray(query, dtype=np.float32), k, threads=threads)
    hits = []
    for rank, (score, position) in enumerate(zip(scores[0], positions[0]), start=1):
        path = index.paths[int(position)].as_py()
        hits.append(Hit(rank=rank, path=path, score=float(score), image_id=row_id(path), scores={instruction: float(score)}))
    return hits


CANDIDATES_PER_CONDITION = 100  # at least; more when k + offset asks for more
CALIBRATION_SAMPLE = 1024  # rows per condition whose cosines calibrate what "the same" means under it


@dataclass(frozen=True)
class SameLevels:
    """What "the same" and "unrelated" look like under one condition, from a sample of its rows.

    ``same`` is the median cosine of a row to its nearest other row (near neighbours under an
    instruction share its answer); ``sample`` holds the sampled vectors, against which a query's
    median cosine gives its "unrelated" level.
    """

    same: float
    sample: np.ndarray


def same_levels(store: Store, part: QueryPart) -> SameLevels:
    """The condition's calibration, computed once per search index (it is derived from the same table version)."""
    index = part.index
    cached = index._calibration.get("levels")
    if cached is not None:
        return cached
    rows = len(index.paths)
    positions = np.unique(np.linspace(0, rows - 1, min(rows, CALIBRATION_SAMPLE)).astype(np.int64)) if rows else []
    sample = np.zeros((0, part.condition.dim), dtype=np.float32)
    if len(positions):
        table = store.take_positions(part.condition, positions, ["vector"], version=index.table_version)
        sample = table["vector"].combine_chunks().flatten().to_numpy().reshape(-1, part.condition.dim).astype(np.float32)
    same = 1.0
    if len(sample) >= 2:
        scores, _ = ann.search(index.ann, sample, 2)
        same = float(np.median(scores[:, -1]))  # the first hit is the row itself (or an identical twin)
    levels = SameLevels(same, sample)
    index._calibration["levels"] = levels
    return levels


def sameness(store: Store, part: QueryPart, cosines: np.ndarray, *, threads: int | None = None) -> np.ndarray:
    """How much each row is "the same as the query" under a condition: 0 up to the midway threshold, 1 at the same level.

    The threshold lies halfway between the query's median cosine to the condition's rows (unrelated)
    and the cosine of a typical nearest neighbour (the same). For an image query that level is the
    collection's; a text query's cosines to images have their own scale, so its level is its own
    best match under the condition.
    """
    levels = same_levels(store, part)
    unrelated = float(np.median(levels.sample @ part.vector)) if len(levels.sample) else 0.0
    same = levels.same
    if part.from_text:
        scores, _ = ann.search(part.index.ann, np.asarray(part.vector, dtype=np.float32), 1, threads=threads)
        same = float(scores[0, 0]) if scores.size else same
    if same <= unrelated:  # nothing stands out as the same: penalise nothing
        return np.zeros_like(cosines)
    threshold = (same + unrelated) / 2
    return np.clip((cosines - threshold) / (same - threshold), 0.0, 1.0)


def fused_search(
    store: Store, parts: list[QueryPart], k: int, *, offset: int = 0, exclude_id: str | None = None, threads: int | None = None
) -> list[Hit]:
    """Rank several weighted conditions at once (design §3b).

    A positive weight adds weight × the row's cosine to the query under that condition. A negative
    weight means NOT the same: it subtracts |weight| × the row's sameness under that condition
    (see ``sameness``), which is 0 for rows no more alike than midway between unrelated and the
    same, so it removes what really is the same and leaves the ranking among the rest to the
    positive conditions, instead of favouring whatever is most different.

    Candidates are the union of each positively weighted condition's nearest rows; every candidate
    is then scored exactly under every condition, with its vectors read from each table at the
    version its search index was built from. A row missing from any condition is not ranked.
    """
    if len(parts) == 1 and parts[0].weight > 0:  # one condition: its own ranking, no rescoring needed
        part = parts[0]
        hits = search_index(part.index, part.vector, offset + k + 1, instruction=part.condition.instruction, threads=threads)
        hits = [h for h in hits if h.image_id != exclude_id][offset:offset + k]
        return [replace(h, rank=offset + i + 1, score=part.weight * h.score) for i, h in enumerate(hits)]
    pool = max(CANDIDATES_PER_CONDITION, 4 * (k + offset))
    candidates: dict[str, str] = {}
    for part in parts:
        if part.weight <= 0:
            continue
        _, positions = ann.search(part.index.ann, np.asarray(part.vector, dtype=np.float32), pool, threads=threads)
        for position in positions[0]:
            if position >= 0:
                path = part.index.paths[int(position)].as_py()
                candidates.setdefault(row_id(path), path)
    candidates.pop(exclude_id, None)
    ids = list(candidates)
    per_condition: dict[str, dict[str, float]] = {i: {} for i in ids}
    fused = np.zeros(len(ids))
    present = np.ones(len(ids), dtype=bool)
    for part in parts:
        vectors = store.vectors_by_id(part.condition, ids, version=part.index.table_version)
        cosines = np.zeros(len(ids))
        for j, row in enumerate(ids):
            vector = vectors.get(row)
            if vector is None:
                present[j] = False
                continue
            cosines[j] = float(vector @ part.vector)
            per_condition[row][part.condition.instruction] = float(cosines[j])
        if part.weight > 0:
            fused += part.weight * cosines
        else:
            fused += part.weight * sameness(store, part, cosines, threads=threads)
    ranked = sorted(
        ((ids[j], float(fused[j])) for j in np.flatnonzero(present)), key=lambda item: (-item[1], candidates[item[0]])
    )[offset:offset + k]
    return [
        Hit(rank=offset + i + 1, path=candidates[row], score=score, image_id=row, scores=per_condition[row])
        for i, (row, score) in enumerate(ranked)
    ]
