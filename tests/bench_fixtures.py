"""Tiny copies of the paper benchmarks in their official on-disk formats, with synthetic images.

Every image is one flat colour from PALETTE (attribute crops: a flat colour with black padding), and
every text names the colour it goes with, so a scorer that reads colours is perfect.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from PIL import Image

PALETTE = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
NAMES = list(PALETTE)


def _flat(path: Path, colour: str, size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, PALETTE[colour]).save(path, "JPEG", quality=95)


def write_genecis(root: Path, items_per_task: int = 3) -> Path:
    """genecis/*.json, coco/val2017/%012d.jpg and vg/VG_100K_all/<id>.jpg; the target shares the reference's colour."""
    (root / "genecis").mkdir(parents=True, exist_ok=True)
    next_id = 1
    for task in ("focus_attribute", "change_attribute", "focus_object", "change_object"):
        records = []
        for n in range(items_per_task):
            colour = NAMES[n % len(NAMES)]
            others = [c for c in NAMES if c != colour]
            ids = list(range(next_id, next_id + 5))
            next_id += 5
            colours = [colour, colour, *others]  # reference, target, gallery
            refs = []
            for image_id, c in zip(ids, colours):
                if task.endswith("object"):
                    _flat(root / "coco" / "val2017" / f"{image_id:012d}.jpg", c)
                    refs.append({"val_image_id": image_id})
                else:
                    _flat(root / "vg" / "VG_100K_all" / f"{image_id}.jpg", c, (60, 50))
                    refs.append({"image_id": image_id, "instance_bbox": [10, 12, 20, 16]})
            records.append({"condition": "colour", "reference": refs[0], "target": refs[1], "gallery": refs[2:]})
        (root / "genecis" / f"{task}.json").write_text(json.dumps(records, indent=1))
    return root


def write_mmvp(root: Path, patterns=("Color", "Quantity"), pairs_per_pattern: int = 2) -> Path:
    """Questions.csv and 'MLLM_VLM Images/<Type>/<id>.jpg'; statement n describes image n.

    Types are named as in the release's image folders ("Color", "Camera Perspective", ...).
    """
    rows, qid = [], 1
    for p, pattern in enumerate(patterns):
        for n in range(pairs_per_pattern):
            first, second = NAMES[(p + n) % 4], NAMES[(p + n + 1) % 4]
            for colour in (first, second):
                _flat(root / "MLLM_VLM Images" / pattern / f"{qid}.jpg", colour)
                rows.append({"Question ID": qid, "Type": pattern, "Statement": f"a {colour} picture"})
                qid += 1
    with (root / "Questions.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["Question ID", "Type", "Statement"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def write_sugarcrepe(root: Path, items_per_subset: int = 2) -> Path:
    """The seven subset files and coco/val2017/<filename>; the caption names the image's colour."""
    image_id = 1
    for subset in ("add_obj", "add_att", "replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att"):
        records = {}
        for n in range(items_per_subset):
            colour, wrong = NAMES[n % 4], NAMES[(n + 1) % 4]
            filename = f"{image_id:012d}.jpg"
            _flat(root / "coco" / "val2017" / filename, colour)
            records[str(n)] = {"filename": filename, "caption": f"a {colour} square", "negative_caption": f"a {wrong} square"}
            image_id += 1
        (root / f"{subset}.json").write_text(json.dumps(records))
    return root


CELEBA_ATTRIBUTES = ("Red_Channel", "Green_Channel", "Blue_Channel")


def write_celeba(root: Path, images: int = 16) -> Path:
    """img_align_celeba/, list_attr_celeba.txt and list_eval_partition.txt; attribute k = colour channel k is bright.

    Images 0-3 are in the train split and must not be used.
    """
    lines = [str(images), " ".join(CELEBA_ATTRIBUTES)]
    partition = []
    for i in range(images):
        bits = [(i >> k) & 1 for k in range(3)]
        name = f"{i + 1:06d}.jpg"
        path = root / "img_align_celeba" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (36, 44), tuple(230 if b else 20 for b in bits)).save(path, "JPEG", quality=95)
        lines.append(name + "".join(f" {1 if b else -1:>2}" for b in bits))
        partition.append(f"{name} {0 if i < 4 else 2}")
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").write_text("\n".join(partition) + "\n")
    return root
