"""FocalSearch: the library entry point. The CLI is a thin layer over this class."""

from __future__ import annotations

import errno
import fcntl
import shlex
import shutil
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from focalsearch.errors import (
    DamagedIndexError,
    EmptyConditionError,
    IndexBusyError,
    InvalidImageError,
    ModelMismatchError,
    ReadOnlyIndexError,
    UnknownConditionError,
    UserError,
)
from focalsearch.images import DEFAULT_MAX_PIXELS, open_query_image
from focalsearch.defaults import DEFAULT_INDEX_DIR, PRECISIONS
from focalsearch.store import Condition, Store, is_index, quote_instruction, repair_hint

_ENCODER_NAMES = ("auto", "focallens", "clip", "clip+text")


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
    """The ranked hits of one query, with the condition and model that produced them."""

    query: str
    instruction: str
    model: str
    encoder: str
    results: list  # list[focalsearch.search.Hit]

    def to_dict(self) -> dict:
        return {
            "query": self.query,
            "instruction": self.instruction,
            "model": self.model,
            "encoder": self.encoder,
            "results": [{"rank": h.rank, "path": h.path, "score": round(h.score, 6)} for h in self.results],
        }


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
        commit_seconds: float = 5.0,
        precision: str = "auto",
        threads: int | None = None,
    ):
        if encoder not in _ENCODER_NAMES:
            raise UserError(f"unknown encoder {encoder!r}; use one of: {', '.join(_ENCODER_NAMES)}")
        if batch_size < 1:
            raise UserError("--batch-size must be at least 1")
        if precision not in PRECISIONS:
            raise UserError(f"unknown precision {precision!r}; use one of: {', '.join(PRECISIONS)}")
        if commit_seconds < 0:
            raise UserError("--commit-every must be 0 or more seconds")
        self.index_dir = Path(index_dir).expanduser()
        self.model = model
        self.encoder_name = encoder
        self.device = device
        self.batch_size = batch_size
        self.workers = workers
        self.max_pixels = max_pixels
        self.commit_seconds = commit_seconds
        self.precision = precision
        self.threads = threads
        self._encoders: dict[str, object] = {}  # by towers loaded: "both", "text", "vision"
        self._store: Store | None = None

    # -- plumbing -------------------------------------------------------------------------------
    def _open_store(self, create: bool = False) -> Store:
        if self._store is None or (create and not self._store.root.exists()):
            self._store = Store(self.index_dir, create=create)
        return self._store

    def _index_model(self, store: Store) -> tuple[str, str] | None:
        conditions = store.conditions()
        return (conditions[0].model, conditions[0].encoder) if conditions else None

    def _check_recorded(self, recorded: tuple[str, str] | None) -> tuple[str | None, str]:
        """The (model, encoder) to use: the index's own, after checking what the user asked for."""
        from focalsearch.models import resolve_model

        if recorded is None:
            return self.model, self.encoder_name
        recorded_model, recorded_encoder = recorded
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

    def _load_encoder(self, recorded: tuple[str, str] | None, towers: str = "both"):
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
        return loaded

    @contextmanager
    def _write_lock(self, store: Store) -> Iterator[None]:
        try:
            handle = open(store.root / ".lock", "a")
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise ReadOnlyIndexError(
                    f"index {store.root} is read-only ({exc.strerror}); queries work, but indexing needs write access"
                ) from None
            raise
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise IndexBusyError(f"index {store.root} is being updated by another process; try again later") from None
            yield
        finally:
            handle.close()

    # -- public API -------------------------------------------------------------------------------
    def index(self, paths: Sequence[str | Path], instructions: Sequence[str] = ("",), *, progress: bool = False):
        """Encode the images under ``paths`` for each instruction; returns an IndexReport.

        Unchanged files are skipped, changed files re-encoded, vanished files removed.
        """
        from focalsearch.instructions import normalize_instruction

        if not paths:
            raise UserError("give at least one image file or folder to index")
        missing = [str(p) for p in paths if not Path(p).expanduser().exists()]
        if missing:
            raise UserError(f"path not found: {missing[0]}")
        wanted = list(dict.fromkeys(normalize_instruction(i) for i in (instructions or [""])))
        existed = is_index(self.index_dir.expanduser().resolve())
        if not existed:  # load the model before creating anything, so a bad model leaves no folder behind
            self._check_recorded(None)
            self._load_encoder(None)
        store = self._open_store(create=True)
        try:
            with self._write_lock(store):
                report = self._index_locked(store, paths, wanted, progress)
        except BaseException:
            if not existed:
                _remove_unborn_index(store)
            raise
        return report

    def _index_locked(self, store: Store, paths, wanted: list[str], progress: bool):
        from focalsearch.indexer import Indexer
        from focalsearch.search import load_condition_index

        recorded = self._index_model(store)
        self._check_recorded(recorded)
        for instruction in wanted:
            existing = store.find(instruction)
            health = store.health(existing) if existing is not None else None
            if health is not None and not health.ok:
                raise DamagedIndexError(
                    f"condition {quote_instruction(instruction)} is damaged ({health.problem}); {repair_hint(store.root)}"
                )
        if recorded is None or any(store.find(i) is None for i in wanted):
            info = self._load_encoder(recorded).info
            conditions = [store.ensure_condition(i, info.model, info.encoder, info.dim) for i in wanted]
        else:
            conditions = [store.find(i) for i in wanted]
        indexer = Indexer(
            store, lambda: self._load_encoder(recorded), batch_size=self.batch_size, workers=self.workers,
            max_pixels=self.max_pixels, progress=progress, encoder=self._encoders.get("both"),
            commit_seconds=self.commit_seconds,
        )
        report = indexer.run(paths, conditions)
        for condition in conditions:
            load_condition_index(store, condition)  # rebuilds the derived FAISS index if the table changed
        return report

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

        def reindex(condition: Condition, sources: list[Path]) -> None:
            recorded = (condition.model, condition.encoder)
            Indexer(
                store, lambda: self._load_encoder(recorded), batch_size=self.batch_size, workers=self.workers,
                max_pixels=self.max_pixels, commit_seconds=self.commit_seconds,
            ).run(sources, [condition])

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
            f"instruction {quote_instruction(wanted)} is not indexed in {store.root} (indexed: {known}); add it with: "
            f"focalsearch index PATH --instruction {_shell_instruction(wanted)} --index {shlex.quote(str(store.root))}"
        )

    def search(
        self,
        *,
        image: str | Path | None = None,
        text: str | None = None,
        instruction: str = "",
        k: int = 10,
    ) -> SearchResult:
        """Search the condition of ``instruction`` by a query image or a query text."""
        from focalsearch.models import needed_towers
        from focalsearch.search import load_condition_index, search_index

        if (image is None) == (text is None):
            raise UserError("give either a query image or --text, not both or neither")
        if text is not None and not text.strip():
            raise UserError("empty text query; give some words with --text")
        if k < 1:
            raise UserError("-k must be at least 1")
        if image is not None and not Path(image).expanduser().exists():
            raise InvalidImageError(f"cannot read query image {image}: file not found")
        store = self._open_store()
        condition = self.condition(instruction)
        if store.count(condition) == 0:
            raise EmptyConditionError(
                f"condition {quote_instruction(condition.instruction)} has no rows yet; add images with: focalsearch index PATH "
                f"--instruction {_shell_instruction(condition.instruction)} --index {shlex.quote(str(store.root))}"
            )
        index = load_condition_index(store, condition)  # before the model: a damaged table fails fast
        towers = needed_towers(condition.encoder, condition.instruction, image_query=image is not None)
        encoder = self._load_encoder((condition.model, condition.encoder), towers)
        if image is not None:
            # Decoded as indexing decodes: a large JPEG at reduced size, never more than the model needs.
            query_image = open_query_image(image, max_pixels=self.max_pixels, min_side=encoder.min_decode_side)
            vector = encoder.encode_images([query_image.image], condition.instruction)[0]
            exclude, query = str(query_image.stat.path), str(image)
        else:
            vector = encoder.encode_texts([text])[0]
            exclude, query = None, text
        hits = search_index(index, vector, k, exclude=exclude)
        return SearchResult(query, condition.instruction, condition.model, condition.encoder, hits)


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
