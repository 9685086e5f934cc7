"""`focalsearch index --engine ray`: the indexing pipeline as a Ray Data job (design §3c).

The driver plans as the local engine does (scan, diff against the tables, drop vanished files)
and commits as it does (per condition, every few seconds, so a killed job loses at most that
much and a rerun duplicates nothing). In between, Ray runs:
- decode + preprocess as CPU tasks, each image decoded once for all its conditions; a file whose
  bytes are unchanged (same content hash) keeps its vectors;
- encoding in an actor pool, one warm model per actor, on GPUs where the cluster has them; the
  actors write the rows straight into the conditions' tables as Lance fragments (lance-ray's
  fragment writer), and only the fragments' metadata travels to the driver, which commits them
  (a Lance Append) with the deletes of replaced rows. Fragments of a killed job are never committed.
"""

from __future__ import annotations

import functools
import logging
import pickle
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from focalsearch.errors import UserError
from focalsearch import objectstore
from focalsearch.images import LoadedImage, SkippedImage, load_image
from focalsearch.indexer import Indexer, IndexReport
from focalsearch.store import FileRecord, FragmentTarget, row_id, rows_table
from focalsearch.threads import available_cores

_FILE_FIELDS = ("size", "mtime_ns", "content_hash", "width", "height")


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the Ray job runs."""

    address: str | None = None  # None: start a local Ray instance for this run
    encode_workers: int = 1
    gpus_per_worker: float = 0.0
    device: str = "auto"
    precision: str = "auto"
    # torch threads per CPU encoder actor; None: this node's cores shared among the encode workers.
    # (Ray sets OMP_NUM_THREADS to an actor's num_cpus, 1, which left one of two cores idle: the
    # engine ran at half the local engine's speed, benchmarks/scale.py.)
    threads: int | None = None
    # Rows per Lance fragment the workers write: every commit rewrites a manifest that lists all of a
    # table's fragments, so fragments of one encoder batch (32 rows) would make 100M rows 3M fragments.
    fragment_rows: int = 4096


@functools.lru_cache(maxsize=2)
def _processor(model: str):
    from focalsearch.models.loading import load_image_processor

    return load_image_processor(model)


def _decode_batch(batch: dict, *, model: str, max_pixels: int, min_side: int | None, storage: dict[str, str]) -> dict:
    """Ray task body: read, hash, decode and preprocess a batch of files (or objects)."""
    from focalsearch import objectstore

    if objectstore.current_options() != storage:  # this worker process reads objects as the driver does
        objectstore.configure(storage)
    processor = _processor(model)
    out = {name: [] for name in ("path", "needs", "kept", "reason", "pixels", *_FILE_FIELDS)}
    shape = None
    for path, tables, previous in zip(batch["path"], batch["tables"], batch["previous"]):
        loaded = load_image(str(path), max_pixels=max_pixels, min_side=min_side)
        tables, previous = list(tables), list(previous)
        if isinstance(loaded, LoadedImage):
            pixels = processor(images=[loaded.image], return_tensors="np")["pixel_values"][0].astype(np.float32)
            shape = pixels.shape
            kept = [t for t, h in zip(tables, previous) if h == loaded.content_hash]
            fields = (loaded.stat.size, loaded.stat.mtime_ns, loaded.content_hash, loaded.width, loaded.height)
            needs, reason = [t for t in tables if t not in kept], ""
        else:
            pixels, kept, needs, fields, reason = None, [], [], (0, 0, "", 0, 0), loaded.reason
        out["path"].append(str(path))
        out["needs"].append(needs)
        out["kept"].append(kept)
        out["reason"].append(reason)
        out["pixels"].append(pixels)
        for name, value in zip(_FILE_FIELDS, fields):
            out[name].append(value)
    blank = np.zeros(shape or (3, 1, 1), np.float32)
    if shape is None:  # nothing decoded in this batch: every row is skipped
        out["pixels"] = np.stack([blank for _ in out["pixels"]])
    else:
        out["pixels"] = np.stack([p if p is not None else blank for p in out["pixels"]])
    return out


class _Encode:
    """Ray actor body: one warm model; encodes each image under every condition it needs."""

    def __init__(self, model: str, encoder: str, device: str, precision: str, instructions: dict[str, str], threads: int):
        from focalsearch.threads import configure_threads

        configure_threads(threads)
        from focalsearch.models import create_encoder

        self.encoder = create_encoder(model, encoder=encoder, device=device, precision=precision)
        self.instructions = instructions

    def __call__(self, batch: dict) -> dict:
        import torch

        pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"]))
        rows = len(batch["path"])
        out = {name: batch[name] for name in ("path", "needs", "kept", "reason", *_FILE_FIELDS)}
        for table, instruction in self.instructions.items():
            wanted = [i for i in range(rows) if table in list(batch["needs"][i])]
            vectors = None
            if wanted:
                encoded = np.asarray(self.encoder.encode_pixels(self.encoder.select(pixels, wanted), instruction), dtype=np.float32)
                vectors = np.zeros((rows, encoded.shape[1]), np.float32)  # rows that do not need it: ignored
                vectors[wanted] = encoded
            out[_VECTORS + table] = vectors if vectors is not None else np.zeros((rows, 1), np.float32)
        return out


_VECTORS = "vectors:"


def _write_fragments(batch: dict, *, targets: dict[str, FragmentTarget]) -> dict:
    """Ray task body: write a batch's rows into each condition's table as Lance fragments, uncommitted.

    Only the fragments' metadata and the rows' file records go on to the driver, which commits them.
    """
    rows = len(batch["path"])
    fragments = {}
    for table, target in targets.items():
        wanted = [i for i in range(rows) if table in list(batch["needs"][i])]
        if wanted:
            vectors = np.asarray(batch[_VECTORS + table])[wanted]
            fragments[table] = target.write(rows_table(vectors.shape[1], [_record(batch, i) for i in wanted], vectors))
    out = {name: batch[name] for name in ("path", "needs", "kept", "reason", *_FILE_FIELDS)}
    # The batch's fragments ride on its first row (Ray re-batches rows on their way to the driver).
    out["fragments"] = np.array([pickle.dumps(fragments) if i == 0 else b"" for i in range(rows)], dtype=object)
    return out


def _record(batch: dict, i: int) -> FileRecord:
    path = str(batch["path"][i])
    return FileRecord(row_id(path), path, int(batch["size"][i]), int(batch["mtime_ns"][i]), str(batch["content_hash"][i]),
                      int(batch["width"][i]), int(batch["height"][i]))


class _FragmentWrites:
    """One condition's fragments written by the encoder actors, and the rows they replace, until the next commit."""

    def __init__(self) -> None:
        self.fragments: list = []
        self.rows = 0
        self.replaced: list[str] = []
        self.since: float | None = None

    def __len__(self) -> int:
        return self.rows

    def put(self, record: FileRecord, *, new: bool) -> None:
        self.rows += 1
        if not new:
            self.replaced.append(record.id)
        if self.since is None:
            self.since = time.monotonic()

    def commit(self, store, condition) -> None:
        # The old rows of changed files go first: a run stopped in between loses them, and its rerun
        # encodes those files again as new; it never leaves two rows for one file.
        if self.replaced:
            store.delete(condition, self.replaced)
            self.replaced = []
        fragments, self.fragments = self.fragments, []
        store.append_fragments(condition, fragments)
        self.rows, self.since = 0, None


class RayIndexer(Indexer):
    """The local indexer's plan and commits around a Ray Data decode/encode/write job."""

    def __init__(self, store, load_encoder, *, model: str, encoder_name: str, ray: RayOptions = RayOptions(), **options):
        if encoder_name == "mllm":
            # Ray's decode tasks hand the actors preprocessed pixel arrays; an MLLM's processor reads the
            # image with its prompt, which the actors would have to receive instead.
            raise UserError("--engine ray indexes with CLIP-family models only so far; index an MLLM with the local engine")
        super().__init__(store, load_encoder, **options)
        self.model, self.encoder_name, self.ray = model, encoder_name, ray

    def _new_writes(self) -> _FragmentWrites:
        return _FragmentWrites()

    def _process(self, todo, conditions, records, writes, touched, report: IndexReport, bar) -> None:
        if not todo:
            return
        import ray
        import ray.data

        with warnings.catch_warnings():
            # Ray starts its workers by fork+exec, which LanceDB's fork hook warns about; exec leaves nothing shared.
            warnings.filterwarnings("ignore", message="lancedb fork support is experimental")
            warnings.filterwarnings("ignore", message="lance is not fork-safe")
            warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")  # max_restarts has no named parameter yet
            self._on_ray(ray, todo, conditions, records, writes, touched, report, bar)

    def _on_ray(self, ray, todo, conditions, records, writes, touched, report: IndexReport, bar) -> None:
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(address=self.ray.address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False
            self._run_job(ray.data, todo, conditions, records, writes, touched, report, bar)
        finally:
            if started_here:
                ray.shutdown()

    def _run_job(self, data, todo, conditions, records, writes, touched, report: IndexReport, bar) -> None:
        by_table = {c.table: c for c in conditions}
        items = []
        for stat, stale in todo:
            path = str(stat.path)
            previous = [getattr(records[c.table].get(path), "content_hash", "") or "" for c in stale]
            items.append({"path": path, "tables": [c.table for c in stale], "previous": previous})
        targets = {c.table: self.store.fragment_target(c) for c in conditions}
        loaded = self._encoder
        min_side = loaded.min_decode_side if loaded is not None else None
        blocks = max(1, min(len(items) // self.batch_size, 64))
        job = (
            data.from_items(items, override_num_blocks=blocks)
            .map_batches(_decode_batch, fn_kwargs={"model": self.model, "max_pixels": self.max_pixels, "min_side": min_side,
                                                   "storage": objectstore.current_options()},
                         batch_size=self.batch_size, num_cpus=1)
            .map_batches(_Encode, fn_constructor_kwargs={
                "model": self.model, "encoder": self.encoder_name, "device": self.ray.device, "precision": self.ray.precision,
                "instructions": {c.table: c.instruction for c in conditions},
                "threads": self.ray.threads or max(1, available_cores() // self.ray.encode_workers)},
                batch_size=self.batch_size, compute=data.ActorPoolStrategy(size=self.ray.encode_workers),
                num_gpus=self.ray.gpus_per_worker or None, num_cpus=0 if self.ray.gpus_per_worker else 1,
                max_restarts=0)  # a lost actor fails the job; the rerun resumes from the last commit
            .map_batches(_write_fragments, fn_kwargs={"targets": targets}, batch_size=max(self.batch_size, self.ray.fragment_rows),
                         num_cpus=0.5)
        )
        for batch in job.iter_batches(batch_size=self.batch_size, batch_format="numpy"):
            for i, path in enumerate(batch["path"]):
                if len(batch["fragments"][i]):
                    for table, fragments in pickle.loads(batch["fragments"][i]).items():
                        writes[table].fragments.extend(fragments)
                self._route_row(str(path), {k: batch[k][i] for k in batch}, by_table, records, writes, touched, report)
            self._commit(conditions, writes, report, force=False)
            bar.update(len(batch["path"]))  # after the commit check: a first move means committed rows
            self._flush_touched(conditions, touched, force=False)

    def _route_row(self, path: str, row: dict, by_table, records, writes, touched, report: IndexReport) -> None:
        if row["reason"]:
            where = path if objectstore.is_uri(path) else Path(path)
            self._skip(SkippedImage(where, str(row["reason"])), list(by_table.values()), records, report)
            return
        record = FileRecord(row_id(path), path, int(row["size"]), int(row["mtime_ns"]), str(row["content_hash"]),
                            int(row["width"]), int(row["height"]))
        for table in row["kept"]:
            touched[table].append(record)
        for table in row["needs"]:
            writes[table].put(record, new=path not in records[table])
        if len(row["needs"]):
            report.encoded += 1
        else:
            report.unchanged += 1
