"""ColorShape conditional retrieval (the paper's Figure 4 protocol, on our generated world).

For every item the query, its positive (shares only the condition's attribute) and its distractors
(share every other attribute) are encoded under the condition's instruction; the item counts for
R@1 when the positive scores strictly above every distractor (a tie counts against it).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from focalsearch.synth import colorshape as cs

# A setup is a model read with an encoder, under the training phrasings or one held-out tier (its suffix).
TIERS = {"": "train", "_heldout_phrasing": "heldout", "_heldout_synonyms": "synonyms", "_heldout_questions": "questions"}
TIER_LABELS = {"heldout": "held-out phrasings", "synonyms": "held-out synonyms", "questions": "held-out questions"}
SETUPS = ("clip", "clip+text", *(f"focallens{suffix}" for suffix in TIERS))
# The MLLM family: prompted only ("mllm") and FocalLens-tuned ("mllm_focal"), each on every tier.
MLLM_SETUPS = tuple(f"{name}{suffix}" for name in ("mllm", "mllm_focal") for suffix in TIERS)
ALL_SETUPS = (*SETUPS, *MLLM_SETUPS)


@dataclass(frozen=True)
class SetupResult:
    """R@1 per condition and their mean, as fractions in [0, 1]."""

    mean: float
    per_condition: dict[str, float]

    def to_dict(self) -> dict:
        return {"mean": round(self.mean, 4), "per_condition": {k: round(v, 4) for k, v in self.per_condition.items()}}


def _phrasing_for(condition: str, number: int, phrasing: str) -> str:
    group = cs.PHRASINGS[phrasing][condition]
    return group[number % len(group)]


def recall_at_1(
    items: list[cs.BenchmarkItem],
    encode: Callable[[list, str], np.ndarray],
    phrasing: str = "train",
    resolution: int = 64,
) -> SetupResult:
    """R@1 of an encoder ``encode(images, instruction) -> normalised vectors`` over the items."""
    hits: dict[str, list[bool]] = defaultdict(list)
    by_instruction: dict[str, list[cs.BenchmarkItem]] = defaultdict(list)
    counters: dict[str, int] = defaultdict(int)
    for item in items:
        by_instruction[_phrasing_for(item.condition, counters[item.condition], phrasing)].append(item)
        counters[item.condition] += 1
    for instruction, group in by_instruction.items():
        images = []
        for item in group:
            scenes = [(item.query, item.query_seed), (item.positive, item.positive_seed), *item.distractors]
            images.extend(cs.render(scene, seed, resolution) for scene, seed in scenes)
        vectors = encode(images, instruction)
        size = 2 + len(group[0].distractors)
        for number, item in enumerate(group):
            block = vectors[number * size : (number + 1) * size]
            scores = block[1:] @ block[0]
            hits[item.condition].append(bool(scores[0] > scores[1:].max()))
    per_condition = {c: float(np.mean(hits[c])) for c in cs.ATTRIBUTES if hits[c]}
    return SetupResult(float(np.mean(list(per_condition.values()))), per_condition)


def setup_parts(setup: str) -> tuple[str, str]:
    """(the model's role: clip, clip+text, focallens, mllm or mllm_focal; the phrasing tier) of a setup."""
    for suffix, phrasing in TIERS.items():
        if suffix and setup.endswith(suffix):
            return setup.removesuffix(suffix), phrasing
    return setup, "train"


def unavailable(model: str) -> str | None:
    """Why ``model`` cannot be loaded (not installed, not on the hub or offline), or None when its config reads."""
    from focalsearch.errors import FocalSearchError
    from focalsearch.models.loading import load_config, resolve_model

    try:
        load_config(resolve_model(model))
    except FocalSearchError as exc:
        return str(exc)
    return None


def run(
    clip_model: str = "demo-clip",
    focallens_model: str = "demo",
    per_condition: int = 100,
    distractors: int = 4,
    seed: int = 0,
    device: str = "auto",
    setups: tuple[str, ...] = SETUPS,
    mllm_model: str = "demo-mllm",
    mllm_focal_model: str = "demo-mllm-focal",
) -> dict[str, SetupResult]:
    """Run the benchmark for each setup on the same held-out items; each (model, encoder) is loaded once."""
    from focalsearch.models import create_encoder

    items = cs.benchmark_items(per_condition, distractors, seed)
    loads = {"clip": (clip_model, "clip"), "clip+text": (clip_model, "clip+text"), "focallens": (focallens_model, "focallens"),
             "mllm": (mllm_model, "mllm"), "mllm_focal": (mllm_focal_model, "mllm")}
    by_load: dict[tuple[str, str], list[str]] = defaultdict(list)
    for setup in setups:
        by_load[loads[setup_parts(setup)[0]]].append(setup)
    results = {}
    for (model, kind), group in by_load.items():
        encoder = create_encoder(model, encoder=kind, device=device, batch_size=256)
        for setup in group:
            results[setup] = recall_at_1(items, encoder.encode_images, setup_parts(setup)[1], encoder.min_decode_side)
        del encoder
    return {setup: results[setup] for setup in setups}


def run_report(encoder, data=None, *, instruction: str | None = None, limit: int | None = None, progress: bool = False):
    """One encoder on the held-out items, as a BenchReport in percent (``focalsearch bench colorshape``)."""
    from focalsearch.bench.common import BenchDataError, BenchReport

    if data is not None or instruction is not None:
        raise BenchDataError("colorshape generates its own items and phrasings; drop --data and --instruction")
    per_condition = limit or 200
    items = cs.benchmark_items(per_condition, 4, 0)
    resolution = encoder.min_decode_side
    result = recall_at_1(items, encoder.encode_images, "train", resolution)
    metrics = {f"{c}/R@1": v * 100 for c, v in result.per_condition.items()}
    metrics["mean/R@1"] = result.mean * 100
    if encoder.reads_instruction:
        for phrasing, label in TIER_LABELS.items():
            metrics[f"mean/R@1, {label}"] = recall_at_1(items, encoder.encode_images, phrasing, resolution).mean * 100
    return BenchReport("colorshape", encoder.info.model, encoder.info.encoder, metrics,
                       details={"queries_per_condition": per_condition, "distractors": 4})
