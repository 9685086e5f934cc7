"""GeneCIS (Vaze et al., 2023): conditional image similarity, R@1/2/3 on four tasks.

Data, in the official layout (github.com/facebookresearch/genecis):
    DIR/genecis/{focus_attribute,change_attribute,focus_object,change_object}.json
    DIR/coco/val2017/%012d.jpg          object tasks: records name images by "val_image_id"
    DIR/vg/VG_100K_all/<image_id>.jpg   attribute tasks: "image_id" plus "instance_bbox" [x, y, w, h]
Each record is {"condition", "reference", "target", "gallery": [...]}.

Tasks: the official code evaluates one task per run (``evaluate.py --dataset TASK``). We run every
task whose annotation file, image folder and images are all present, and name the ones left out and
why (in the table's notes and in the JSON's "tasks_left_out"): the attribute tasks need Visual
Genome, which many users lack. ``--task`` (repeatable) picks tasks; a task asked for by name that
cannot run is an error, as is having no task to run.

Protocol, against the official code (eval/evaluate.py, eval/eval_functions.py ``validate``):
- attribute images are the box grown by 0.7 of its size, computed as the official loader does
  (left/top move out by 0.7 w/h, the box is 1.7 w/h wide/high, clipped to the image), then padded
  to a centred black square (datasets/vaw_dataset.py);
- the instruction is the condition word put into the template (default "{condition}", the bare
  condition that the official code tokenises);
- records: as the official loaders (datasets/coco_dataset.py, vaw_dataset.py) do, a record whose
  gallery length is not the file's most common one is dropped; the JSON's "records_dropped" and a
  note say how many;
- candidates are target + gallery, target first, as the official loaders build them; their
  L2-normalised embeddings are scored by dot product with the normalised query;
- images are read as the official loaders read them: ``Image.open`` and RGB, no EXIF orientation
  (bench/common.py ``load_rgb``), so a Visual Genome box is cropped from the stored pixels;
- the query, by encoder: ``focallens`` and ``mllm`` encode reference and candidates under the instruction.
  The official baselines are the three modes of utils/model_utils.py ``FeatureComb``, each scored
  against the plain, normalised CLIP features of the candidates: ``clip`` is "image_only" (the
  reference image alone); ``text-only`` (``--encoder text-only``) is "text_only": normalise(text
  feature of the instruction), the reference image unused. It needs only the encoder's text vectors
  and its empty-instruction image vectors, which are plain CLIP's in the CLIP family (FocalLens-CLIP's
  included), and on an MLLM checkpoint are its text and unconditional vectors, the same form through
  the one model;
  ``clip+text`` is "image_plus_text" at its default weight 0.5: normalise(0.5 * raw image + 0.5 *
  raw text), both CLIP embeddings taken *before* normalisation. We use that here instead of our
  general ``clip+text`` encoder (the normalised sum of the normalised embeddings) so that these
  figures compare with the published baseline;
- ties, ``--ties official`` (default): the official code sorts the scores with
  ``torch.sort(descending=True)``, target at position 0, on CUDA. PyTorch does not promise a
  stable order there (``stable=False``), and CUDA's sort is not stable: in a model of its 32-slot
  bitonic network (issue 23) the target won a tie with the last gallery item only 49 % of the time.
  So "official" is our CPU-stable reading of it, under which a candidate tying with the target
  ranks below it. It is what PyTorch's CPU sort does for lists this short (15 candidates in the
  object tasks; checked with torch 2.13 for up to 16 elements).
  This matters on real data: change_object.json record 19 lists its target again in the gallery.
  ``--ties pessimistic``: a candidate tying with the target ranks above it;
- R@k per task is the share of queries whose target ranks k or better; "mean/R@k" is the unweighted
  mean over the four tasks, named "mean over n of 4 tasks/R@k" when fewer ran.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from focalsearch.bench.common import (
    BenchDataError,
    BenchReport,
    candidate_scores,
    check_ties,
    encode_raw_images,
    encode_requests,
    l2_normalize,
    limit_records,
    load_rgb,
    mean,
    pessimistic_rank,
    read_json,
    recall_at_k,
    require_file,
    stable_rank,
)

NAME = "genecis"
TASKS = ("focus_attribute", "change_attribute", "focus_object", "change_object")
DEFAULT_TEMPLATE = "{condition}"
DILATION = 0.7
KS = (1, 2, 3)
REFERENCE = {"focus_attribute/R@3": 43.30, "focus_object/R@3": 43.72}
IMAGE_FOLDERS = {"object": "coco/val2017", "attribute": "vg/VG_100K_all"}
QUERY = {
    "conditioned": "reference and candidates encoded under the instruction",
    "clip": "the reference image alone (GeneCIS's image-only baseline)",
    "clip+text": "normalise(0.5 * raw image + 0.5 * raw instruction text), GeneCIS's image+text baseline",
    "text-only": "the instruction's text feature alone (GeneCIS's text-only baseline)",
}
BASELINES = ("text-only",)  # asked for with --encoder


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


def modal_gallery_length(records: list) -> int | None:
    """The gallery length the official loaders keep: the most common one (the smallest among equally
    common ones, as ``np.unique`` then ``argmax``); None when no record has a gallery list."""
    lengths = [len(r["gallery"]) for r in records if isinstance(r, dict) and isinstance(r.get("gallery"), list)]
    if not lengths:
        return None
    values, counts = np.unique(lengths, return_counts=True)
    return int(values[np.argmax(counts)])


def read_task(data: Path, task: str, limit: int | None = None) -> tuple[list[dict], int]:
    """(validated records of one task: condition, reference key, candidate keys (target first);
    how many records were dropped). As the official loaders do, records whose gallery length is not
    the file's most common one are dropped; ``limit`` then takes the first records that are kept."""
    path = require_file(data / "genecis" / f"{task}.json", NAME, f"{task} annotations")
    records = read_json(path, NAME)
    if not isinstance(records, list):
        raise BenchDataError(f"{NAME}: {path} must hold a list of records")
    modal = modal_gallery_length(records)
    numbered = [
        (number, record) for number, record in enumerate(records)
        if not (isinstance(record, dict) and isinstance(record.get("gallery"), list) and len(record["gallery"]) != modal)
    ]
    items = []
    for number, record in limit_records(numbered, limit):
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
    return items, len(records) - len(numbered)


def _image_path(data: Path, key: tuple) -> Path:
    if key[0] == "coco":
        return data / "coco" / "val2017" / f"{key[1]:012d}.jpg"
    return data / "vg" / "VG_100K_all" / f"{key[1]}.jpg"


def _loader(data: Path):
    def load(key: tuple) -> Image.Image:
        image = load_rgb(_image_path(data, key), NAME)
        return image if key[0] == "coco" else crop_instance(image, list(key[2]))

    return load


def _why_not(data: Path, task: str, limit: int | None) -> tuple[list[dict], int, str | None]:
    """(records, records dropped, None) when the task can run, else ([], 0, the reason it cannot)."""
    folder = IMAGE_FOLDERS[task.rsplit("_", 1)[1]]
    if not (data / "genecis" / f"{task}.json").is_file():
        return [], 0, f"no annotations genecis/{task}.json"
    if not (data / folder).is_dir():
        return [], 0, f"no image folder {folder}"
    items, dropped = read_task(data, task, limit)
    paths = {_image_path(data, key) for item in items for key in (item["reference"], *item["candidates"])}
    missing = sorted(str(path.relative_to(data)) for path in paths if not path.is_file())
    if missing:
        return [], 0, f"{len(missing)} of {len(paths)} images missing, e.g. {missing[0]}"
    return items, dropped, None


def check_task_names(asked: list[str] | None) -> None:
    """A one-line error for a task name GeneCIS does not have."""
    unknown = [t for t in asked or [] if t not in TASKS]
    if unknown:
        raise BenchDataError(f"{NAME}: unknown task {unknown[0]!r}; use one of: {', '.join(TASKS)}")


def select_tasks(
    data: Path, asked: list[str] | None = None, limit: int | None = None
) -> tuple[dict[str, list[dict]], dict[str, str], dict[str, int]]:
    """(records of each task that can run, reason for each task left out, records dropped per task
    that runs); ``asked`` tasks must all run."""
    check_task_names(asked)
    tasks, left_out, dropped = {}, {}, {}
    for task in dict.fromkeys(asked or TASKS):
        items, dropped_here, reason = _why_not(data, task, limit)
        if reason is None:
            tasks[task], dropped[task] = items, dropped_here
        elif asked:
            raise BenchDataError(f"{NAME}: cannot run {task}: {reason}")
        else:
            left_out[task] = reason
    if not tasks:
        raise BenchDataError(f"{NAME}: no task can run under {data}: " + "; ".join(f"{t}: {r}" for t, r in left_out.items()))
    return tasks, left_out, dropped


def _scores_conditioned(encoder, tasks: dict[str, list[dict]], load, progress: bool) -> dict[str, list[np.ndarray]]:
    """Candidate scores per item: an encoder that reads the instruction (focallens, mllm) encodes both
    sides under it, plain clip neither."""
    conditioned_gallery = encoder.reads_instruction
    requests: dict[str, list] = defaultdict(list)
    for item in (item for items in tasks.values() for item in items):
        requests[item["instruction"]].append(item["reference"])
        requests[item["instruction"] if conditioned_gallery else ""].extend(item["candidates"])
    vectors = encode_requests(encoder, requests, load, progress=progress, desc=NAME)
    scores = {}
    for task, items in tasks.items():
        scores[task] = []
        for item in items:
            gallery_instruction = item["instruction"] if conditioned_gallery else ""
            query = vectors[(item["reference"], item["instruction"])]
            scores[task].append(candidate_scores(query, [vectors[(key, gallery_instruction)] for key in item["candidates"]]))
    return scores


def _scores_image_plus_text(encoder, tasks: dict[str, list[dict]], load, progress: bool) -> dict[str, list[np.ndarray]]:
    """Candidate scores per item for GeneCIS's image+text baseline: normalise(0.5 * raw image + 0.5 * raw text)."""
    items = [item for group in tasks.values() for item in group]
    keys = [key for item in items for key in (item["reference"], *item["candidates"])]
    raw = encode_raw_images(encoder, keys, load, progress=progress, desc=NAME)
    unit = {key: l2_normalize(vector) for key, vector in raw.items()}
    instructions = list(dict.fromkeys(item["instruction"] for item in items))
    texts = dict(zip(instructions, encoder.raw_text_features(instructions)))
    scores = {}
    for task, group in tasks.items():
        scores[task] = []
        for item in group:
            query = l2_normalize(0.5 * raw[item["reference"]] + 0.5 * texts[item["instruction"]])
            scores[task].append(candidate_scores(query, [unit[key] for key in item["candidates"]]))
    return scores


def _scores_text_only(encoder, tasks: dict[str, list[dict]], load, progress: bool) -> dict[str, list[np.ndarray]]:
    """Candidate scores per item for GeneCIS's text-only baseline (``FeatureComb`` "text_only"):
    the query is the normalised text feature of the instruction alone, scored against the plain
    (empty-instruction) normalised image features of the candidates; the reference image is unused."""
    items = [item for group in tasks.values() for item in group]
    vectors = encode_requests(encoder, {"": [key for item in items for key in item["candidates"]]}, load, progress=progress, desc=NAME)
    instructions = list(dict.fromkeys(item["instruction"] for item in items))
    texts = dict(zip(instructions, encoder.encode_texts(instructions)))
    return {
        task: [candidate_scores(texts[item["instruction"]], [vectors[(key, "")] for key in item["candidates"]]) for item in group]
        for task, group in tasks.items()
    }


def run(
    encoder,
    data: Path,
    *,
    instruction: str | None = None,
    limit: int | None = None,
    progress: bool = False,
    ties: str = "official",
    tasks: list[str] | None = None,
    baseline: str | None = None,
) -> BenchReport:
    """R@1/2/3 per task that can run, and their mean; ``baseline="text-only"`` runs GeneCIS's
    text-only baseline with the encoder's text and empty-instruction image vectors."""
    if baseline is not None and baseline not in BASELINES:
        raise BenchDataError(f"{NAME}: unknown baseline {baseline!r}; use one of: {', '.join(BASELINES)}")
    template = instruction or DEFAULT_TEMPLATE
    if "{condition}" not in template:
        raise BenchDataError(f"{NAME}: --instruction must contain {{condition}}, for example 'what is the {{condition}}?'")
    rank = stable_rank if check_ties(ties) == "official" else pessimistic_rank
    chosen, left_out, dropped = select_tasks(data, tasks, limit)
    for item in (item for items in chosen.values() for item in items):
        item["instruction"] = template.format(condition=item["condition"])
    label = baseline or encoder.info.encoder
    score = {"text-only": _scores_text_only, "clip+text": _scores_image_plus_text}.get(label, _scores_conditioned)
    scores = score(encoder, chosen, _loader(data), progress)
    query = QUERY[label if label in QUERY else "conditioned" if encoder.reads_instruction else "clip"]
    metrics: dict[str, float] = {}
    for task in chosen:
        ranks = [rank(item_scores, 0) for item_scores in scores[task]]
        for k in KS:
            metrics[f"{task}/R@{k}"] = recall_at_k(ranks, k)
    mean_name = "mean" if len(chosen) == len(TASKS) else f"mean over {len(chosen)} of {len(TASKS)} tasks"
    for k in KS:
        metrics[f"{mean_name}/R@{k}"] = mean(metrics[f"{task}/R@{k}"] for task in chosen)
    details = {
        "instruction_template": template,
        "query": query,
        "ties": ties,
        "items": {task: len(items) for task, items in chosen.items()},
        "tasks_left_out": left_out,
        "records_dropped": dropped,
    }
    notes = tuple(f"left out {task}: {reason}" for task, reason in left_out.items())
    notes += tuple(f"{task}: dropped {n} records whose gallery length is not the most common, as the official loaders do"
                   for task, n in dropped.items() if n)
    return BenchReport(NAME, encoder.info.model, label, metrics,
                       reference=dict(REFERENCE), details=details, notes=notes)
