"""What every paper benchmark shares: the report, the scoring rules, data errors and batched encoding.

Scoring rules (pinned by tests/test_bench.py). Where a benchmark has official evaluation code, its
rule is the default, and ``--ties pessimistic`` (GeneCIS, MMVP-VLM) asks for a rule under which a
tie never earns credit:
- GeneCIS ranks, "official": candidates are listed target first and sorted by descending score
  keeping list order among equal scores, so a candidate that ties with the target ranks below it
  (``stable_rank``); "pessimistic": every other candidate with an equal score ranks above it, so a
  constant scorer gets no credit from order (``pessimistic_rank``);
- MMVP-VLM pairs, "official": image 1 is chosen only when it scores strictly higher, so a tie goes
  to image 2 (right for the second statement, wrong for the first); "pessimistic": a statement is
  right only when its own image scores strictly higher;
- SugarCrepe, as its official script: the caption must score strictly above the negative;
- CelebA-Attribute (no official code): within equal scores, irrelevant images rank first.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from focalsearch.errors import UserError

REFERENCE_SOURCE = "as quoted by secondary sources, not read from the paper itself"


class BenchDataError(UserError):
    """A benchmark's data is missing or not in the official format."""


@dataclass(frozen=True)
class BenchReport:
    """One benchmark run: our metrics (percentages) beside the paper's reference figures."""

    benchmark: str
    model: str
    encoder: str
    metrics: dict[str, float]
    _: KW_ONLY  # the rest by name: a details dict passed by position once landed in reference_model
    reference: dict[str, float | str] = field(default_factory=dict)
    reference_model: str = "FocalLens-CLIP"
    details: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    precision: str | None = None  # the arithmetic the encoder scored in; set by registry.run_benchmark

    def to_dict(self) -> dict:
        return {
            "benchmark": self.benchmark,
            "model": self.model,
            "encoder": self.encoder,
            **({"precision": self.precision} if self.precision else {}),
            "metrics": {k: round(v, 2) for k, v in self.metrics.items()},
            "reference": self.reference,
            "reference_model": self.reference_model,
            "reference_source": REFERENCE_SOURCE,
            **self.details,
            "notes": list(self.notes),
        }

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def table(self) -> str:
        """Metric | ours | paper, one row per metric; references without a matching metric follow."""
        width = max([len(k) for k in self.metrics] + [len(k) for k in self.reference] + [6])
        lines = [
            f"{self.benchmark}: {self.model} ({self.encoder}{', ' + self.precision if self.precision else ''})",
            f"{'metric':<{width}}  {'ours':>7}" + (f"  {'paper':>7}  (paper: {self.reference_model})" if self.reference else ""),
        ]
        for name, value in self.metrics.items():
            ref = self.reference.get(name)
            ref_text = f"  {ref:>7.2f}" if isinstance(ref, (int, float)) else ""
            lines.append(f"{name:<{width}}  {value:>7.2f}{ref_text}")
        extra = {k: v for k, v in self.reference.items() if k not in self.metrics}
        for name, value in extra.items():
            lines.append(f"paper: {name}: {value}")
        if self.reference:
            lines.append(f"(paper figures: {REFERENCE_SOURCE})")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


# -- scoring rules -----------------------------------------------------------------------------------
TIES = ("official", "pessimistic")


def check_ties(ties: str) -> str:
    """The tie rule, or a one-line error naming the choices."""
    if ties not in TIES:
        raise UserError(f"unknown tie rule {ties!r}; use one of: {', '.join(TIES)}")
    return ties


def stable_rank(scores: np.ndarray, target: int) -> int:
    """1-based rank of ``scores[target]`` in a stable descending sort: equal scores keep list order."""
    scores = np.asarray(scores)
    return int(np.sum(scores > scores[target]) + np.sum(scores[:target] == scores[target])) + 1


def pessimistic_rank(scores: np.ndarray, target: int) -> int:
    """1-based rank of ``scores[target]``; every other candidate with an equal score ranks above it."""
    others = np.delete(scores, target)
    return int(np.sum(others >= scores[target])) + 1


def candidate_scores(query: np.ndarray, candidates: Sequence[np.ndarray]) -> np.ndarray:
    """Dot product of the query with each candidate, one at a time, so that the same vector listed
    twice scores exactly the same (a matrix product may round its rows differently)."""
    return np.array([float(np.dot(vector, query)) for vector in candidates])


def recall_at_k(ranks: Sequence[int], k: int) -> float:
    """Percentage of ranks that are at most k."""
    ranks = np.asarray(ranks)
    return float(np.mean(ranks <= k) * 100) if len(ranks) else 0.0


def average_precision(scores: np.ndarray, relevant: np.ndarray) -> float:
    """AP of a ranking by descending score; within equal scores, irrelevant items come first."""
    relevant = np.asarray(relevant, dtype=bool)
    n_relevant = int(relevant.sum())
    if n_relevant == 0:
        return 0.0
    order = np.lexsort((relevant, -np.asarray(scores)))  # primary: score desc; ties: False (irrelevant) first
    hits = relevant[order]
    precision_at_hits = np.cumsum(hits)[hits] / (np.flatnonzero(hits) + 1)
    return float(precision_at_hits.sum() / n_relevant)


def strictly_prefers(own: float, other: float) -> bool:
    """A choice between two candidates counts only when the right one scores strictly higher."""
    return bool(own > other)


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return float(np.mean(values)) if values else 0.0


# -- data access ---------------------------------------------------------------------------------------
def require_file(path: Path, benchmark: str, what: str) -> Path:
    if not path.is_file():
        raise BenchDataError(f"{benchmark}: missing {what} {path}")
    return path


def require_dir(path: Path, benchmark: str, what: str) -> Path:
    if not path.is_dir():
        raise BenchDataError(f"{benchmark}: missing {what} folder {path}")
    return path


def read_json(path: Path, benchmark: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BenchDataError(f"{benchmark}: {path} is not valid JSON: {exc}") from None


def load_rgb(path: Path, benchmark: str):
    """Decode one benchmark image as the official loaders do, or raise a one-line error naming it.

    The official GeneCIS, MMVP and SugarCrepe code opens an image with ``Image.open(path)`` and
    converts it to RGB (in CLIP's preprocessing), and nothing more: no EXIF orientation. So a JPEG
    whose EXIF says "rotate" keeps its stored pixels here, and a Visual Genome box is cropped from
    those pixels. (Indexing applies EXIF orientation: focalsearch.images.load_image.) PIL's own
    decompression-bomb limit applies, as it does there.
    """
    if not path.is_file():
        raise BenchDataError(f"{benchmark}: cannot use image {path}: file not found")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as exc:  # PIL raises many kinds (OSError, SyntaxError, DecompressionBombError, ...)
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise BenchDataError(f"{benchmark}: cannot use image {path}: {reason}") from None


# -- encoding ------------------------------------------------------------------------------------------
def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False)


def _decoded_batches(encoder, keys: list, load: Callable[[Hashable], object], progress: bool, desc: str, workers: int):
    """Yield (keys, pixels) per encoder batch; each image is decoded and preprocessed once, in threads."""
    batch = max(1, encoder.batch_size)
    with progress_bar(len(keys), desc, progress) as bar, ThreadPoolExecutor(workers) as pool:
        pending = None
        for start in range(0, len(keys) + batch, batch):
            # Decode the next batch while the current one is encoded.
            chunk = keys[start : start + batch]
            upcoming = pool.submit(lambda c=chunk: encoder.preprocess(list(map(load, c)))) if chunk else None
            if pending is not None:
                previous_keys, future = pending
                yield previous_keys, future.result()
                bar.update(len(previous_keys))
            pending = (chunk, upcoming) if chunk else None


def encode_requests(
    encoder,
    requests: dict[str, list[Hashable]],
    load: Callable[[Hashable], object],
    *,
    progress: bool = False,
    desc: str = "encoding",
    workers: int = 8,
) -> dict[tuple[Hashable, str], np.ndarray]:
    """Encode each image key under each instruction that asks for it, decoding every image once.

    ``requests`` maps an instruction to the image keys it needs. An encoder that ignores instructions
    (plain ``clip``) encodes each image once, shared by every instruction.
    """
    ignores_instruction = not encoder.reads_instruction
    wanted: dict[Hashable, list[str]] = {}
    for instruction, group in requests.items():
        for key in group:
            needs = wanted.setdefault(key, [])
            if instruction not in needs:
                needs.append(instruction)
    vectors: dict[tuple[Hashable, str], np.ndarray] = {}
    for keys, pixels in _decoded_batches(encoder, list(wanted), load, progress, desc, workers):
        groups: dict[tuple[str, ...], list[int]] = {}  # rows asking for the same instructions: one encoder call
        for row, key in enumerate(keys):
            groups.setdefault(("",) if ignores_instruction else tuple(wanted[key]), []).append(row)
        for needs, rows in groups.items():
            arrays = encoder.encode_batch(encoder.select(pixels, rows), list(needs))
            for instruction, encoded in zip(needs, arrays):
                for row, vector in zip(rows, encoded):
                    for asked in wanted[keys[row]] if ignores_instruction else [instruction]:
                        vectors[(keys[row], asked)] = vector
    return vectors


def encode_grid(
    encoder,
    keys: list[Hashable],
    instructions: list[str],
    load: Callable[[Hashable], object],
    *,
    progress: bool = False,
    desc: str = "encoding",
    workers: int = 8,
) -> dict[str, np.ndarray]:
    """Every image under every instruction, as one float16 (len(keys), dim) matrix per instruction."""
    reads = encoder.reads_instruction
    distinct = list(dict.fromkeys(instructions)) if reads else [""]
    grids = {i: np.zeros((len(keys), encoder.info.dim), np.float16) for i in distinct}
    row = 0
    for chunk, pixels in _decoded_batches(encoder, keys, load, progress, desc, workers):
        for grid, encoded in zip(grids.values(), encoder.encode_batch(pixels, list(grids))):
            grid[row : row + len(chunk)] = encoded
        row += len(chunk)
    return {i: grids[i if reads else ""] for i in instructions}


def encode_raw_images(
    encoder,
    keys: list[Hashable],
    load: Callable[[Hashable], object],
    *,
    progress: bool = False,
    desc: str = "encoding",
    workers: int = 8,
) -> dict[Hashable, np.ndarray]:
    """Plain CLIP image embeddings *before* L2 normalisation, one per key, each image decoded once."""
    vectors: dict[Hashable, np.ndarray] = {}
    for chunk, pixels in _decoded_batches(encoder, list(dict.fromkeys(keys)), load, progress, desc, workers):
        vectors.update(zip(chunk, encoder.raw_image_features(pixels)))
    return vectors


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def limit_records(records: list, limit: int | None) -> list:
    return records if limit is None else records[:limit]
