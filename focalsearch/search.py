"""The query side: derived FAISS indexes kept in step with their tables, and ranked hits.

Glue between the store (LanceDB) and ann (FAISS); neither of them knows the other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc

from focalsearch import ann
from focalsearch.store import Condition, Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    """One search result."""

    rank: int
    path: str
    score: float


@dataclass(frozen=True)
class ConditionIndex:
    """A condition's FAISS index with the row paths that its positions stand for."""

    ann: ann.AnnIndex
    paths: pa.Array
    table_version: int


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


def build_condition_index(store: Store, condition: Condition, *, exact_max_rows: int = ann.EXACT_MAX_ROWS) -> ConditionIndex:
    """Build the FAISS index from the table and persist it beside the table."""
    files = store.data_files(condition)
    version, paths, vectors = store.snapshot(condition)
    index = ann.build_index(vectors, exact_max_rows=exact_max_rows)
    index_file, paths_file = faiss_files(store, condition)
    meta = {"table": condition.table, "table_version": version, "rows": len(paths), "data_files": files}
    try:
        index_file.parent.mkdir(parents=True, exist_ok=True)
        _write_paths(paths_file, paths)
        ann.save_index(index, index_file, meta)
    except Exception as exc:  # FAISS raises RuntimeError for a full disk
        # Derived data: a read-only or full index folder costs a rebuild next time, nothing more.
        log.info("not saving the FAISS index of %s: %s", condition.table, exc)
    return ConditionIndex(ann.to_gpu_if_available(index), paths, version)


def data_unchanged(recorded: dict | None, current: dict) -> bool:
    """Every data file the index was built from is still there, the same size and age.

    New files are allowed (a new table version then says the index is stale); a missing, truncated
    or rewritten one means the table's data is not what the index was built from.
    """
    return isinstance(recorded, dict) and all(current.get(name) == list(stat) for name, stat in recorded.items())


def load_condition_index(store: Store, condition: Condition, **build_options) -> ConditionIndex:
    """The condition's FAISS index, rebuilt from the table when missing, broken or stale."""
    index_file, paths_file = faiss_files(store, condition)
    loaded = ann.load_index(index_file)
    version = store.version(condition)
    if loaded is not None:
        index, meta = loaded
        paths = _read_paths(paths_file)
        fresh = meta.get("table") == condition.table and meta.get("table_version") == version
        fresh = fresh and data_unchanged(meta.get("data_files"), store.data_files(condition))
        if fresh and paths is not None and len(paths) == index.ntotal == meta.get("rows"):
            return ConditionIndex(ann.to_gpu_if_available(index), paths, version)
    return build_condition_index(store, condition, **build_options)


def search_index(index: ConditionIndex, query: np.ndarray, k: int, *, exclude: str | None = None) -> list[Hit]:
    """Top-k hits by inner product, leaving out the path ``exclude`` (a query image in the index)."""
    extra = 1 if exclude is not None else 0
    scores, positions = ann.search(index.ann, np.asarray(query, dtype=np.float32), k + extra)
    hits = []
    for score, position in zip(scores[0], positions[0]):
        path = index.paths[int(position)].as_py()
        if path == exclude:
            continue
        hits.append(Hit(rank=len(hits) + 1, path=path, score=float(score)))
    return hits[:k]
