"""MMVP-VLM (Tong et al., 2024): nine visual patterns, 15 image pairs each, paired scoring.

Data, the official release (huggingface.co/datasets/MMVP/MMVP_VLM):
    DIR/Questions.csv                       columns "Question ID", "Type", "Statement"
    DIR/MLLM_VLM Images/<Type>/<Question ID>.jpg
Rows come in pairs: an odd Question ID and the next one, of the same Type; each statement
describes the image with its own ID.

Protocol, as the official script: the text is "a photo of " + statement, scored against both images
of its pair. A statement is right when its own image scores strictly higher (the official script
lets a tie count for the second image; here no tie earns credit). A pair counts only when both
statements are right. Accuracy per pattern and the mean over patterns, in percent.

The image side is encoded under an instruction: by default the pattern's name in lower case
("orientation and direction"); ``--instruction`` replaces it, and ``{pattern}`` in it is filled in.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

from focalsearch.bench.common import (
    BenchDataError,
    BenchReport,
    encode_requests,
    limit_records,
    load_rgb,
    mean,
    require_dir,
    require_file,
    strictly_prefers,
)

NAME = "mmvp-vlm"
PROMPT = "a photo of "
IMAGE_FOLDER = "MLLM_VLM Images"
COLUMNS = ("Question ID", "Type", "Statement")
REFERENCE = {"mean gain over CLIP": "about +10 points (FocalLens-CLIP vs its CLIP)"}


def read_pairs(data: Path, limit: int | None = None) -> list[dict]:
    """Validated pairs: pattern, both question IDs and both statements."""
    path = require_file(data / "Questions.csv", NAME, "question file")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise BenchDataError(f"{NAME}: {path} lacks column(s) {', '.join(missing)}")
        rows = list(reader)
    if len(rows) % 2:
        raise BenchDataError(f"{NAME}: {path} has an odd number of statements ({len(rows)}); they come in pairs")
    pairs = []
    for i in range(0, len(rows), 2):
        first, second = rows[i], rows[i + 1]
        try:
            ids = int(first["Question ID"]), int(second["Question ID"])
        except ValueError:
            raise BenchDataError(f"{NAME}: {path} line {i + 2}: Question ID must be a number") from None
        if ids[0] % 2 != 1 or ids[1] != ids[0] + 1 or first["Type"] != second["Type"]:
            raise BenchDataError(f"{NAME}: {path} line {i + 2}: rows {ids} do not form a pair (odd ID, next ID, same Type)")
        pairs.append({"pattern": first["Type"].strip(), "ids": ids, "statements": (first["Statement"], second["Statement"])})
    return limit_records(pairs, limit)


def run(encoder, data: Path, *, instruction: str | None = None, limit: int | None = None, progress: bool = False) -> BenchReport:
    """Pair accuracy per pattern and the mean."""
    pairs = read_pairs(data, limit)
    images = require_dir(data / IMAGE_FOLDER, NAME, "image")
    requests: dict[str, list] = defaultdict(list)
    for pair in pairs:
        pair["instruction"] = (instruction or "{pattern}").format(pattern=pair["pattern"].lower())
        requests[pair["instruction"]].extend((pair["pattern"], qid) for qid in pair["ids"])
    vectors = encode_requests(
        encoder, requests, lambda key: load_rgb(images / key[0] / f"{key[1]}.jpg", NAME), progress=progress, desc=NAME
    )
    texts = [PROMPT + s for pair in pairs for s in pair["statements"]]
    text_vectors = encoder.encode_texts(texts)
    correct: dict[str, list[bool]] = defaultdict(list)
    for number, pair in enumerate(pairs):
        first, second = (vectors[((pair["pattern"], qid), pair["instruction"])] for qid in pair["ids"])
        t1, t2 = text_vectors[2 * number], text_vectors[2 * number + 1]
        right = strictly_prefers(t1 @ first, t1 @ second) and strictly_prefers(t2 @ second, t2 @ first)
        correct[pair["pattern"]].append(right)
    metrics = {pattern: mean(hits) * 100 for pattern, hits in correct.items()}
    metrics["mean"] = mean(metrics.values())
    return BenchReport(NAME, encoder.info.model, encoder.info.encoder, metrics, dict(REFERENCE),
                       details={"pairs": len(pairs), "instruction": instruction or "{pattern}"})
