"""The indexing pipeline: scan, diff against the store, decode, encode, write (design §1, §3).

Decoding runs in worker threads (PIL releases the GIL) and encoding is batched. A condition's first
encoded batch is committed at once; after that its rows are committed every ``commit_seconds``,
checked after each batch (and when the run ends or is interrupted). So a killed run loses at most
the rows encoded in the last ``commit_seconds`` plus one batch's decode and encode time, and a
long run does not pile up thousands of table versions and fragments, each of which makes the next
commit and every later read slower. The progress bar counts an image once its batch is encoded and
the commit check after it has run, so once the bar has moved, every condition has rows committed.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING

from tqdm import tqdm

from focalsearch import objectstore
from focalsearch.errors import DiskFullError, StorageError
from focalsearch.images import DEFAULT_MAX_PIXELS, FileStat, LoadedImage, SkippedImage, load_image, scan_images
from focalsearch.store import VERSION_GRACE_SECONDS, Condition, FileRecord, Store, row_id

if TYPE_CHECKING:  # torch is imported only once something needs encoding
    import numpy as np
    import torch

    from focalsearch.models import ConditionalEncoder


@dataclass
class IndexReport:
    """What one indexing run did."""

    encoded: int = 0
    unchanged: int = 0
    removed: int = 0
    skipped: list[SkippedImage] = field(default_factory=list)
    conditions: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=lambda: {"scan": 0.0, "decode": 0.0, "encode": 0.0, "write": 0.0})
    model: str = ""
    encoder: str = ""
    notes: list[str] = field(default_factory=list)  # what the run could not do, though it did its job

    @property
    def images_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "encoded": self.encoded,
            "unchanged": self.unchanged,
            "removed": self.removed,
            "skipped": [{"path": str(s.path), "reason": s.reason} for s in self.skipped],
            "conditions": self.conditions,
            "model": self.model,
            "encoder": self.encoder,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "notes": self.notes,
        }


@dataclass(frozen=True)
class _Decoded:
    stat: FileStat
    stale: tuple[Condition, ...]
    result: LoadedImage | SkippedImage
    pixels: "torch.Tensor | None"
    seconds: float


def _under(path: str, roots: Sequence[Path | str]) -> bool:
    def inside(root) -> bool:
        separator = "/" if isinstance(root, str) else os.sep
        return path == str(root) or path.startswith(str(root).rstrip(separator) + separator)

    return any(inside(root) for root in roots)


class _Batch:
    """Decoded images waiting to be encoded, each with the conditions it needs."""

    def __init__(self) -> None:
        self.records: list[FileRecord] = []
        self.pixels: list["torch.Tensor"] = []
        self.needs: list[tuple[Condition, ...]] = []

    def __len__(self) -> int:
        return len(self.records)


_MAX_PENDING_ROWS = 8192  # a fast GPU may encode this many in seconds; bounds what waits in memory


class _Writes:
    """Encoded rows of one condition waiting for the next commit."""

    def __init__(self) -> None:
        self.new: list[tuple[FileRecord, "np.ndarray"]] = []
        self.replaced: list[tuple[FileRecord, "np.ndarray"]] = []
        self.since: float | None = None

    def __len__(self) -> int:
        return len(self.new) + len(self.replaced)

    def put(self, record: FileRecord, vector: "np.ndarray", *, new: bool) -> None:
        (self.new if new else self.replaced).append((record, vector))
        if self.since is None:
            self.since = time.monotonic()

    def commit(self, store: Store, condition: Condition) -> None:
        import numpy as np

        if self.new:  # each list is emptied once written, so that a retry after a failure never adds twice
            store.add(condition, [r for r, _ in self.new], np.stack([v for _, v in self.new]))
            self.new = []
        if self.replaced:
            store.upsert(condition, [r for r, _ in self.replaced], np.stack([v for _, v in self.replaced]))
            self.replaced = []
        self.since = None


class Indexer:
    """Brings the store's conditions up to date with the files under some paths.

    ``load_encoder`` is called only when some file needs encoding, so a rerun over an unchanged
    collection never loads the model. ``encoder`` may hand over one that is already loaded.
    ``commit_seconds`` bounds the work an interruption can lose (plus one batch); 0 commits every
    batch. A condition's first batch in a run is committed as soon as it is encoded.
    """

    def __init__(
        self,
        store: Store,
        load_encoder: "Callable[[], ConditionalEncoder]",
        *,
        batch_size: int = 32,
        workers: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        progress: bool = False,
        encoder: "ConditionalEncoder | None" = None,
        commit_seconds: float = 5.0,
    ):
        self.store = store
        self.load_encoder = load_encoder
        self._encoder: "ConditionalEncoder | None" = encoder
        self._encoder_lock = threading.Lock()
        self.batch_size = batch_size
        self.workers = workers or min(8, os.cpu_count() or 1)
        self.max_pixels = max_pixels
        self.progress = progress
        self.commit_seconds = commit_seconds
        self._committed: set[str] = set()  # tables with a commit in this run

    def run(self, paths: Sequence[str | Path], conditions: Sequence[Condition]) -> IndexReport:
        if not conditions:
            raise ValueError("no conditions to index")
        report = IndexReport(model=conditions[0].model, encoder=conditions[0].encoder)
        started = time.perf_counter()
        files = scan_images(paths, report.skipped)
        roots = [str(p).rstrip("/") if objectstore.is_uri(str(p)) else Path(p).expanduser().resolve() for p in paths]
        records = {c.table: self.store.file_records(c) for c in conditions}
        versions = {c.table: self.store.version(c) for c in conditions}
        report.timings["scan"] = time.perf_counter() - started

        report.removed = self._remove_vanished(conditions, records, {str(f.path) for f in files}, roots)
        todo: list[tuple[FileStat, tuple[Condition, ...]]] = []
        for stat in files:
            stale = tuple(c for c in conditions if _is_stale(records[c.table].get(str(stat.path)), stat))
            if stale:
                todo.append((stat, stale))
            else:
                report.unchanged += 1

        touched: dict[str, list[FileRecord]] = {c.table: [] for c in conditions}
        writes = {c.table: self._new_writes() for c in conditions}
        self._committed = set()
        completed = False
        try:
            with tqdm(total=len(todo), unit="img", disable=not self.progress, desc="indexing") as bar:
                self._process(todo, conditions, records, writes, touched, report, bar)
                self._commit(conditions, writes, report, force=True)
                self._flush_touched(conditions, touched, force=True)
            completed = True
        except BaseException as exc:
            if not isinstance(exc, StorageError):  # keep what was encoded before an interruption
                with contextlib.suppress(Exception):  # the error being raised is the one to report
                    self._commit(conditions, writes, report, force=True)
            raise
        finally:
            # Record what was committed, also when interrupted; compaction can wait for a full run,
            # which also cleans up what an earlier failed or interrupted run left (even if it encodes nothing).
            changed = [c for c in conditions if self.store.version(c) != versions[c.table]]
            tidied = [c for c in conditions if c in changed or self.store.untidy(c)] if completed else []
            if tidied:
                self._compact(tidied, report, best_effort=not changed)
            for condition in conditions:
                recorded = set(condition.roots) >= {str(r) for r in roots} and condition.rows is not None
                if condition in changed or condition in tidied or not recorded:
                    self.store.mark_updated(condition, roots=[str(r) for r in roots])
                report.conditions[condition.instruction] = self.store.count(condition)
            if tidied:
                self.store.tidy_catalog()
            report.seconds = time.perf_counter() - started
        return report

    def _process(self, todo, conditions, records, writes: dict[str, "_Writes"], touched, report: IndexReport, bar) -> None:
        """Decode and encode ``todo`` in this process, committing by time as it goes.

        The bar moves after each batch's commit check, so a first move means committed rows.
        """
        batch = _Batch()
        taken = 0  # images decoded since the bar last moved
        for item in self._decode(todo):
            taken += 1
            report.timings["decode"] += item.seconds
            self._route(item, records, batch, touched, report)
            if len(batch) >= self.batch_size:
                self._encode(batch, records, writes, report)
                batch = _Batch()
                self._commit(conditions, writes, report, force=False)
                bar.update(taken)
                taken = 0
            self._flush_touched(conditions, touched, force=False)
        self._encode(batch, records, writes, report)
        self._commit(conditions, writes, report, force=False)
        bar.update(taken)

    def _compact(self, conditions: Sequence[Condition], report: IndexReport, *, best_effort: bool = False) -> None:
        """Merge the run's small fragments, then delete the versions they superseded, and the data
        files of writes that never became a version (this run holds the index's write lock).

        A reader that opened an older version a moment ago may still be reading its files, so the
        cleanup waits until the compaction is VERSION_GRACE_SECONDS old. With ``best_effort`` (a run
        that wrote nothing, tidying what an earlier run left), a full disk skips the merge, which
        needs space, and still deletes the old versions and leftover files, which frees it.
        """
        unmerged = []
        for condition in conditions:
            try:
                self.store.compact(condition)
            except DiskFullError:
                if not best_effort:
                    raise
                unmerged.append(condition)
        time.sleep(VERSION_GRACE_SECONDS)
        for condition in conditions:
            if condition in unmerged:
                self.store.clean_up(condition)
            else:  # nothing left to merge: this deletes the versions it superseded and unused files
                self.store.compact(condition, leftovers=True)
        if unmerged:
            names = ", ".join(repr(c.instruction) for c in unmerged)
            report.notes.append(f"the disk is full: old versions of {names} were deleted but their fragments not merged; "
                                "the next run with free space merges them")

    @property
    def encoder(self) -> "ConditionalEncoder":
        """The encoder, loaded by whichever stage first needs it."""
        with self._encoder_lock:
            if self._encoder is None:
                self._encoder = self.load_encoder()
            return self._encoder

    # -- stages -------------------------------------------------------------------------------
    def _remove_vanished(self, conditions, records, present: set[str], roots: Sequence[Path]) -> int:
        removed: set[str] = set()
        for condition in conditions:
            gone = [r for p, r in records[condition.table].items() if p not in present and _under(p, roots)]
            self.store.delete(condition, [r.id for r in gone])
            removed.update(r.path for r in gone)
        return len(removed)

    def _decode_one(self, stat: FileStat, stale: tuple[Condition, ...]) -> _Decoded:
        started = time.perf_counter()
        # A JPEG may be decoded at reduced size once the model's input size is known; the model is
        # not loaded just for that, so that broken files alone never load it.
        loaded_encoder = self._encoder
        min_side = loaded_encoder.min_decode_side if loaded_encoder is not None else None
        result = load_image(stat, max_pixels=self.max_pixels, min_side=min_side)
        pixels = self.encoder.prepare(result.image) if isinstance(result, LoadedImage) else None
        return _Decoded(stat, stale, result, pixels, time.perf_counter() - started)

    def _encodes_on_cpu(self) -> bool:
        encoder = self._encoder
        return encoder is None or encoder.device.type == "cpu"

    def _decode(self, todo: Sequence[tuple[FileStat, tuple[Condition, ...]]]) -> Iterator[_Decoded]:
        """Decode in order with a bounded number of images in flight, so memory stays flat.

        With the encoder on a GPU, decoding runs ahead while the GPU encodes. With the encoder on
        the CPU, both stages need the same cores, and decode threads running beside torch's threads
        slow encoding down by more than they gain (measured: benchmarks/throughput.py), so there a
        batch is decoded by all workers at once, and the next one only after it has been taken.
        """
        in_flight = max(2 * self.batch_size, 4 * self.workers)
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="focalsearch-decode")
        pending: deque[Future[_Decoded]] = deque()
        items = iter(todo)
        try:
            while True:
                on_cpu = self._encodes_on_cpu()
                if not pending or not on_cpu:
                    wanted = self.batch_size if on_cpu else in_flight
                    for stat, stale in itertools.islice(items, max(0, wanted - len(pending))):
                        pending.append(pool.submit(self._decode_one, stat, stale))
                if not pending:
                    return
                yield pending.popleft().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _skip(self, skipped: SkippedImage, stale: Sequence[Condition], records, report: IndexReport) -> None:
        """Report a file that cannot be used; one that became unreadable must not keep a vector of its old content."""
        path = str(skipped.path)
        report.skipped.append(skipped)
        stale_rows = [c for c in stale if path in records[c.table]]
        for condition in stale_rows:
            self.store.delete(condition, [records[condition.table][path].id])
        report.removed += bool(stale_rows)

    def _route(self, item: _Decoded, records, batch: _Batch, touched, report: IndexReport) -> None:
        path = str(item.stat.path)
        if isinstance(item.result, SkippedImage):
            self._skip(item.result, item.stale, records, report)
            return
        loaded = item.result
        record = FileRecord(
            id=row_id(path),
            path=path,
            size=loaded.stat.size,  # the stat of the bytes actually read, should the file change meanwhile
            mtime_ns=loaded.stat.mtime_ns,
            content_hash=loaded.content_hash,
            width=loaded.width,
            height=loaded.height,
        )
        to_encode = []
        for condition in item.stale:
            previous = records[condition.table].get(path)
            if previous is not None and previous.content_hash == loaded.content_hash:
                touched[condition.table].append(record)
            else:
                to_encode.append(condition)
        if to_encode:
            batch.records.append(record)
            batch.pixels.append(item.pixels)
            batch.needs.append(tuple(to_encode))
            report.encoded += 1
        else:
            report.unchanged += 1

    def _encode(self, batch: _Batch, records, writes: dict[str, _Writes], report: IndexReport) -> None:
        """Encode the batch: rows that need the same conditions go to the encoder together, with all of
        those conditions' instructions at once (so that a family can share work across them)."""
        if not len(batch):
            return
        groups: dict[tuple, list[int]] = {}
        for i, needs in enumerate(batch.needs):
            groups.setdefault(needs, []).append(i)
        for needs, rows in groups.items():
            started = time.perf_counter()
            pixels = self.encoder.collate([batch.pixels[i] for i in rows])
            arrays = self.encoder.encode_batch(pixels, [c.instruction for c in needs])
            report.timings["encode"] += time.perf_counter() - started
            for condition, vectors in zip(needs, arrays):
                known = records[condition.table]
                for i, vector in zip(rows, vectors):
                    writes[condition.table].put(batch.records[i], vector, new=batch.records[i].path not in known)

    def _new_writes(self) -> _Writes:
        return _Writes()

    def _commit(self, conditions, writes: dict[str, _Writes], report: IndexReport, *, force: bool) -> None:
        for condition in conditions:
            pending = writes[condition.table]
            if not pending:
                continue
            first = condition.table not in self._committed  # a run's first rows are committed at once
            if force or first or len(pending) >= _MAX_PENDING_ROWS or time.monotonic() - pending.since >= self.commit_seconds:
                started = time.perf_counter()
                pending.commit(self.store, condition)
                self._committed.add(condition.table)
                report.timings["write"] += time.perf_counter() - started

    def _flush_touched(self, conditions, touched, *, force: bool) -> None:
        for condition in conditions:
            pending = touched[condition.table]
            if pending and (force or len(pending) >= self.batch_size):
                self.store.refresh_records(condition, pending)
                touched[condition.table] = []


def _is_stale(record: FileRecord | None, stat: FileStat) -> bool:
    return record is None or (record.size, record.mtime_ns) != (stat.size, stat.mtime_ns)
