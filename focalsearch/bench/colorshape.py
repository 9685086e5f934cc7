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

SETUPS = ("clip", "clip+text", "focallens", "focallens_heldout_phrasing", "focallens_heldout_synonyms",
          "focallens_heldout_questions")
_PHRASING_OF_SETUP = {"focallens_heldout_phrasing": "heldout", "focallens_heldout_synonyms": "synonyms",
                      "focallens_heldout_questions": "questions"}


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


def run(
    clip_model: str = "demo-clip",
    focallens_model: str = "demo",
    per_condition: int = 100,
    distractors: int = 4,
    seed: int = 0,
    device: str = "auto",
    setups: tuple[str, ...] = SETUPS,
) -> dict[str, SetupResult]:
    """Run the benchmark for each setup on the same held-out items."""
    from focalsearch.models import create_encoder

    items = cs.benchmark_items(per_condition, distractors, seed)
    results = {}
    for setup in setups:
        if setup in ("clip", "clip+text"):
            encoder = create_encoder(clip_model, encoder=setup, device=device, batch_size=256)
        else:
            encoder = create_encoder(focallens_model, encoder="focallens", device=device, batch_size=256)
        resolution = encoder.model.config.vision_config.image_size
        phrasing = _PHRASING_OF_SETUP.get(setup, "train")
        results[setup] = recall_at_1(items, encoder.encode_images, phrasing, resolution)
    return results


def run_report(encoder, data=None, *, instruction: str | None = None, limit: int | None = None, progress: bool = False):
    """One encoder on the held-out items, as a BenchReport in percent (``focalsearch bench colorshape``)."""
    from focalsearch.bench.common import BenchDataError, BenchReport

    if data is not None or instruction is not None:
        raise BenchDataError("colorshape generates its own items and phrasings; drop --data and --instruction")
    per_condition = limit or 200
    items = cs.benchmark_items(per_condition, 4, 0)
    resolution = encoder.model.config.vision_config.image_size
    result = recall_at_1(items, encoder.encode_images, "train", resolution)
    metrics = {f"{c}/R@1": v * 100 for c, v in result.per_condition.items()}
    metrics["mean/R@1"] = result.mean * 100
    if encoder.info.encoder == "focallens":
        for phrasing, label in (("heldout", "held-out phrasings"), ("synonyms", "held-out synonyms"),
                                ("questions", "held-out questions")):
            metrics[f"mean/R@1, {label}"] = recall_at_1(items, encoder.encode_images, phrasing, resolution).mean * 100
    return BenchReport("colorshape", encoder.info.model, encoder.info.encoder, metrics,
                       details={"queries_per_condition": per_condition, "distractors": 4})
