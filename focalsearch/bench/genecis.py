"""GeneCIS (Vaze et al., 2023): conditional image similarity, R@1/2/3 on four tasks.

Data, in the official layout (github.com/facebookresearch/genecis):
    DIR/genecis/{focus_attribute,change_attribute,focus_object,change_object}.json
    DIR/coco/val2017/%012d.jpg          object tasks: records name images by "val_image_id"
    DIR/vg/VG_100K_all/<image_id>.jpg   attribute tasks: "image_id" plus "instance_bbox" [x, y, w, h]
Each record is {"condition", "reference", "target", "gallery": [...]}.

Protocol:
- attribute images are the box grown by 0.7 of its size, computed as the official loader does
  (left/top move out by 0.7 w/h, the box is 1.7 w/h wide/high, clipped to the image), then padded
  to a centred black square;
- the instruction is the condition word put into the template (default "{condition}");
- FocalLens encodes reference and candidates under that instruction. For `clip+text` only the
  reference gets the text (GeneCIS's image+text baseline); `clip` ignores it;
- candidates are target + gallery; a candidate scoring equal to the target ranks above it.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from focalsearch.bench.common import (
    BenchDataError,
    BenchReport,
    encode_requests,
    limit_records,
    load_rgb,
    mean,
    pessimistic_rank,
    read_json,
    recall_at_k,
    require_dir,
    require_file,
)

NAME = "genecis"
TASKS = ("focus_attribute", "change_attribute", "focus_object", "change_object")
DEFAULT_TEMPLATE = "{condition}"
DILATION = 0.7
KS = (1, 2, 3)
REFERENCE = {"focus_attribute/R@3": 43.30, "focus_object/R@3": 43.72}


def crop_instance(image: Image.Image, bbox: list[float], dilation: float = DILATION) -> Image.Image:
    """The official GeneCIS attribute crop: the box grown by ``dilation``, padded to a black square."""
    x, y, w, h = bbox
    left, top = max(0.0, x - dilation * w), max(0.0, y - dilation * h)
    right, bottom = min(image.width, left + (1 + dilation) * w), min(image.height, top + (1 + dilation) * h)
    crop = image.crop((left, top, right, bottom))
    side = max(crop.size)
    square = Image.new("RGB", (side, side), (0, 0, 0))
    square.paste(crop, ((side - crop.width) // 2, (side - crop.height) // 2))
    return square


def _image_key(ref, task: str, where: str) -> tuple:
    if not isinstance(ref, dict):
        raise BenchDataError(f"{NAME}: {task}.json {where}: expected an object, got {type(ref).__name__}")
    if task.endswith("object"):
        if not isinstance(ref.get("val_image_id"), int):
            raise BenchDataError(f"{NAME}: {task}.json {where}: missing integer 'val_image_id'")
        return ("coco", ref["val_image_id"])
    bbox = ref.get("instance_bbox")
    if "image_id" not in ref or not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
        raise BenchDataError(f"{NAME}: {task}.json {where}: needs 'image_id' and 'instance_bbox' [x, y, w, h]")
    if bbox[2] <= 0 or bbox[3] <= 0:
        raise BenchDataError(f"{NAME}: {task}.json {where}: instance_bbox {bbox} has no area")
    return ("vg", ref["image_id"], tuple(float(v) for v in bbox))


def read_task(data: Path, task: str, limit: int | None = None) -> list[dict]:
    """Validated records of one task: condition, reference key, candidate keys (target first)."""
    path = require_file(data / "genecis" / f"{task}.json", NAME, f"{task} annotations")
    records = read_json(path, NAME)
    if not isinstance(records, list):
        raise BenchDataError(f"{NAME}: {path} must hold a list of records")
    items = []
    for number, record in enumerate(limit_records(records, limit)):
        where = f"record {number}"
        if not isinstance(record, dict) or not all(k in record for k in ("condition", "reference", "target", "gallery")):
            raise BenchDataError(f"{NAME}: {task}.json {where}: needs condition, reference, target and gallery")
        if not isinstance(record["condition"], str) or not isinstance(record["gallery"], list) or not record["gallery"]:
            raise BenchDataError(f"{NAME}: {task}.json {where}: condition must be text and gallery a non-empty list")
        candidates = [_image_key(record["target"], task, f"{where} target")]
        candidates += [_image_key(g, task, f"{where} gallery[{i}]") for i, g in enumerate(record["gallery"])]
        items.append(
            {"condition": record["condition"], "reference": _image_key(record["reference"], task, f"{where} reference"), "candidates": candidates}
        )
    return items


def _loader(data: Path):
    coco = data / "coco" / "val2017"
    vg = data / "vg" / "VG_100K_all"

    def load(key: tuple) -> Image.Image:
        if key[0] == "coco":
            return load_rgb(coco / f"{key[1]:012d}.jpg", NAME)
        return crop_instance(load_rgb(vg / f"{key[1]}.jpg", NAME), list(key[2]))

    return load


def run(encoder, data: Path, *, instruction: str | None = None, limit: int | None = None, progress: bool = False) -> BenchReport:
    """R@1/2/3 per task and their means."""
    template = instruction or DEFAULT_TEMPLATE
    if "{condition}" not in template:
        raise BenchDataError(f"{NAME}: --instruction must contain {{condition}}, for example 'what is the {{condition}}?'")
    tasks = {task: read_task(data, task, limit) for task in TASKS}
    require_dir(data / "coco" / "val2017", NAME, "COCO val2017 image")
    require_dir(data / "vg" / "VG_100K_all", NAME, "Visual Genome image")
    conditioned_gallery = encoder.info.encoder == "focallens"
    requests: dict[str, list] = defaultdict(list)
    for items in tasks.values():
        for item in items:
            text = template.format(condition=item["condition"])
            item["instruction"] = text
            requests[text].append(item["reference"])
            requests[text if conditioned_gallery else ""].extend(item["candidates"])
    vectors = encode_requests(encoder, requests, _loader(data), progress=progress, desc=NAME)
    metrics: dict[str, float] = {}
    for task, items in tasks.items():
        ranks = []
        for item in items:
            gallery_instruction = item["instruction"] if conditioned_gallery else ""
            query = vectors[(item["reference"], item["instruction"])]
            candidates = np.stack([vectors[(key, gallery_instruction)] for key in item["candidates"]])
            ranks.append(pessimistic_rank(candidates @ query, 0))
        for k in KS:
            metrics[f"{task}/R@{k}"] = recall_at_k(ranks, k)
    for k in KS:
        metrics[f"mean/R@{k}"] = mean(metrics[f"{task}/R@{k}"] for task in TASKS)
    counts = {task: len(items) for task, items in tasks.items()}
    return BenchReport(NAME, encoder.info.model, encoder.info.encoder, metrics, dict(REFERENCE),
                       {"instruction_template": template, "items": counts})
