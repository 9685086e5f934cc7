"""LanceDB tables, one per condition, and the conditions catalog (design §3).

The only module that imports lancedb. It sees vectors, conditions and rows; never models.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa

from focalsearch.defaults import DEFAULT_INDEX_DIR  # noqa: F401  (re-exported)
from focalsearch.errors import IndexNotFoundError, StorageError

CATALOG_TABLE = "conditions"

_CATALOG_SCHEMA = pa.schema(
    [
        pa.field("table", pa.string(), nullable=False),
        pa.field("instruction", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("encoder", pa.string(), nullable=False),
        pa.field("dim", pa.int32(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("updated_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)
FILE_COLUMNS = ("id", "path", "size", "mtime_ns", "content_hash", "width", "height")

# LanceDB's default caches keep the metadata of every table version a process has seen, so the
# memory of a long indexing run grew with each commit (benchmarks/memory.py). Bounded caches keep it
# flat; the reads they serve here touch a few manifests at a time.
METADATA_CACHE_BYTES = 64 << 20
INDEX_CACHE_BYTES = 64 << 20


def row_schema(dim: int) -> pa.Schema:
    """Schema of a condition table with vectors of ``dim`` float32."""
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("path", pa.string(), nullable=False),
            pa.field("size", pa.int64()),
            pa.field("mtime_ns", pa.int64()),
            pa.field("content_hash", pa.string()),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            pa.field("vector", pa.list_(pa.float32(), dim)),
        ]
    )


def row_id(path: str) -> str:
    """Stable id of a file's row: a hash of its absolute path."""
    return hashlib.sha1(path.encode("utf-8", "surrogateescape")).hexdigest()


def table_name(model: str, encoder: str, instruction: str) -> str:
    """Readable, unique table name for a condition: slug of the instruction plus a short hash."""
    slug = re.sub(r"[^a-z0-9]+", "-", instruction.lower()).strip("-")[:40] or "unconditional"
    digest = hashlib.sha1(f"{model}\0{encoder}\0{instruction}".encode()).hexdigest()[:8]
    return f"{slug}-{digest}"


@dataclass(frozen=True)
class Condition:
    """One condition: an instruction encoded by one model and encoder into one table."""

    table: str
    instruction: str
    model: str
    encoder: str
    dim: int
    created_at: dt.datetime
    updated_at: dt.datetime


@dataclass(frozen=True)
class FileRecord:
    """What the store knows of a file under one condition (everything but the vector)."""

    id: str
    path: str
    size: int
    mtime_ns: int
    content_hash: str
    width: int
    height: int


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _storage_error(exc: OSError, root: Path) -> StorageError:
    if exc.errno == errno.ENOSPC or "No space left" in str(exc):
        return StorageError(f"no space left on the device of {root}; committed rows are kept, free space and rerun")
    return StorageError(f"cannot write the index at {root}: {' '.join(str(exc).split())[:200]}")


@contextmanager
def _storage_errors(root: Path) -> Iterator[None]:
    """Report an OSError while writing the index at ``root`` as one clear StorageError."""
    try:
        yield
    except OSError as exc:
        raise _storage_error(exc, root) from exc


def _sql_list(values: Iterable[str]) -> str:
    return ", ".join("'" + v.replace("'", "''") + "'" for v in values)


class Store:
    """A folder holding one LanceDB database: the catalog plus one table per condition."""

    def __init__(self, root: str | Path, *, create: bool = False):
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            if not create:
                raise IndexNotFoundError(f"no index at {self.root}; build one with `focalsearch index PATH`")
            with _storage_errors(self.root):
                self.root.mkdir(parents=True)
        session = lancedb.Session(index_cache_size_bytes=INDEX_CACHE_BYTES, metadata_cache_size_bytes=METADATA_CACHE_BYTES)
        self.db = lancedb.connect(str(self.root / "lancedb"), session=session)

    # -- catalog --------------------------------------------------------------------------------
    def _table_names(self) -> set[str]:
        return set(self.db.list_tables().tables)

    def _catalog(self, create: bool = False):
        if CATALOG_TABLE in self._table_names():
            return self.db.open_table(CATALOG_TABLE)
        if not create:
            return None
        return self.db.create_table(CATALOG_TABLE, schema=_CATALOG_SCHEMA, exist_ok=True)

    def conditions(self) -> list[Condition]:
        """All conditions, sorted by instruction."""
        catalog = self._catalog()
        if catalog is None:
            return []
        rows = catalog.to_arrow().to_pylist()
        return sorted((Condition(**row) for row in rows), key=lambda c: c.instruction)

    def find(self, instruction: str) -> Condition | None:
        """The condition for a normalised instruction, if indexed."""
        return next((c for c in self.conditions() if c.instruction == instruction), None)

    def ensure_condition(self, instruction: str, model: str, encoder: str, dim: int) -> Condition:
        """Return the condition, creating its table and catalog entry when new."""
        existing = self.find(instruction)
        if existing is not None:
            return existing
        now = _now()
        condition = Condition(table_name(model, encoder, instruction), instruction, model, encoder, dim, now, now)
        with _storage_errors(self.root):
            self.db.create_table(condition.table, schema=row_schema(dim), exist_ok=True)
            self._write_catalog(condition)
        return condition

    def mark_updated(self, condition: Condition) -> Condition:
        """Record that a condition's table changed now."""
        updated = Condition(**{**condition.__dict__, "updated_at": _now()})
        self._write_catalog(updated)
        return updated

    def _write_catalog(self, condition: Condition) -> None:
        data = pa.Table.from_pylist([condition.__dict__], schema=_CATALOG_SCHEMA)
        catalog = self._catalog(create=True)
        catalog.merge_insert("table").when_matched_update_all().when_not_matched_insert_all().execute(data)

    # -- rows -----------------------------------------------------------------------------------
    def _table(self, condition: Condition):
        return self.db.open_table(condition.table)

    def count(self, condition: Condition) -> int:
        """Rows in a condition's table."""
        return self._table(condition).count_rows()

    def version(self, condition: Condition) -> int:
        """The table's version; any write changes it."""
        return self._table(condition).version

    def _scan(self, condition: Condition, columns: list[str], table=None) -> pa.Table:
        table = table if table is not None else self._table(condition)
        return table.search().select(columns).limit(None).to_arrow()

    def file_records(self, condition: Condition) -> dict[str, FileRecord]:
        """Every file's record in a condition, keyed by path (vectors are not read)."""
        table = self._scan(condition, list(FILE_COLUMNS))
        return {row["path"]: FileRecord(**row) for row in table.to_pylist()}

    def _rows(self, condition: Condition, records: Sequence[FileRecord], vectors: np.ndarray) -> pa.Table:
        columns = {name: [getattr(r, name) for r in records] for name in FILE_COLUMNS}
        flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).ravel())
        columns["vector"] = pa.FixedSizeListArray.from_arrays(flat, condition.dim)
        return pa.Table.from_pydict(columns, schema=row_schema(condition.dim))

    def add(self, condition: Condition, records: Sequence[FileRecord], vectors: np.ndarray) -> None:
        """Append rows whose ids are known not to be in the table, in one commit.

        Unlike upsert this does not join against the whole table, so its cost does not grow with it.
        """
        if not records:
            return
        with _storage_errors(self.root):
            self._table(condition).add(self._rows(condition, records, vectors))

    def upsert(self, condition: Condition, records: Sequence[FileRecord], vectors: np.ndarray) -> None:
        """Insert or replace rows by id in one commit."""
        if not records:
            return
        data = self._rows(condition, records, vectors)
        with _storage_errors(self.root):
            self._table(condition).merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(data)

    def refresh_records(self, condition: Condition, records: Sequence[FileRecord]) -> None:
        """Update file metadata (e.g. a touched file's mtime) of existing rows, keeping their vectors."""
        if not records:
            return
        by_id = {r.id: r for r in records}
        table = self._table(condition)
        current = table.search().where(f"id IN ({_sql_list(by_id)})").limit(None).to_arrow()
        vectors = np.stack(current["vector"].to_numpy(zero_copy_only=False)) if current.num_rows else None
        kept = [by_id[i] for i in current["id"].to_pylist()]
        if kept:
            self.upsert(condition, kept, vectors)

    def delete(self, condition: Condition, ids: Iterable[str]) -> int:
        """Delete rows by id; returns how many ids were asked for."""
        ids = list(ids)
        with _storage_errors(self.root):
            for start in range(0, len(ids), 1000):
                self._table(condition).delete(f"id IN ({_sql_list(ids[start:start + 1000])})")
        return len(ids)

    def compact(self, condition: Condition) -> None:
        """Merge small fragments left by batched commits and drop old versions."""
        with _storage_errors(self.root):
            # Keep versions a few seconds old so a concurrent query never loses its snapshot.
            self._table(condition).optimize(cleanup_older_than=dt.timedelta(seconds=10))

    def snapshot(self, condition: Condition) -> tuple[int, pa.Array, np.ndarray]:
        """(version, paths, vectors) of a condition, read from one consistent version."""
        table = self._table(condition)
        version = table.version
        data = self._scan(condition, ["path", "vector"], table)
        paths = data["path"].combine_chunks()
        vectors = data["vector"].combine_chunks().flatten().to_numpy().reshape(-1, condition.dim)
        return version, paths, np.ascontiguousarray(vectors, dtype=np.float32)

    def exact_search(self, condition: Condition, query: np.ndarray, k: int) -> list[tuple[str, float]]:
        """Top-k (path, inner product) by LanceDB's own brute-force vector search."""
        hits = (
            self._table(condition)
            .search(np.asarray(query, dtype=np.float32))
            .distance_type("dot")
            .limit(k)
            .to_arrow()
        )
        # LanceDB's "dot" distance is 1 - inner product.
        return [(p, 1.0 - d) for p, d in zip(hits["path"].to_pylist(), hits["_distance"].to_pylist())]
