"""LanceDB tables, one per condition, and the conditions catalog (design §3).

The only module that imports lancedb. It sees vectors, conditions and rows; never models.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import errno
import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa

from focalsearch import objectstore
from focalsearch.defaults import DEFAULT_INDEX_DIR  # noqa: F401  (re-exported)
from focalsearch.errors import (
    DamagedIndexError,
    DiskFullError,
    IndexNotFoundError,
    ReadOnlyIndexError,
    StorageError,
    UserError,
)

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
        # Added later (older catalogs lack them and are migrated on their next write):
        pa.field("roots", pa.string()),  # JSON list of the folders and files indexed, for --repair
        pa.field("rows", pa.int64()),  # the table's rows and version when the catalog was last written
        pa.field("table_version", pa.int64()),
        pa.field("prompts", pa.string()),  # the MLLM family's prompt templates (JSON); null for the CLIP family
    ]
)
# A table keeps its own condition in its schema metadata, so a lost catalog can be rebuilt from the tables.
CONDITION_METADATA_KEY = b"focalsearch.condition"
# Old table versions are deleted once this old: a reader that opened one a moment ago may still be reading.
VERSION_GRACE_SECONDS = float(os.environ.get("FOCALSEARCH_VERSION_GRACE_SECONDS", "2"))
FILE_COLUMNS = ("id", "path", "size", "mtime_ns", "content_hash", "width", "height")

# LanceDB's default caches keep the metadata of every table version a process has seen, so the
# memory of a long indexing run grew with each commit (benchmarks/memory.py). Bounded caches keep it
# flat; the reads they serve here touch a few manifests at a time.
METADATA_CACHE_BYTES = 64 << 20
INDEX_CACHE_BYTES = 64 << 20


def row_schema(dim: int, metadata: dict[bytes, bytes] | None = None) -> pa.Schema:
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
        ],
        metadata=metadata,
    )


def row_id(path: str) -> str:
    """Stable id of a file's row: a hash of its absolute path."""
    return hashlib.sha1(path.encode("utf-8", "surrogateescape")).hexdigest()


def table_name(model: str, encoder: str, instruction: str, prompts: str = "") -> str:
    """Readable, unique table name for a condition: slug of the instruction plus a short hash."""
    slug = re.sub(r"[^a-z0-9]+", "-", instruction.lower()).strip("-")[:40] or "unconditional"
    key = f"{model}\0{encoder}\0{instruction}" + (f"\0{prompts}" if prompts else "")
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
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
    roots: tuple[str, ...] = ()
    rows: int | None = None
    table_version: int | None = None
    prompts: str = ""  # the MLLM family's prompt templates, JSON: vectors made under other prompts are another condition

    def catalog_row(self) -> dict:
        row = dict(self.__dict__)
        row["roots"] = json.dumps(list(self.roots))
        return row

    @classmethod
    def from_catalog_row(cls, row: dict) -> "Condition":
        row = {k: v for k, v in row.items() if k in cls.__dataclass_fields__}
        row["roots"] = tuple(json.loads(row.get("roots") or "[]"))
        row["prompts"] = row.get("prompts") or ""
        return cls(**row)


@dataclass(frozen=True)
class TableHealth:
    """What a look at a condition's table found: rows and version, or the problem."""

    rows: int | None
    version: int | None
    bytes: int
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


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


@dataclass(frozen=True)
class FragmentTarget:
    """A table that workers write Lance fragments into; the driver commits them (Store.append_fragments)."""

    uri: str
    schema: pa.Schema
    data_storage_version: str
    storage_options: dict[str, str]

    def write(self, rows: pa.Table) -> list[object]:
        """Write ``rows`` as data files of the table, uncommitted: the fragments' metadata to commit."""
        from lance_ray.fragment import write_fragment

        written = write_fragment([rows.cast(self.schema)], self.uri, schema=self.schema,
                                 data_storage_version=self.data_storage_version,
                                 storage_options=self.storage_options or None)
        return [fragment for fragment, _ in written]


def rows_table(dim: int, records: Sequence[FileRecord], vectors: np.ndarray) -> pa.Table:
    """Rows of a condition's table: the file records and their vectors."""
    columns = {name: [getattr(r, name) for r in records] for name in FILE_COLUMNS}
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).ravel())
    columns["vector"] = pa.FixedSizeListArray.from_arrays(flat, dim)
    return pa.Table.from_pydict(columns, schema=row_schema(dim))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def short_error(exc: BaseException) -> str:
    """One line of an exception's message, without the Rust source paths that LanceDB appends."""
    text = " ".join(str(exc).split())
    text = re.sub(r",?\s*/rustc/\S+", "", text)
    text = re.sub(r",?\s*\S+\.rs:\d+:\d+", "", text)
    return text[:200] or type(exc).__name__


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)


def _storage_error(exc: BaseException, root: Path) -> StorageError:
    # LanceDB and FAISS raise RuntimeError with the OS error in the text, so match both ways.
    code = getattr(exc, "errno", None)
    text = str(exc)
    if code in _NO_SPACE or "No space left" in text or "Disk quota exceeded" in text:
        return DiskFullError(f"no space left on the device of {root}; committed rows are kept, free space and rerun")
    if code in _READ_ONLY or "Permission denied" in text or "Read-only file system" in text:
        return ReadOnlyIndexError(f"index {root} is read-only ({short_error(exc)}); make it writable or use another --index")
    return StorageError(f"cannot write the index at {root}: {short_error(exc)}")


def _make_index_folder(root: Path) -> None:
    """Create a new index's folder (and the missing folders above it); when the folder above
    cannot be written, say so, naming it: the index itself is not there to be read-only."""
    try:
        root.mkdir(parents=True)
    except OSError as exc:
        if exc.errno not in _READ_ONLY:
            raise _storage_error(exc, root) from exc
        parent = next((p for p in root.parents if os.path.isdir(p)), root.parent)
        raise ReadOnlyIndexError(f"cannot create index {root}: folder {parent} cannot be written ({exc.strerror}); "
                                 "make it writable or choose another --index") from None


@contextmanager
def _storage_errors(root: Path) -> Iterator[None]:
    """Report a failed write to the index at ``root`` (OS, LanceDB or FAISS) as one clear StorageError."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        raise _storage_error(exc, root) from exc


def _q(path: Path) -> str:
    return shlex.quote(str(path))


def repair_hint(root: Path) -> str:
    """The command that mends a damaged index, ready to paste."""
    return f"run: focalsearch check --repair --index {_q(root)}"


def quote_instruction(instruction: str) -> str:
    """An instruction as error messages show it: quoted, and cut to 200 characters."""
    shown = instruction if len(instruction) <= 200 else instruction[:200] + "..."
    return f'"{shown}"' if instruction else '"" (unconditional)'


def damaged(what: str, reason: str, root: Path | str) -> DamagedIndexError:
    """The error for a damaged condition or catalog: what, why, and the command that mends it."""
    return DamagedIndexError(f"{what} is damaged ({reason}); {repair_hint(root)}", reason)


@contextmanager
def _read_errors(root: Path, what: str) -> Iterator[None]:
    """Report a failed read of ``what`` (a condition or the catalog) as damage, with the way to mend it."""
    try:
        yield
    except PermissionError as exc:
        raise UserError(f"cannot read the index at {root}: {short_error(exc)}") from exc
    except (OSError, RuntimeError, ValueError, pa.ArrowException) as exc:
        raise damaged(what, short_error(exc), root) from exc


def _optimize(table, cleanup_seconds: float, leftovers: bool = False) -> None:
    """Compact a table and delete its versions older than ``cleanup_seconds``; with ``leftovers``
    also the data files that no version uses (a failed write's), whatever their age."""
    with warnings.catch_warnings():
        # LanceDB warns about a zero grace period, which only tests use (FOCALSEARCH_VERSION_GRACE_SECONDS=0).
        warnings.filterwarnings("ignore", message=r"optimize\(cleanup_older_than=0\)")
        table.optimize(cleanup_older_than=dt.timedelta(seconds=cleanup_seconds), delete_unverified=leftovers)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _release_freed_memory() -> None:
    """Return free heap pages to the system (glibc keeps them in per-thread arenas, where the
    buffers of LanceDB's reader threads fragment them)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _sql_list(values: Iterable[str]) -> str:
    return ", ".join("'" + v.replace("'", "''") + "'" for v in values)


class Store:
    """A folder holding one LanceDB database: the catalog plus one table per condition.

    Opening an existing index never writes to it. ``create=True`` makes the folder when missing
    (``created`` then says so, so that a run that fails before writing anything can remove it).
    """

    def __init__(self, root: str | Path, *, create: bool = False):
        self.uri = str(root).rstrip("/") if objectstore.is_uri(str(root)) else None
        self.created = False
        self._handles: dict[str, object] = {}
        self._catalog_cache: tuple[int, list[Condition]] | None = None
        session = lancedb.Session(index_cache_size_bytes=INDEX_CACHE_BYTES, metadata_cache_size_bytes=METADATA_CACHE_BYTES)
        # Every read sees the latest committed version (another process may be indexing), which lets
        # open table handles be kept and reused: checking a handle's version costs well under a ms.
        consistency = dt.timedelta(0)
        if self.uri is not None:
            # In object storage the tables live in the bucket; derived files (FAISS, thumbnails) and
            # the write lock live in a local cache folder of this index.
            self.location = self.uri
            self.root = objectstore.cache_dir(self.uri)
            self.db = lancedb.connect(f"{self.uri}/lancedb", storage_options=objectstore.lance_options(),
                                      session=session, read_consistency_interval=consistency)
            if not create and not self._table_names():
                raise IndexNotFoundError(f"no index at {self.uri}; build one with: focalsearch index PATH --index {_q(self.uri)}")
            with _storage_errors(self.location):
                self.root.mkdir(parents=True, exist_ok=True)
            return
        self.root = Path(root).expanduser().resolve()
        self.location = str(self.root)
        if not is_index(self.root):
            if not create:
                raise IndexNotFoundError(f"no index at {self.root}; build one with: focalsearch index PATH --index {_q(self.root)}")
            if not os.path.lexists(self.root):  # False, not an error, where a parent cannot be entered
                _make_index_folder(self.root)
                self.created = True
        self.db = lancedb.connect(str(self.root / "lancedb"), session=session, read_consistency_interval=consistency)

    @property
    def tables_dir(self) -> Path:
        return self.root / "lancedb"

    # -- catalog --------------------------------------------------------------------------------
    def _table_names(self) -> set[str]:
        if self.uri is None and not self.tables_dir.is_dir():
            return set()
        with _read_errors(self.location, "the index's table list"):
            return set(self.db.list_tables().tables)

    def _open(self, name: str, what: str):
        """A kept handle on table ``name``, opened on first use; None when there is no such table."""
        handle = self._handles.get(name)
        if handle is None:
            if name not in self._table_names():
                return None
            with _read_errors(self.location, what):
                handle = self._handles[name] = self.db.open_table(name)
        return handle

    def _forget(self, name: str) -> None:
        self._handles.pop(name, None)
        if name == CATALOG_TABLE:
            self._catalog_cache = None

    def _catalog(self, create: bool = False):
        catalog = self._open(CATALOG_TABLE, "the catalog of the index")
        if catalog is None:
            if not create:
                return None
            with _storage_errors(self.location):
                catalog = self._handles[CATALOG_TABLE] = self.db.create_table(CATALOG_TABLE, schema=_CATALOG_SCHEMA, exist_ok=True)
            return catalog
        if create and catalog.schema != _CATALOG_SCHEMA:  # an older catalog: rewrite it with the new columns
            rows = [Condition.from_catalog_row(r).catalog_row() for r in self._catalog_rows(catalog)]
            self._forget(CATALOG_TABLE)
            with _storage_errors(self.location):
                catalog = self._handles[CATALOG_TABLE] = self.db.create_table(
                    CATALOG_TABLE, pa.Table.from_pylist(rows, schema=_CATALOG_SCHEMA), schema=_CATALOG_SCHEMA, mode="overwrite"
                )
        return catalog

    def _catalog_rows(self, catalog) -> list[dict]:
        with _read_errors(self.location, "the catalog of the index"):
            return catalog.to_arrow().to_pylist()

    def conditions(self) -> list[Condition]:
        """All conditions, sorted by instruction."""
        catalog = self._catalog()
        if catalog is None:
            if self._table_names():
                raise DamagedIndexError(f"the catalog of index {self.location} is missing; {repair_hint(self.location)}", "it is missing")
            return []
        with _read_errors(self.location, "the catalog of the index"):
            version = catalog.version
        cached = self._catalog_cache
        if cached is not None and cached[0] == version:
            return list(cached[1])
        rows = self._catalog_rows(catalog)
        found = sorted((Condition.from_catalog_row(row) for row in rows), key=lambda c: c.instruction)
        self._catalog_cache = (version, found)
        return list(found)

    def find(self, instruction: str) -> Condition | None:
        """The condition for a normalised instruction, if indexed."""
        return next((c for c in self.conditions() if c.instruction == instruction), None)

    def ensure_condition(self, instruction: str, model: str, encoder: str, dim: int, prompts: str = "") -> Condition:
        """Return the condition, creating its table and catalog entry when new."""
        existing = self.find(instruction)
        if existing is not None:
            return existing
        now = _now()
        condition = Condition(table_name(model, encoder, instruction, prompts), instruction, model, encoder, dim, now, now,
                              prompts=prompts)
        self.create_table(condition)
        self.write_catalog(condition)
        return condition

    def create_table(self, condition: Condition) -> None:
        """Create the condition's empty table, its condition recorded in the schema's metadata."""
        described = {k: v for k, v in condition.catalog_row().items() if k in ("instruction", "model", "encoder", "dim", "prompts")}
        described["created_at"] = condition.created_at.isoformat()
        schema = row_schema(condition.dim, {CONDITION_METADATA_KEY: json.dumps(described).encode()})
        self._forget(condition.table)
        with _storage_errors(self.location):
            self.db.create_table(condition.table, schema=schema, exist_ok=True)

    def mark_updated(self, condition: Condition, roots: Sequence[str] = ()) -> Condition:
        """Record that a condition's table changed now, its row count and version, and the roots indexed."""
        table = self._table(condition)
        updated = Condition(
            **{
                **condition.__dict__,
                "updated_at": _now(),
                "roots": tuple(sorted(set(condition.roots) | set(roots))),
                "rows": self._count(table, condition),
                "table_version": table.version,
            }
        )
        self.write_catalog(updated)
        return updated

    def write_catalog(self, condition: Condition) -> None:
        """Insert or replace a condition's catalog entry."""
        data = pa.Table.from_pylist([condition.catalog_row()], schema=_CATALOG_SCHEMA)
        catalog = self._catalog(create=True)
        with _storage_errors(self.location):
            catalog.merge_insert("table").when_matched_update_all().when_not_matched_insert_all().execute(data)

    def tidy_catalog(self) -> None:
        """Merge the catalog's small fragments and delete its versions older than the grace period."""
        catalog = self._catalog()
        if catalog is not None:
            with _storage_errors(self.location):
                _optimize(catalog, VERSION_GRACE_SECONDS)

    def table_names(self) -> list[str]:
        """The condition tables in the index's folder (not the catalog)."""
        return sorted(self._table_names() - {CATALOG_TABLE})

    def read_table_conditions(self, names: Iterable[str] | None = None) -> tuple[list[Condition], list[str]]:
        """The conditions that tables record in their own metadata; never writes.

        Returns (conditions, names of tables that do not open or do not describe themselves).
        """
        found, lost = [], []
        for name in sorted(self.table_names() if names is None else names):
            try:
                table = self.db.open_table(name)
                described = json.loads((table.schema.metadata or {})[CONDITION_METADATA_KEY])
                created = dt.datetime.fromisoformat(described.pop("created_at"))
                found.append(Condition(name, **described, created_at=created, updated_at=created))
            except Exception:  # unreadable, or made before tables described themselves
                lost.append(name)
        return sorted(found, key=lambda c: c.instruction), lost

    def rebuild_catalog(self) -> tuple[list[Condition], list[str]]:
        """Replace the catalog by one made from the condition tables that describe themselves.

        Returns (conditions recovered, tables that could not be attributed to a condition).
        """
        found, lost = self.read_table_conditions()
        self._forget(CATALOG_TABLE)
        with _storage_errors(self.location):
            try:
                self.db.drop_table(CATALOG_TABLE, ignore_missing=True)
            except (RuntimeError, ValueError):
                pass  # too damaged for LanceDB to drop: remove its folder below
            if self.uri is None:
                shutil.rmtree(self.tables_dir / f"{CATALOG_TABLE}.lance", ignore_errors=True)
            self._handles[CATALOG_TABLE] = self.db.create_table(CATALOG_TABLE, schema=_CATALOG_SCHEMA)
        return [self.mark_updated(c) for c in found], lost

    # -- rows -----------------------------------------------------------------------------------
    def _table(self, condition: Condition):
        table = self._open(condition.table, f"condition {quote_instruction(condition.instruction)}")
        if table is None:
            raise damaged(f"condition {quote_instruction(condition.instruction)}", "its table is missing", self.location)
        return table

    def _reading(self, condition: Condition):
        return _read_errors(self.location, f"condition {quote_instruction(condition.instruction)}")

    def _count(self, table, condition: Condition) -> int:
        with self._reading(condition):
            return table.count_rows()

    def count(self, condition: Condition) -> int:
        """Rows in a condition's table."""
        return self._count(self._table(condition), condition)

    def version(self, condition: Condition) -> int:
        """The table's latest committed version; any write changes it."""
        table = self._table(condition)
        with self._reading(condition):
            return table.version

    def table_dir(self, condition: Condition) -> Path:
        return self.tables_dir / f"{condition.table}.lance"

    def data_files(self, condition: Condition) -> dict[str, list[int]]:
        """[size, mtime_ns] of each data file of the table (every retained version's), by name."""
        if self.uri is not None:
            return {}  # in object storage a table is trusted by its version alone
        folder = self.table_dir(condition) / "data"
        try:
            return {e.name: [(st := e.stat()).st_size, st.st_mtime_ns] for e in os.scandir(folder) if e.is_file()}
        except OSError:
            return {}

    def bytes_on_disk(self, condition: Condition) -> int:
        """Bytes under the table's folder: live data plus the versions not yet cleaned up (live data only in object storage)."""
        if self.uri is not None:
            try:
                return int(self._table(condition).stats()["total_bytes"])
            except Exception:
                return 0
        total = 0
        for folder, _, names in os.walk(self.table_dir(condition)):
            for name in names:
                try:
                    total += os.lstat(os.path.join(folder, name)).st_size
                except OSError:
                    pass
        return total

    def health(self, condition: Condition, *, deep: bool = False) -> TableHealth:
        """Look at a condition's table; ``deep`` reads every row, as `focalsearch check` does.

        The quick look opens the table, counts its rows and checks that the data files on disk are
        at least as large as the table's manifest says its live data is (a truncated or deleted file
        shows there). The deep look also reads all of it and checks that no id is there twice.
        """
        size = self.bytes_on_disk(condition)
        try:
            table = self._table(condition)
            with self._reading(condition):
                version, rows = table.version, table.count_rows()
                live_bytes = int(table.stats()["total_bytes"])
            on_disk = sum(size for size, _ in self.data_files(condition).values())
            if self.uri is None and on_disk < live_bytes:
                return TableHealth(rows, version, size, f"data files hold {on_disk} bytes of the {live_bytes} its manifest lists")
            if deep:
                seen: set[str] = set()
                read = 0
                with self._reading(condition):
                    for batch in table.search().select(["id", "vector"]).limit(None).to_batches():
                        ids = batch.column("id").to_pylist()
                        seen.update(ids)
                        read += len(ids)
                        vectors = batch.column("vector").flatten().to_numpy(zero_copy_only=False)
                        if not np.isfinite(vectors).all():
                            return TableHealth(rows, version, size, "some vectors are not finite")
                if read != rows:
                    return TableHealth(rows, version, size, f"{read} rows read, its manifest counts {rows}")
                if len(seen) != read:
                    return TableHealth(rows, version, size, f"{read - len(seen)} rows are there twice")
        except DamagedIndexError as exc:
            return TableHealth(None, None, size, exc.reason)
        return TableHealth(rows, version, size)

    def drop_table(self, condition: Condition) -> None:
        """Remove a condition's table (its catalog entry stays); used to rebuild a damaged one."""
        self._forget(condition.table)
        with _storage_errors(self.location):
            try:
                self.db.drop_table(condition.table, ignore_missing=True)
            except (RuntimeError, ValueError):
                pass  # too damaged for LanceDB to drop: remove its folder below
            if self.uri is None:
                shutil.rmtree(self.table_dir(condition), ignore_errors=True)

    def _scan(self, condition: Condition, columns: list[str], table=None) -> pa.Table:
        table = table if table is not None else self._table(condition)
        with self._reading(condition):
            return table.search().select(columns).limit(None).to_arrow()

    def file_records(self, condition: Condition) -> dict[str, FileRecord]:
        """Every file's record in a condition, keyed by path (vectors are not read)."""
        table = self._scan(condition, list(FILE_COLUMNS))
        return {row["path"]: FileRecord(**row) for row in table.to_pylist()}

    def listing(self, condition: Condition) -> tuple[int, pa.Array, pa.Array]:
        """(version, ids, paths) of every row of a condition, sorted by path (vectors are not read)."""
        table = self._table(condition)
        version = table.version
        data = self._scan(condition, ["id", "path"], table).sort_by("path")
        return version, data["id"].combine_chunks(), data["path"].combine_chunks()

    def add(self, condition: Condition, records: Sequence[FileRecord], vectors: np.ndarray) -> None:
        """Append rows whose ids are known not to be in the table, in one commit.

        Unlike upsert this does not join against the whole table, so its cost does not grow with it.
        """
        if not records:
            return
        table = self._table(condition)
        with _storage_errors(self.location):
            table.add(rows_table(condition.dim, records, vectors))

    def fragment_target(self, condition: Condition) -> "FragmentTarget":
        """Where and how other processes (Ray workers) write Lance fragments for this condition's table."""
        import lance

        table = self._table(condition)
        options = objectstore.lance_options() if self.uri is not None else {}
        with self._reading(condition):
            dataset = lance.dataset(table.uri, storage_options=options or None)
            return FragmentTarget(table.uri, dataset.schema, dataset.data_storage_version, options)

    def append_fragments(self, condition: Condition, fragments: Sequence[object]) -> None:
        """Commit fragments that workers wrote (write_fragments) as one new version of the table."""
        if not fragments:
            return
        import lance

        table = self._table(condition)
        options = objectstore.lance_options() if self.uri is not None else None
        with _storage_errors(self.location):
            lance.LanceDataset.commit(table.uri, lance.LanceOperation.Append(list(fragments)),
                                      read_version=table.version, storage_options=options)

    def upsert(self, condition: Condition, records: Sequence[FileRecord], vectors: np.ndarray) -> None:
        """Insert or replace rows by id in one commit."""
        if not records:
            return
        data = rows_table(condition.dim, records, vectors)
        table = self._table(condition)
        with _storage_errors(self.location):
            table.merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(data)

    def refresh_records(self, condition: Condition, records: Sequence[FileRecord]) -> None:
        """Update file metadata (e.g. a touched file's mtime) of existing rows, keeping their vectors."""
        if not records:
            return
        by_id = {r.id: r for r in records}
        table = self._table(condition)
        with self._reading(condition):
            current = table.search().where(f"id IN ({_sql_list(by_id)})").limit(None).to_arrow()
        vectors = np.stack(current["vector"].to_numpy(zero_copy_only=False)) if current.num_rows else None
        kept = [by_id[i] for i in current["id"].to_pylist()]
        if kept:
            self.upsert(condition, kept, vectors)

    def delete(self, condition: Condition, ids: Iterable[str]) -> int:
        """Delete rows by id; returns how many ids were asked for."""
        ids = list(ids)
        if not ids:
            return 0
        table = self._table(condition)
        with _storage_errors(self.location):
            for start in range(0, len(ids), 1000):
                table.delete(f"id IN ({_sql_list(ids[start:start + 1000])})")
        return len(ids)

    def compact(self, condition: Condition, cleanup_seconds: float = VERSION_GRACE_SECONDS, *, leftovers: bool = False) -> None:
        """Merge the small fragments left by batched commits, and delete table versions (and the
        files only they use) older than ``cleanup_seconds``.

        ``leftovers`` also deletes data files that no version uses, however new: what a write cut
        off by a full disk or a kill leaves. Only a writer holding the index's write lock may ask
        for it, as another writer's files are not part of any version until it commits them.
        """
        table = self._table(condition)
        with _storage_errors(self.location):
            _optimize(table, cleanup_seconds, leftovers)

    def clean_up(self, condition: Condition, cleanup_seconds: float = VERSION_GRACE_SECONDS) -> None:
        """Delete versions older than ``cleanup_seconds`` and data files no version uses, without
        merging anything: it writes nothing, so it works, and frees space, on a full disk. Only a
        writer holding the index's write lock may call it (see ``compact``)."""
        table = self._table(condition)
        with _storage_errors(self.location):
            table.cleanup_old_versions(dt.timedelta(seconds=cleanup_seconds), delete_unverified=True)

    def untidy(self, condition: Condition) -> bool:
        """Whether the table keeps more than its latest version, small fragments that a compaction
        would merge, or data files that version does not use: what a failed or interrupted run (or a
        cleanup on a full disk, which cannot merge) leaves until a run compacts and cleans it up."""
        table = self._table(condition)
        with self._reading(condition):
            if len(table.list_versions()) > 1:
                return True
            stats = table.stats()
            if stats["fragment_stats"]["num_small_fragments"] > 1:
                return True
            if self.uri is not None:
                return False
            live_bytes = int(stats["total_bytes"])
        return sum(size for size, _ in self.data_files(condition).values()) > live_bytes

    def snapshot(self, condition: Condition) -> tuple[int, pa.Array, np.ndarray]:
        """(version, paths, vectors) of a condition, read from one consistent version."""
        table = self._table(condition)
        version = table.version
        data = self._scan(condition, ["path", "vector"], table)
        paths = data["path"].combine_chunks()
        vectors = data["vector"].combine_chunks().flatten().to_numpy().reshape(-1, condition.dim)
        return version, paths, np.ascontiguousarray(vectors, dtype=np.float32)

    def _at_version(self, condition: Condition, version: int | None):
        """The condition's table as it was at ``version`` (the kept handle when that is the latest)."""
        table = self._table(condition)
        if version is not None and version != table.version:
            table = self.db.open_table(condition.table)  # a handle of its own: the kept one stays at the latest
            table.checkout(version)
        return table

    def read_batches(self, condition: Condition, columns: Sequence[str], *, version: int, batch_rows: int) -> Iterator[pa.RecordBatch]:
        """Stream ``columns`` of every row at ``version``, ``batch_rows`` at a time, in the table's row order.

        One bounded read per window, and the memory it freed handed back to the system after each:
        with LanceDB's streaming reader (which reads ahead), and without the hand-back, a process's
        peak grew with the table (a pass over 200k x 512 vectors: 712 MiB; over 1M: 965 MiB; with
        both: 341 and 352 MiB).
        """
        with self._reading(condition):
            table = self._at_version(condition, version)
            rows = table.count_rows()
            for start in range(0, rows, batch_rows):
                window = table.search().select(list(columns)).offset(start).limit(min(batch_rows, rows - start)).to_arrow()
                yield from window.to_batches()
                del window
                _release_freed_memory()

    def take_positions(self, condition: Condition, positions: Sequence[int], columns: Sequence[str], *, version: int) -> pa.Table:
        """The rows at these positions of the table's row order at ``version`` (a sample, read without a scan)."""
        with self._reading(condition):
            table = self._at_version(condition, version)
            return table.take_offsets([int(p) for p in positions]).select(list(columns)).to_arrow()

    def vectors_by_id(self, condition: Condition, ids: Sequence[str], version: int | None = None) -> dict[str, np.ndarray]:
        """The vectors of the rows with these ids (those present), read at ``version`` when given.

        Reading at the version a search index was built from keeps one query on one table state.
        """
        if not ids:
            return {}
        found: dict[str, np.ndarray] = {}
        with self._reading(condition):
            table = self._at_version(condition, version)
            for start in range(0, len(ids), 1000):
                chunk = ids[start:start + 1000]
                data = table.search().where(f"id IN ({_sql_list(chunk)})").select(["id", "vector"]).limit(None).to_arrow()
                vectors = data["vector"].combine_chunks().flatten().to_numpy().reshape(-1, condition.dim)
                found.update(zip(data["id"].to_pylist(), vectors.astype(np.float32, copy=False)))
        return found

    def path_of(self, image_id: str) -> str | None:
        """The path of an indexed row, looked up by its id in any condition."""
        if not re.fullmatch(r"[0-9a-f]{40}", image_id):
            return None
        for condition in self.conditions():
            try:
                table = self._table(condition)
                with self._reading(condition):
                    hit = table.search().where(f"id = '{image_id}'").select(["path"]).limit(1).to_arrow()
            except DamagedIndexError:
                continue
            if hit.num_rows:
                return hit["path"][0].as_py()
        return None

    def exact_search(self, condition: Condition, query: np.ndarray, k: int) -> list[tuple[str, float]]:
        """Top-k (path, inner product) by LanceDB's own brute-force vector search."""
        with self._reading(condition):
            hits = (
                self._table(condition)
                .search(np.asarray(query, dtype=np.float32))
                .distance_type("dot")
                .limit(k)
                .to_arrow()
            )
        # LanceDB's "dot" distance is 1 - inner product.
        return [(p, 1.0 - d) for p, d in zip(hits["path"].to_pylist(), hits["_distance"].to_pylist())]


def is_index(root: Path | str) -> bool:
    """Whether ``root`` holds a FocalSearch index (a LanceDB folder with at least one table)."""
    if objectstore.is_uri(str(root)):
        try:
            Store(root)
            return True
        except Exception:
            return False
    folder = Path(root) / "lancedb"
    try:
        return folder.is_dir() and any(e.name.endswith(".lance") and e.is_dir() for e in os.scandir(folder))
    except OSError:
        return False
