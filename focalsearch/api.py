"""FocalSearch: the library entry point. The CLI is a thin layer over this class."""

from __future__ import annotations

import errno
import fcntl
import math
import shlex
import shutil
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from focalsearch.errors import (
    DamagedIndexError,
    EmptyConditionError,
    IndexBusyError,
    InvalidImageError,
    ModelMismatchError,
    ReadOnlyIndexError,
    UnknownConditionError,
    UnknownImageError,
    UserError,
)
from focalsearch.images import DEFAULT_MAX_PIXELS, DEFAULT_MAX_QUERY_PIXELS, LoadedImage, open_query_image, source_exists
from focalsearch.defaults import DEFAULT_INDEX_DIR, PRECISIONS
from focalsearch.store import Condition, Store, damaged, is_index, quote_instruction, row_id

if TYPE_CHECKING:
    from focalsearch.ray_engine import RayOptions

_ENCODER_NAMES = ("auto", "focallens", "clip", "clip+text", "mllm")


@dataclass(frozen=True)
class ConditionSummary:
    """A condition as users see it: instruction, how it was built, and its size."""

    instruction: str
    model: str
    encoder: str
    dim: int
    rows: int | None  # None when the table cannot be read
    created_at: str
    updated_at: str
    table: str
    bytes: int  # on disk: live data plus table versions not yet cleaned up
    damaged: str | None = None  # what is wrong, for a condition that needs `focalsearch check --repair`


@dataclass(frozen=True)
class SearchResult:
    """The ranked hits of one query, with the conditions (and weights) and model that produced them."""

    query: str
    instruction: str  # the first condition's instruction
    model: str
    encoder: str
    results: list  # list[focalsearch.search.Hit]
    conditions: tuple[tuple[str, float], ...] = ()
    k: int = 10
    offset: int = 0

    def to_dict(self) -> dict:
        return {
            "query": self.query,
            "instruction": self.instruction,
            "conditions": [{"instruction": i, "weight": w} for i, w in self.conditions],
            "model": self.model,
            "encoder": self.encoder,
            "k": self.k,
            "offset": self.offset,
            "results": [h.to_dict() for h in self.results],
        }


@dataclass(frozen=True)
class ImagePage:
    """One page of the indexed images, sorted by path: (image_id, path) pairs and the total count."""

    total: int
    offset: int
    images: list[tuple[str, str]]
    instruction: str | None  # the condition listed (the one with the most rows); None in an empty index


MAX_CONDITIONS = 8


def _recorded(condition: Condition) -> tuple[str, str, str]:
    """What an index's vectors were made with: (model, encoder, prompt templates)."""
    return condition.model, condition.encoder, condition.prompts


class FocalSearch:
    """Index image folders under instructions and search them by image or text.

    ``model`` is a hub id or local checkpoint folder; None means the index's own model, or the
    default model for a new index. The model is loaded only when something needs encoding.
    """

    def __init__(
        self,
        index_dir: str | Path = DEFAULT_INDEX_DIR,
        model: str | None = None,
        *,
        encoder: str = "auto",
        device: str = "auto",
        batch_size: int = 32,
        workers: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_query_pixels: int = DEFAULT_MAX_QUERY_PIXELS,
        commit_seconds: float = 5.0,
        precision: str = "auto",
        threads: int | None = None,
    ):
        if encoder not in _ENCODER_NAMES:
            raise UserError(f"unknown encoder {encoder!r}; use one of: {', '.join(_ENCODER_NAMES)}")
        if batch_size < 1:
            raise UserError("batch_size must be at least 1")
        if precision not in PRECISIONS:
            raise UserError(f"unknown precision {precision!r}; use one of: {', '.join(PRECISIONS)}")
        if commit_seconds < 0:
            raise UserError("commit_seconds must be 0 or more")
        from focalsearch import objectstore

        self.index_dir = str(index_dir).rstrip("/") if objectstore.is_uri(str(index_dir)) else Path(index_dir).expanduser()
        self.model = model
        self.encoder_name = encoder
        self.device = device
        self.batch_size = batch_size
        self.workers = workers
        self.max_pixels = max_pixels
        self.max_query_pixels = max_query_pixels  # a query image decoding at more pixels is refused
        self.commit_seconds = commit_seconds
        self.precision = precision
        self.threads = threads
        self._batcher = None
        self._indexes: dict[str, object] = {}  # search indexes by table, while their tables are unchanged
        self._index_locks: dict[str, threading.Lock] = {}
        self._encoders: dict[str, object] = {}  # by towers loaded: "both", "text", "vision"
        self._store: Store | None = None
        self._listing: tuple | None = None  # ((table, version), ids, paths) of the images listed
        self._listing_lock = threading.Lock()

    # -- plumbing -------------------------------------------------------------------------------
    @property
    def location(self) -> str:
        """The index's folder (absolute) or object-store URI."""
        return self.index_dir if isinstance(self.index_dir, str) else str(self.index_dir.resolve())

    def _open_store(self, create: bool = False) -> Store:
        if self._store is None or (create and not self._store.root.exists()):
            self._store = Store(self.index_dir, create=create)
        return self._store

    def _index_model(self, store: Store) -> tuple[str, str, str] | None:
        conditions = store.conditions()
        return _recorded(conditions[0]) if conditions else None

    def _check_recorded(self, recorded: tuple[str, str, str] | None) -> tuple[str | None, str]:
        """The (model, encoder) to use: the index's own, after checking what the user asked for."""
        from focalsearch.models import resolve_model

        if recorded is None:
            return self.model, self.encoder_name
        recorded_model, recorded_encoder, _prompts = recorded
        if self.model is not None and resolve_model(self.model).model_id != recorded_model:
            raise ModelMismatchError(
                f"index {self.index_dir} was built with model {recorded_model}, not "
                f"{resolve_model(self.model).model_id}; drop --model or use another --index"
            )
        if self.encoder_name not in ("auto", recorded_encoder):
            raise ModelMismatchError(
                f"index {self.index_dir} was built with encoder {recorded_encoder}, not {self.encoder_name}"
            )
        return recorded_model, recorded_encoder

    def _load_encoder(self, recorded: tuple[str, str, str] | None, towers: str = "both"):
        """Load the encoder (once per towers), checking that it matches what the index was built with."""
        from focalsearch.models import create_encoder
        from focalsearch.threads import configure_threads

        model, encoder = self._check_recorded(recorded)
        loaded = self._encoders.get("both") or self._encoders.get(towers)
        if loaded is None:
            configure_threads(self.threads)
            loaded = self._encoders[towers] = create_encoder(
                model, encoder=encoder, device=self.device, batch_size=self.batch_size, towers=towers,
                precision=self.precision,
            )
        if recorded is not None and loaded.info.prompts != recorded[2]:
            raise ModelMismatchError(
                f"index {self.index_dir} was built under other prompt templates than model {loaded.info.model} now uses; "
                "its vectors would not compare with new ones: use another --index, or rebuild this one"
            )
        return loaded

    @contextmanager
    def _write_lock(self, store: Store) -> Iterator[None]:
        try:
            handle = open(store.root / ".lock", "a")
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise ReadOnlyIndexError(
                    f"index {store.location} is read-only ({exc.strerror}); queries work, but indexing needs write access"
                ) from None
            raise
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise IndexBusyError(f"index {store.location} is being updated by another process; try again later") from None
            yield
        finally:
            handle.close()

    # -- public API -------------------------------------------------------------------------------
    def index(
        self, paths: Sequence[str | Path], instructions: Sequence[str] = ("",), *, progress: bool = False,
        engine: str = "local", ray: "RayOptions | None" = None,
    ):
        """Encode the images under ``paths`` for each instruction; returns an IndexReport.

        Unchanged files are skipped, changed files re-encoded, vanished files removed. ``engine="ray"``
        runs decoding and encoding as a Ray Data job (``ray``: where and how wide); the plan and
        the commits stay in this process, with the same semantics.
        """
        if engine not in ("local", "ray"):
            raise UserError(f"unknown engine {engine!r}; use local or ray")
        from focalsearch.instructions import normalize_instruction

        if not paths:
            raise UserError("give at least one image file or folder to index")
        missing = [str(p) for p in paths if not source_exists(p)]
        if missing:
            raise UserError(f"path not found: {missing[0]}")
        wanted = list(dict.fromkeys(normalize_instruction(i) for i in (instructions or [""])))
        existed = is_index(self.location)
        if not existed:  # load the model before creating anything, so a bad model leaves no folder behind
            self._check_recorded(None)
            self._load_encoder(None)
        store = self._open_store(create=True)
        try:
            with self._write_lock(store):
                report = self._index_locked(store, paths, wanted, progress, engine, ray)
        except BaseException:
            if not existed:
                _remove_unborn_index(store)
            raise
        return report

    def _index_locked(self, store: Store, paths, wanted: list[str], progress: bool, engine: str = "local", ray=None):
        from focalsearch.indexer import Indexer
        from focalsearch.search import load_condition_index

        recorded = self._index_model(store)
        self._check_recorded(recorded)
        for instruction in wanted:
            existing = store.find(instruction)
            health = store.health(existing) if existing is not None else None
            if health is not None and not health.ok:
                raise damaged(f"condition {quote_instruction(instruction)}", health.problem, store.location)
        if recorded is None or any(store.find(i) is None for i in wanted):
            info = self._load_encoder(recorded).info
            conditions = [store.ensure_condition(i, info.model, info.encoder, info.dim, info.prompts) for i in wanted]
        else:
            conditions = [store.find(i) for i in wanted]
        options = self._indexer_options(progress)
        if engine == "ray":
            from focalsearch.ray_engine import RayIndexer, RayOptions

            ray = ray or RayOptions(device=self.device, precision=self.precision, threads=self.threads)
            indexer = RayIndexer(store, lambda: self._load_encoder(recorded), model=conditions[0].model,
                                 encoder_name=conditions[0].encoder, ray=ray, **options)
        else:
            indexer = Indexer(store, lambda: self._load_encoder(recorded), **options)
        report = indexer.run(paths, conditions)
        for condition in conditions:
            load_condition_index(store, condition)  # rebuilds the derived FAISS index if the table changed
        return report

    def _indexer_options(self, progress: bool) -> dict:
        return dict(
            batch_size=self.batch_size, workers=self.workers, max_pixels=self.max_pixels, progress=progress,
            encoder=self._encoders.get("both"), commit_seconds=self.commit_seconds,
        )

    def conditions(self) -> list[ConditionSummary]:
        """Every condition in the index with its model, encoder, row count and size on disk.

        A condition whose table cannot be read is listed with ``damaged`` saying why.
        """
        store = self._open_store()
        summaries = []
        for c in store.conditions():
            health = store.health(c)
            summaries.append(ConditionSummary(
                instruction=c.instruction, model=c.model, encoder=c.encoder, dim=c.dim, rows=health.rows,
                created_at=c.created_at.isoformat(timespec="seconds"),
                updated_at=c.updated_at.isoformat(timespec="seconds"), table=c.table,
                bytes=health.bytes, damaged=health.problem,
            ))
        return summaries

    def check(self, *, repair: bool = False):
        """Read every table of the index and compare it with the catalog and FAISS files; returns a
        CheckReport. ``repair`` re-encodes damaged conditions from their source images, rebuilds a
        lost catalog from the tables and refreshes stale FAISS files."""
        from focalsearch.check import check_index
        from focalsearch.indexer import Indexer

        store = self._open_store()

        def reindex(condition: Condition, sources: list[Path | str]) -> None:
            recorded = _recorded(condition)
            Indexer(store, lambda: self._load_encoder(recorded), **self._indexer_options(progress=False)).run(sources, [condition])

        if repair:
            with self._write_lock(store):
                return check_index(store, repair=True, reindex=reindex)
        with ExitStack() as stack:
            try:  # keeps an indexer from writing while the tables are read
                stack.enter_context(self._write_lock(store))
            except ReadOnlyIndexError:
                pass  # nothing can write to a read-only index anyway
            return check_index(store)

    def condition(self, instruction: str) -> Condition:
        """The indexed condition for an instruction, or an error naming the ones there are."""
        from focalsearch.instructions import normalize_instruction

        store = self._open_store()
        wanted = normalize_instruction(instruction)
        found = store.find(wanted)
        if found is not None:
            return found
        known = ", ".join(quote_instruction(c.instruction) for c in store.conditions()) or "none"
        raise UnknownConditionError(
            f"instruction {quote_instruction(wanted)} is not indexed in {store.location} (indexed: {known}); add it with: "
            f"focalsearch index PATH --instruction {_shell_instruction(wanted)} --index {shlex.quote(store.location)}"
        )

    def search(
        self,
        *,
        image: "str | Path | LoadedImage | None" = None,
        text: str | None = None,
        image_id: str | None = None,
        instruction: str | None = None,
        conditions: "Sequence[tuple[str, float]] | None" = None,
        k: int = 10,
        offset: int = 0,
    ) -> SearchResult:
        """Search by a query image (a path, or an already decoded LoadedImage), a text, or an indexed
        row's ``image_id``, under one ``instruction`` or several weighted ``conditions``.

        With several conditions, ``[("shape", 1), ("background", 1)]`` asks for the same shape AND
        background: a positive weight adds weight × the row's cosine under it. ``[("shape", 1),
        ("color", -1)]`` asks for the same shape but NOT the same colour: a negative weight subtracts
        |weight| × how much the row is the same as the query under it (0 for rows that are not,
        however different; see ``search.sameness``), so it never favours the most different.
        """
        if instruction is None and not conditions:
            indexed = ", ".join(quote_instruction(c.instruction) for c in self._open_store().conditions()) or "none"
            raise UserError(f"give an instruction or weighted conditions to search under (indexed: {indexed})")
        wanted = self._weighted(instruction, conditions)
        if sum(q is not None for q in (image, text, image_id)) != 1:
            raise UserError("give one query: an image, a text, or an image_id")
        if text is not None and not text.strip():
            raise UserError("empty text query; give some words")
        if k < 1:
            raise UserError("k must be at least 1")
        if offset < 0:
            raise UserError("offset must be 0 or more")
        if isinstance(image, (str, Path)) and not source_exists(image):
            raise InvalidImageError(f"cannot read query image {image}: file not found")
        store = self._open_store()
        resolved = [(self.condition(i), w) for i, w in wanted]
        try:
            return self._search(store, resolved, image, text, image_id, k, offset)
        except DamagedIndexError:
            # A version that a cached search index pinned may have been cleaned up meanwhile: retry
            # once on fresh indexes; a table that is really damaged fails again, and says so.
            for condition, _ in resolved:
                self._indexes.pop(condition.table, None)
            return self._search(store, resolved, image, text, image_id, k, offset)

    def _weighted(self, instruction, conditions) -> list[tuple[str, float]]:
        from focalsearch.instructions import normalize_instruction

        if instruction is not None and conditions:
            raise UserError("give either one instruction or weighted conditions, not both")
        pairs = [(instruction or "", 1.0)] if not conditions else [(i, float(w)) for i, w in conditions]
        if len(pairs) > MAX_CONDITIONS:
            raise UserError(f"at most {MAX_CONDITIONS} conditions in one query")
        normalized = [(normalize_instruction(i), w) for i, w in pairs]
        if len({i for i, _ in normalized}) != len(normalized):
            raise UserError("each instruction may appear only once in a query")
        if any(not math.isfinite(w) for _, w in normalized):
            raise UserError("weights must be finite numbers")
        if not any(w > 0 for _, w in normalized):
            raise UserError("at least one condition needs a positive weight (a negative one means NOT the same)")
        return normalized

    def _search(self, store, resolved, image, text, image_id, k, offset) -> SearchResult:
        from focalsearch.search import QueryPart, fused_search

        indexes = [self._condition_index(store, c) for c, _ in resolved]
        for (condition, _), index in zip(resolved, indexes):
            if index.ann.ntotal == 0:
                raise EmptyConditionError(
                    f"condition {quote_instruction(condition.instruction)} has no rows yet; add images with: focalsearch index PATH "
                    f"--instruction {_shell_instruction(condition.instruction)} --index {shlex.quote(store.location)}"
                )
        exclude_id, query = image_id, image_id
        if text is not None:
            vector = self._encode_text(resolved[0][0], text)
            vectors, query = [vector] * len(resolved), text
        elif image_id is not None:
            vectors = []
            for (condition, _), index in zip(resolved, indexes):
                found = index.stored_vector(image_id)
                if found is None:  # not in a flat index (IVF, or absent): read the table at the same version
                    found = store.vectors_by_id(condition, [image_id], version=index.table_version).get(image_id)
                if found is None:
                    raise UnknownImageError(f"image {image_id} is not indexed under {quote_instruction(condition.instruction)}")
                vectors.append(found)
        else:
            loaded, query = self._query_image(image, resolved)
            if isinstance(image, (str, Path)):
                exclude_id = row_id(str(loaded.stat.path))
            vectors = [self._encode_image(condition, loaded.image) for condition, _ in resolved]
        parts = [QueryPart(c, index, v, w, from_text=text is not None) for (c, w), index, v in zip(resolved, indexes, vectors)]
        # Serving (batching on), many queries run at once: one FAISS thread each beats splitting each one.
        hits = fused_search(store, parts, k, offset=offset, exclude_id=exclude_id, threads=1 if self._batcher else None)
        first = resolved[0][0]
        return SearchResult(
            str(query), first.instruction, first.model, first.encoder, hits,
            conditions=tuple((c.instruction, w) for c, w in resolved), k=k, offset=offset,
        )

    def compare(self, *, instructions: Sequence[str], k: int = 10, **query) -> list[SearchResult]:
        """The same query under 2 to 4 instructions, one ranked list each."""
        if not 2 <= len(instructions) <= 4:
            raise UserError("compare takes 2 to 4 instructions")
        return [self.search(instruction=i, k=k, **query) for i in instructions]

    # -- query encoding (batched when serving) ------------------------------------------------
    def enable_batching(self, *, max_batch: int = 32, max_wait_ms: float = 2.0) -> None:
        """Load the model now and encode queries from all threads in shared forward passes."""
        from focalsearch.batching import DynamicBatcher
        from focalsearch.models.arithmetic import ArithmeticTrial

        store = self._open_store()
        recorded = self._index_model(store)
        if recorded is None:
            raise UserError(f"index {store.location} has no conditions yet")
        encoder = self._load_encoder(recorded)
        # "auto": each query kind in whichever of float32 and bf16 autocast measures faster here, timed
        # between queries once serving (float32 until then), so that start-up is float32's
        trial = ArithmeticTrial(encoder, self.precision)
        self._batcher = DynamicBatcher(encoder, max_batch=max_batch, max_wait_ms=max_wait_ms, trial=trial)

    def close(self) -> None:
        """Stop the batching thread, if any."""
        if self._batcher is not None:
            self._batcher.close()
            self._batcher = None

    def _encoder_for(self, condition: Condition, *, image_query: bool):
        from focalsearch.models import needed_towers

        towers = needed_towers(condition.encoder, condition.instruction, image_query=image_query)
        return self._load_encoder(_recorded(condition), towers)

    def _encode_text(self, condition: Condition, text: str):
        if self._batcher is not None:
            return self._batcher.encode_text(text)
        return self._encoder_for(condition, image_query=False).encode_texts([text])[0]

    def _encode_image(self, condition: Condition, image):
        if self._batcher is not None:
            return self._batcher.encode_image(image, condition.instruction)
        return self._encoder_for(condition, image_query=True).encode_images([image], condition.instruction)[0]

    def _query_image(self, image, resolved) -> tuple[LoadedImage, str]:
        if isinstance(image, LoadedImage):
            return image, str(image.stat.path)
        encoder = self._batcher.encoder if self._batcher is not None else self._encoder_for(resolved[0][0], image_query=True)
        # Decoded as indexing decodes: a large JPEG at reduced size, never more than the model needs.
        return open_query_image(
            image, max_pixels=self.max_pixels, min_side=encoder.min_decode_side, max_query_pixels=self.max_query_pixels
        ), str(image)

    def _condition_index(self, store: Store, condition: Condition):
        """The condition's search index, kept between queries while its table is unchanged."""
        from focalsearch.search import built_from_current_table, load_condition_index

        def kept():
            cached = self._indexes.get(condition.table)
            current = cached is not None and built_from_current_table(
                store, condition, cached.table_version, cached.data_files, store.version(condition)
            )
            return cached if current else None

        if (cached := kept()) is not None:
            return cached
        with self._index_locks.setdefault(condition.table, threading.Lock()):  # one rebuild, however many queries wait
            if (cached := kept()) is None:
                cached = self._indexes[condition.table] = load_condition_index(store, condition)
            return cached

    def image_path(self, image_id: str) -> str | None:
        """The path of an indexed image, by its row id (None when no condition has it)."""
        return self._open_store().path_of(image_id)

    def images(self, *, offset: int = 0, limit: int = 50) -> ImagePage:
        """A page of the indexed images, sorted by path, from the readable condition with the most rows.

        Every condition of one indexing run holds the same images, so one table lists them all; a
        condition indexed over fewer folders is passed over for a larger one. The sorted listing
        (ids and paths, no vectors) is kept while that table's version is unchanged.
        """
        if offset < 0 or limit < 1:
            raise UserError("offset must be 0 or more and limit at least 1")
        store = self._open_store()
        sizes, problem = [], None
        for condition in store.conditions():
            try:
                sizes.append((store.count(condition), condition))
            except DamagedIndexError as exc:
                problem = problem or exc
        if not sizes:
            if problem is not None:
                raise problem
            return ImagePage(total=0, offset=offset, images=[], instruction=None)
        condition = max(sizes, key=lambda pair: pair[0])[1]  # the first of the largest, in catalog order
        with self._listing_lock:
            key = (condition.table, store.version(condition))
            if self._listing is None or self._listing[0] != key:
                version, ids, paths = store.listing(condition)
                self._listing = ((condition.table, version), ids, paths)
            _, ids, paths = self._listing
        window = slice(min(offset, len(ids)), min(offset + limit, len(ids)))
        images = list(zip(ids[window].to_pylist(), paths[window].to_pylist()))
        return ImagePage(total=len(ids), offset=offset, images=images, instruction=condition.instruction)


def _shell_instruction(instruction: str) -> str:
    """The instruction as a suggested command should hold it: shell-quoted, or a placeholder when too long to show."""
    return shlex.quote(instruction) if len(instruction) <= 200 else "INSTRUCTION"


def _remove_unborn_index(store: Store) -> None:
    """After a failed first run, remove what it created, unless some condition was already written."""
    try:
        if store.conditions():
            return
    except Exception:
        pass
    if store.created:
        shutil.rmtree(store.root, ignore_errors=True)
        return
    for name in ("lancedb", "faiss"):
        shutil.rmtree(store.root / name, ignore_errors=True)
    (store.root / ".lock").unlink(missing_ok=True)
