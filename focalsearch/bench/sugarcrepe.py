"""SugarCrepe (Hsieh et al., 2023): does the image score its caption above a hard negative?

Data, the official release (github.com/RAIVNLab/sugar-crepe, data/):
    DIR/{add_obj,add_att,replace_obj,replace_att,replace_rel,swap_obj,swap_att}.json
    DIR/coco/val2017/<filename>
Each file is a dict keyed by index: {"filename", "caption", "negative_caption"}.

Protocol, as the official script (main_eval.py): an item is right when the image scores the caption
strictly above the negative (``pos_score > neg_score``), and a subset's accuracy is the share of its
items that are right. Images are read as it reads them (``Image.open`` and RGB, no EXIF
orientation). Its baseline is plain CLIP (OpenCLIP in float32), so on a plain CLIP checkpoint
``--encoder auto`` runs ``clip`` here, and ``bench`` scores in float32 unless ``--precision`` says
otherwise (the JSON records it). The official script reports only the seven subset accuracies; beside them we
report, in percent:
- per group (replace, swap, add) and "mean" over the seven subsets: *unweighted* means of subset
  accuracies, so a small subset (swap_obj, 245 items) counts as much as a large one (add_obj, 2,062);
- "item-weighted mean": the share of all items that are right, every item counting once.

The image is encoded under an instruction: by default one word per subset kind (objects, attributes,
relations), our choice since the paper's prompt is not known to us; ``--instruction`` sets one
instruction for all subsets.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from focalsearch.bench.common import (
    BenchDataError,
    BenchReport,
    encode_requests,
    limit_records,
    load_rgb,
    mean,
    read_json,
    require_dir,
    require_file,
    strictly_prefers,
)

NAME = "sugarcrepe"
SUBSETS = ("replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att", "add_obj", "add_att")
GROUPS = {"replace": SUBSETS[:3], "swap": SUBSETS[3:5], "add": SUBSETS[5:]}
DEFAULT_INSTRUCTIONS = {"obj": "objects", "att": "attributes", "rel": "relations"}
REFERENCE = {"mean gain over CLIP": "about +5 points (FocalLens-CLIP vs its CLIP)"}
FIELDS = ("filename", "caption", "negative_caption")


def read_subset(data: Path, subset: str, limit: int | None = None) -> list[dict]:
    path = require_file(data / f"{subset}.json", NAME, f"{subset} annotations")
    records = read_json(path, NAME)
    if not isinstance(records, dict):
        raise BenchDataError(f"{NAME}: {path} must hold a dict keyed by index")
    items = []
    for index, record in records.items():
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in FIELDS):
            raise BenchDataError(f"{NAME}: {subset}.json record {index!r}: needs text fields {', '.join(FIELDS)}")
        items.append(dict(record))
    return limit_records(items, limit)


def item_weighted_mean(accuracies: dict[str, float], counts: dict[str, int]) -> float:
    """Accuracy over all items pooled: subset accuracies weighted by their item counts."""
    total = sum(counts[s] for s in accuracies)
    return sum(accuracies[s] * counts[s] for s in accuracies) / total if total else 0.0


def run(encoder, data: Path, *, instruction: str | None = None, limit: int | None = None, progress: bool = False) -> BenchReport:
    """Accuracy per subset, per group and the mean."""
    subsets = {subset: read_subset(data, subset, limit) for subset in SUBSETS}
    images = require_dir(data / "coco" / "val2017", NAME, "COCO val2017 image")
    requests: dict[str, list] = defaultdict(list)
    for subset, items in subsets.items():
        text = instruction if instruction is not None else DEFAULT_INSTRUCTIONS[subset.rsplit("_", 1)[1]]
        for item in items:
            item["instruction"] = text
            requests[text].append(item["filename"])
    vectors = encode_requests(encoder, requests, lambda name: load_rgb(images / name, NAME), progress=progress, desc=NAME)
    metrics: dict[str, float] = {}
    for subset, items in subsets.items():
        texts = [t for item in items for t in (item["caption"], item["negative_caption"])]
        text_vectors = encoder.encode_texts(texts)
        right = []
        for number, item in enumerate(items):
            image = vectors[(item["filename"], item["instruction"])]
            right.append(strictly_prefers(text_vectors[2 * number] @ image, text_vectors[2 * number + 1] @ image))
        metrics[subset] = mean(right) * 100
    for group, members in GROUPS.items():
        metrics[group] = mean(metrics[s] for s in members)
    metrics["mean"] = mean(metrics[s] for s in SUBSETS)
    counts = {s: len(v) for s, v in subsets.items()}
    metrics["item-weighted mean"] = item_weighted_mean({s: metrics[s] for s in SUBSETS}, counts)
    return BenchReport(NAME, encoder.info.model, encoder.info.encoder, metrics, reference=dict(REFERENCE), details={"items": counts})
