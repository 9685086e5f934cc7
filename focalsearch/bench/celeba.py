"""CelebA-Attribute: image→image retrieval of faces that share an attribute, under that attribute.

Data, the official CelebA release (mmlab.ie.cuhk.edu.hk/projects/CelebA.html):
    DIR/img_align_celeba/<file>.jpg
    DIR/list_attr_celeba.txt         line 1: count; line 2: the 40 attribute names; then
                                     "<file> v1 ... v40" with values 1 or -1
    DIR/list_eval_partition.txt      optional: "<file> 0|1|2"; when present only the test split (2) is used

Protocol (ours; the paper's exact protocol is not known to us):
- attributes: all 40 of the file. The paper reports an average over 29 attributes whose choice we
  do not know;
- the gallery is the test split (the first ``--limit`` images of it for a quick check); every
  gallery image is encoded under each attribute's instruction, by default the attribute's name in
  words ("wearing hat"); ``--instruction`` is a template in which ``{attribute}`` is filled in;
- queries: up to 100 gallery images that have the attribute (a fixed random choice, seed 0);
  relevant: every other gallery image that has it; the query itself is left out of its ranking;
- metric: mean average precision per attribute, ties ranked pessimistically, and its mean over
  attributes, in percent. "chance" is the mean AP a random ranking gets (the attribute's share of
  the gallery). The paper reports a "scaled mAP" whose definition we do not have, so its reference
  figures are not directly comparable;
- an attribute with fewer than 2 gallery images (as can happen with ``--limit``) has nothing to
  find and is left out. The means are then named "mean over N of 40 attributes" (and "chance mean
  over ..."), so that no partial mean stands beside the paper's figure as if it were the full one,
  and the JSON lists the attributes left out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from focalsearch.bench.common import (
    BenchDataError,
    BenchReport,
    average_precision,
    encode_grid,
    load_rgb,
    mean,
    require_dir,
    require_file,
)

NAME = "celeba-attribute"
DEFAULT_TEMPLATE = "{attribute}"
QUERIES_PER_ATTRIBUTE = 100
TEST_SPLIT = "2"
REFERENCE_BY_MODEL = {"CLIP": 13.59, "MagicLens": 13.42, "InstructBLIP": 16.19, "FocalLens-CLIP": 21.32, "FocalLens-MLLM": 22.67}
PAPER_MODEL = {"focallens": "FocalLens-CLIP", "mllm": "FocalLens-MLLM"}  # the paper's row for an encoder; else CLIP


def attribute_words(name: str) -> str:
    """'Wearing_Hat' -> 'wearing hat'."""
    return name.replace("_", " ").lower()


def read_attributes(data: Path) -> tuple[list[str], list[str], np.ndarray]:
    """(attribute names, file names, values as a bool matrix) from list_attr_celeba.txt."""
    path = require_file(data / "list_attr_celeba.txt", NAME, "attribute list")
    lines = path.read_text(encoding="utf-8").splitlines()
    if len(lines) < 3 or not lines[0].strip().isdigit():
        raise BenchDataError(f"{NAME}: {path} line 1 must be the image count, line 2 the attribute names")
    names = lines[1].split()
    files, rows = [], []
    for number, line in enumerate(lines[2:], start=3):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != len(names) + 1 or any(v not in ("1", "-1") for v in fields[1:]):
            raise BenchDataError(f"{NAME}: {path} line {number}: expected a file name and {len(names)} values of 1 or -1")
        files.append(fields[0])
        rows.append([v == "1" for v in fields[1:]])
    if len(files) != int(lines[0]):
        raise BenchDataError(f"{NAME}: {path} announces {lines[0].strip()} images but lists {len(files)}")
    return names, files, np.array(rows, dtype=bool).reshape(len(files), len(names))


def evaluation_split(data: Path, files: list[str]) -> np.ndarray:
    """Mask of the test-split files, or all files when there is no partition file."""
    path = data / "list_eval_partition.txt"
    if not path.is_file():
        return np.ones(len(files), dtype=bool)
    split = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if fields and (len(fields) != 2 or fields[1] not in ("0", "1", "2")):
            raise BenchDataError(f"{NAME}: {path} line {number}: expected '<file> 0|1|2'")
        if fields:
            split[fields[0]] = fields[1]
    return np.array([split.get(f) == TEST_SPLIT for f in files], dtype=bool)


def run(encoder, data: Path, *, instruction: str | None = None, limit: int | None = None, progress: bool = False) -> BenchReport:
    """mAP per attribute and the mean over attributes."""
    template = instruction or DEFAULT_TEMPLATE
    if "{attribute}" not in template:
        raise BenchDataError(f"{NAME}: --instruction must contain {{attribute}}, for example 'is the person {{attribute}}?'")
    names, files, values = read_attributes(data)
    keep = np.flatnonzero(evaluation_split(data, files))[:limit]
    gallery = [files[i] for i in keep]
    values = values[keep]
    if len(gallery) < 2:
        raise BenchDataError(f"{NAME}: the gallery needs at least 2 images, found {len(gallery)}")
    images = require_dir(data / "img_align_celeba", NAME, "image")
    instructions = [template.format(attribute=attribute_words(n)) for n in names]
    grids = encode_grid(encoder, gallery, instructions, lambda f: load_rgb(images / f, NAME), progress=progress, desc=NAME)
    rng = np.random.default_rng(0)
    metrics, chance = {}, {}
    for column, (name, text) in enumerate(zip(names, instructions)):
        has = values[:, column]
        positives = np.flatnonzero(has)
        if len(positives) < 2:  # no other relevant image to find
            continue
        queries = rng.choice(positives, size=min(QUERIES_PER_ATTRIBUTE, len(positives)), replace=False)
        vectors = grids[text].astype(np.float32)
        aps = []
        for q in queries:
            scores = np.delete(vectors @ vectors[q], q)
            aps.append(average_precision(scores, np.delete(has, q)))
        metrics[name] = mean(aps) * 100
        chance[name] = (len(positives) - 1) / (len(gallery) - 1) * 100
    if not metrics:
        raise BenchDataError(f"{NAME}: no attribute has two gallery images with it; use a larger gallery")
    left_out = [n for n in names if n not in metrics]
    over = f" over {len(metrics)} of {len(names)} attributes" if left_out else ""
    metrics[f"mean{over}"] = mean(metrics.values())
    metrics[f"chance mean{over}"] = mean(chance.values())
    reference_model = PAPER_MODEL.get(encoder.info.encoder, "CLIP")
    reference = {"mean": REFERENCE_BY_MODEL[reference_model]}
    reference.update({f"scaled mAP, 29 attributes ({m})": v for m, v in REFERENCE_BY_MODEL.items()})
    details = {"gallery": len(gallery), "instruction_template": template, "queries_per_attribute": QUERIES_PER_ATTRIBUTE,
               "attributes_in_mean": len(names) - len(left_out), "attributes": len(names), "attributes_left_out": left_out}
    notes = (f"mean{over}: {', '.join(left_out)} left out (fewer than 2 gallery images); not comparable with the paper's mean",) if left_out else ()
    return BenchReport(NAME, encoder.info.model, encoder.info.encoder, metrics, reference=reference,
                       reference_model=reference_model, details=details, notes=notes)
