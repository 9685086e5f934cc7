"""MMVP-VLM (Tong et al., 2024): nine visual patterns, 15 image pairs each, paired scoring.

Data, the official release (huggingface.co/datasets/MMVP/MMVP_VLM):
    DIR/Questions.csv                       a header line, then rows: Question ID, Type, Statement
    DIR/MLLM_VLM Images/<Type>/<Question ID>.jpg
Rows come in pairs: an odd Question ID and the next one, of the same Type; each statement
describes the image with its own ID.

Protocol, against the official script (github.com/tsb0601/MMVP, scripts/evaluate_vlm.py):
- reading: like the official script, we skip the first line whatever it says and read the columns
  by position (Question ID, Type, Statement); blank lines are skipped. Unlike it, we check that
  the rows pair up (odd ID, next ID, same Type), since it derives the right image from the IDs;
- the text is "a photo of " + statement, scored against both images of its pair;
- images are read as the official script reads them: ``Image.open`` and RGB, no EXIF orientation;
- the published baseline is plain CLIP (the official script scores OpenAI CLIP in float32), so on
  a plain CLIP checkpoint ``--encoder auto`` runs ``clip`` here, and ``bench`` scores in float32
  unless ``--precision`` says otherwise (the JSON records it);
- ties, ``--ties official`` (default): the official script picks image 1 only when its softmax
  probability over the two images is above 0.5, i.e. when image 1 scores strictly higher (up to
  float32 rounding of the softmax), and image 2 otherwise. So an exact tie goes to image 2: it
  makes the first statement wrong and the second right. ``--ties pessimistic``: a statement is
  right only when its own image scores strictly higher;
- a pair counts only when both statements are right. Accuracy per pattern and the unweighted mean
  over patterns, in percent. Patterns are keyed by their Type value; the official script names
  them by position instead (pairs 1-15 'Orientation and Direction', 16-30 'Presence of Specific
  Features', and so on), so the two agree only where the file lists each Type's pairs as one block
  in that order.

The image side is encoded under an instruction: by default the row's Type value in lower case
(Type "Camera Perspective" -> "camera perspective"); ``--instruction`` replaces it, and
``{pattern}`` in it is filled in with that lower-cased Type.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

from focalsearch.bench.common import (
    BenchDataError,
    BenchReport,
    check_ties,
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
DEFAULT_INSTRUCTION = "{pattern}"
REFERENCE = {"mean gain over CLIP": "about +10 points (FocalLens-CLIP vs its CLIP)"}


def instruction_for(pattern: str, template: str | None = None) -> str:
    """The instruction a pattern's images are encoded under: ``template`` (default: the Type value
    alone) with ``{pattern}`` filled in by the Type value in lower case."""
    return (template or DEFAULT_INSTRUCTION).format(pattern=pattern.lower())


def _read_rows(path: Path) -> list[tuple[int, tuple[str, str, str]]]:
    """(line number, (Question ID, Type, Statement)) for every row after the header line."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        lines = list(enumerate(csv.reader(f), start=1))[1:]
    rows = []
    for number, fields in lines:
        while fields and not fields[-1].strip():  # trailing empty cells, as some spreadsheets write them
            fields = fields[:-1]
        if not fields:
            continue
        if len(fields) != len(COLUMNS):
            raise BenchDataError(f"{NAME}: {path} line {number}: expected {len(COLUMNS)} columns ({', '.join(COLUMNS)}), found {len(fields)}")
        rows.append((number, tuple(fields)))
    return rows


def read_pairs(data: Path, limit: int | None = None) -> list[dict]:
    """Validated pairs: pattern, both question IDs and both statements."""
    path = require_file(data / "Questions.csv", NAME, "question file")
    rows = _read_rows(path)
    if len(rows) % 2:
        raise BenchDataError(f"{NAME}: {path} has an odd number of statements ({len(rows)}); they come in pairs")
    pairs = []
    for (number, first), (_, second) in zip(rows[::2], rows[1::2]):
        try:
            ids = int(first[0]), int(second[0])
        except ValueError:
            raise BenchDataError(f"{NAME}: {path} line {number}: Question ID must be a number") from None
        if ids[0] % 2 != 1 or ids[1] != ids[0] + 1 or first[1] != second[1]:
            raise BenchDataError(f"{NAME}: {path} line {number}: rows {ids} do not form a pair (odd ID, next ID, same Type)")
        pairs.append({"pattern": first[1].strip(), "ids": ids, "statements": (first[2], second[2])})
    return limit_records(pairs, limit)


def chosen_image(score_1: float, score_2: float) -> int:
    """The official choice between a pair's images: 1 only when it scores strictly higher, else 2."""
    return 1 if score_1 > score_2 else 2


def pair_is_right(scores_1: tuple[float, float], scores_2: tuple[float, float], ties: str) -> bool:
    """Whether both statements pick their own image; ``scores_n`` is statement n against (image 1, image 2)."""
    if ties == "official":
        return chosen_image(*scores_1) == 1 and chosen_image(*scores_2) == 2
    return strictly_prefers(scores_1[0], scores_1[1]) and strictly_prefers(scores_2[1], scores_2[0])


def run(
    encoder,
    data: Path,
    *,
    instruction: str | None = None,
    limit: int | None = None,
    progress: bool = False,
    ties: str = "official",
) -> BenchReport:
    """Pair accuracy per pattern and the mean."""
    check_ties(ties)
    pairs = read_pairs(data, limit)
    images = require_dir(data / IMAGE_FOLDER, NAME, "image")
    requests: dict[str, list] = defaultdict(list)
    for pair in pairs:
        pair["instruction"] = instruction_for(pair["pattern"], instruction)
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
        correct[pair["pattern"]].append(pair_is_right((t1 @ first, t1 @ second), (t2 @ first, t2 @ second), ties))
    metrics = {pattern: mean(hits) * 100 for pattern, hits in correct.items()}
    metrics["mean"] = mean(metrics.values())
    return BenchReport(NAME, encoder.info.model, encoder.info.encoder, metrics, reference=dict(REFERENCE),
                       details={"pairs": len(pairs), "instruction": instruction or DEFAULT_INSTRUCTION, "ties": ties})
