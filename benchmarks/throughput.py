"""Indexing throughput against the physical ceilings, measured side by side in one run.

    python benchmarks/throughput.py [--images 240] [--models demo,vit-b16,mllm] [--mllm-model demo-mllm]
                                    [--device auto|cpu|cuda] [--repeats 3]
                                    [--encode-repeats 5] [--encode-seconds 1] [--precision auto] [--json OUT]
                                    [--contention | --contention-only] [--contention-busy N] [--contention-folder DIR]
                                    [--contention-policies default,spin,1-thread]

On a generated folder of photo-like JPEGs of 1-4 megapixels, for each model:
(a) the stage ceilings, each stage alone:
    - decode + preprocess only (the indexer's workers, JPEG draft mode on, and off for comparison);
    - encoder forward passes only, on pre-decoded tensors, per instruction (encode_rates): each
      instruction's tokens make the sequence a different length, and CPU kernels are planned per
      shape, so every length is warmed up first, each timed pass is preceded by an untimed batch of
      its own instruction, and each figure is the best of `--encode-repeats` (5) rounds that take the
      instructions in turn, in an order rotated every round. Printed per instruction: the best and
      median rate, the spread (slowest pass / fastest), and what the first batch after a pass of
      another sequence length costs per image against the pass ("after a change"; x1.00 = nothing);
    - the encoder in float32 beside the arithmetic `--precision auto` picks (bf16 where supported);
(b) `focalsearch index` end to end (FocalSearch.index, what the command runs; the model is loaded
    before the clock starts, and the post-compaction grace sleep is off: FOCALSEARCH_VERSION_GRACE_SECONDS=0)
    with 1 instruction and with 4, counting how often each image is decoded. For the 4-instruction
    run, where its seconds went: each indexer step's wall time on the indexer's thread (waiting for
    decoded images, the encoder's calls (one per batch, under every instruction), batching, routing, commits, compaction, the
    catalog, the scan, and the loop itself), beside what the bound (decode once + 4 encodes at the
    ceilings) allows each; and the 4 encodes outside the indexer, each batch under each instruction
    in turn as the indexer calls them, against the sum of the steady per-instruction rates;
(c) the cost of a conditional encoding over a plain CLIP encoding, against the ratio of their
    token counts (image tokens + instruction tokens over image tokens), for each instruction.
The decode ceiling and every index run are the best of `--repeats` (3), so both sides of each ratio
are measured alike (the full-decode figure, shown for comparison only, is one pass).

`vit-b16` is a FocalLens-CLIP of CLIP ViT-B/16's shape (224 px, 16 px patches, 12x768 vision and
12x512 text layers) with random weights: the weights do not change the arithmetic. `vit-l14-336` is the
same for ViT-L/14 at 336 px (24x1024 vision, 12x768 text layers; ~1.7 GB of float32 weights): for GPUs.
`vit-tiny` (32 px, 2 layers of 64) is no real model's shape: it lets a smoke run take the vit-* path.

The `mllm` case measures the MLLM family (--mllm-model: demo-mllm by default, a checkpoint, or a random
LLaVA of a shape: `demo-shape` is demo-mllm's, `tiny` the smoke run's) on the same JPEGs, each decoded
once: its encode rate (img/s, 1 instruction, prefix reuse), and the time of 4 instructions against 1
with prefix reuse (the image prefix read once per batch, every instruction's tokens packed behind it in
the same row under a block mask) and without (every instruction reads the whole sequence), the best of `--repeats` rounds
that take the cases in an order rotated every round. Beside them, the bound that token counts set:
1 + 3 x (the language model's share of the 1-instruction time) x (a further instruction's own tokens:
the instruction, the ask for a one-word answer, the template's close / all tokens of the 1-instruction
sequence), the share being what is left of that time after the processor (image preprocessing,
tokens) and the vision tower + projector, each timed alone on the same batches. benchmarks/mllm_gpu.py
does the same on a GPU at a 7B LLaVA's shape.

With --contention (--contention-only skips all of the above, which is slow):
(d) indexing under CPU contention: `focalsearch index FOLDER -i "background" -i "what color is the
    object?" --model demo --json --commit-every 60` run as a subprocess on a fresh index (its
    images_per_second; FOCALSEARCH_VERSION_GRACE_SECONDS=0 so the grace sleep is not timed), quiet and
    beside N busy Python loops (`while True: pass` with a deadline; default N = the cores in the affinity),
    for each OpenMP wait policy: "default" (no OpenMP variables in the child's environment, so the
    project's OMP_WAIT_POLICY=PASSIVE applies: idle workers sleep), "spin" (libgomp's own default, with
    no wait policy set: idle workers spin for a while, the old behaviour) and
    "1-thread" (the default policy with --threads 1). OpenMP reads its policy once, when torch loads,
    hence one fresh process per run. Each cell is the best of `--repeats`, quiet and busy runs
    interleaved so that drift hits both alike. The folder is examples/colorshape/images (120 PNGs of
    64 px, the issue's 120 images x 2 instructions) unless --contention-folder says otherwise.

Goals (printed beside each measurement, and under "goals" in --json):
- index with 1 instruction >= 0.85 x the slower stage ceiling;
- index with 4 instructions decodes each image once and takes <= 1.1 x (decode once + 4 encodes);
- conditional/plain cost ratio within 10 % of the token-count ratio, for each instruction;
- mllm, "prefix reuse": 4 instructions take <= 1.3 x the time of 1 with reuse, or, where the token
  bound itself is above 1.3, within 10 % of that bound (the JSON's "rule" says which applied);
- with --contention: the default policy's busy throughput >= 0.25 x its quiet one (a fair share of 2
  cores against 2 busy processes is about 0.5 x; spinning workers gave ~0.04 x: 230 -> 10 img/s).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

# The indexer sleeps VERSION_GRACE_SECONDS (2 s) after compacting, so that readers of the old version finish;
# that wait is not indexing work, and on a GPU it would dwarf a run of a few hundred images. Read at import.
os.environ.setdefault("FOCALSEARCH_VERSION_GRACE_SECONDS", "0")

import numpy as np
from PIL import Image

INSTRUCTIONS = ("background", "how many objects are there?", "what color is the object?", "what shape is the object?")
PHOTO_SIZES = ((1280, 960), (1600, 1200), (2048, 1536), (2304, 1728), (1920, 1080), (1200, 1600))  # 1.2-4.0 MP
GOAL_ONE = 0.85
GOAL_FOUR = 1.1
GOAL_TOKENS = 0.10
GOAL_CONTENTION = 0.25  # default policy: busy / quiet img/s

ROOT = Path(__file__).resolve().parent.parent
CONTENTION_FOLDER = ROOT / "examples" / "colorshape" / "images"
CONTENTION_INSTRUCTIONS = ("background", "what color is the object?")
# The OpenMP variables the project's prepare_environment() looks at, and the thread count's: none of
# them reaches a child unless its policy sets it.
CONTENTION_CLEARED = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "FOCALSEARCH_THREADS")
# policy -> (extra environment, extra arguments)
CONTENTION_POLICIES: dict[str, tuple[dict[str, str], list[str]]] = {
    "default": ({}, []),
    # libgomp's own default, the old behaviour: no variable libgomp reads is set. KMP_BLOCKTIME is read
    # only by Intel's OpenMP runtime; here it just tells focalsearch.threads to leave the policy alone.
    # (GOMP_SPINCOUNT=300000, libgomp's documented default count, measured differently from unset.)
    "spin": ({"KMP_BLOCKTIME": "200"}, []),
    "1-thread": ({}, ["--threads", "1"]),
}


def make_photos(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """Photo-like JPEGs (smooth shading, edges, sensor noise) of 1-4 MP, quality 90."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in range(count):
        width, height = PHOTO_SIZES[number % len(PHOTO_SIZES)]
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.int16)
        for _ in range(6):  # a few hard-edged objects
            x0, y0 = int(rng.integers(0, width - 100)), int(rng.integers(0, height - 100))
            x1, y1 = x0 + int(rng.integers(50, width // 3)), y0 + int(rng.integers(50, height // 3))
            pixels[y0:y1, x0:x1] = rng.integers(0, 256, 3)
        pixels += rng.integers(-12, 13, pixels.shape, dtype=np.int16)
        path = folder / f"photo-{number:05d}.jpg"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


# Random-weight FocalLens-CLIPs of real CLIP shapes: the weights do not change the arithmetic.
VIT_SHAPES = {
    # name: (image size, patch, vision width, vision layers, vision heads, text width, text layers, text heads, projection)
    "vit-b16": (224, 16, 768, 12, 12, 512, 12, 8, 512),
    "vit-l14-336": (336, 14, 1024, 24, 16, 768, 12, 12, 768),
    "vit-tiny": (32, 16, 64, 2, 2, 64, 2, 2, 64),  # no real CLIP: the smoke run's stand-in (tests/test_benchmarks_smoke.py)
}


def vit_checkpoint(name: str, out: Path) -> Path:
    """A randomly initialised FocalLens-CLIP with the shape of the CLIP named in VIT_SHAPES."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel  # the PIL processor by name: no fallback notice

    from focalsearch.models.init_checkpoint import focallens_from_clip
    from focalsearch.models.saving import write_checkpoint
    from focalsearch.models.tiny import build_clip_tokenizer

    size, patch, width, layers, heads, text_width, text_layers, text_heads, projection = VIT_SHAPES[name]
    words = " ".join(INSTRUCTIONS) + " a photo of red green blue dog cat car tree sky one two three four"
    tokenizer = build_clip_tokenizer([words] * 10, vocab_size=600)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=4 * text_width,
                         num_hidden_layers=text_layers, num_attention_heads=text_heads, max_position_embeddings=77,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                           num_attention_heads=heads, image_size=size, patch_size=patch),
        projection_dim=projection,
    )
    torch.manual_seed(0)
    model = focallens_from_clip(CLIPModel(config))
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    write_checkpoint(out, model, tokenizer, processor)
    return out


# Random LLaVAs (CLIP vision tower, Llama language model) for --mllm-model: the weights do not change the arithmetic.
MLLM_SHAPES = {
    # demo-mllm's shape: demo-clip's vision tower (64 px, 8 px patches: 64 image tokens) and a 4x256 Llama with 4 heads
    "demo-shape": dict(width=256, layers=4, heads=4),
    "tiny": dict(),  # no real model (32 px vision, a 2x64 Llama): the smoke run's stand-in
}
GOAL_REUSE = 1.3  # 4 instructions / 1 with prefix reuse; or within GOAL_REUSE_BOUND of the token bound where that is above it
GOAL_REUSE_BOUND = 0.10


def mllm_checkpoint(shape: str, out: Path) -> Path:
    """A randomly initialised LLaVA of a shape named in MLLM_SHAPES."""
    from focalsearch.models.loading import BUNDLED_DIR
    from focalsearch.models.tiny_mllm import save_tiny_mllm

    words = " ".join(INSTRUCTIONS) + " answer in one word. describe the image in one word. summarize the above in one word."
    dims = dict(MLLM_SHAPES[shape])
    if shape == "demo-shape":
        dims["vision_from"] = BUNDLED_DIR / "demo-clip"
    return save_tiny_mllm(out, [words] * 10, "llava", **dims)


def mllm_prompt_tokens(encoder, image, instructions) -> tuple[int, dict[str, int]]:
    """(the tokens every instruction shares: the chat template's opening and the image's tokens; per instruction,
    its own tokens: the instruction, the ask for a one-word answer and the template's close), from the actual prompts."""
    from focalsearch.instructions import normalize_instruction

    prefix = int(encoder.prompts.prefix_inputs([image])["attention_mask"].sum())
    own = {i: int(encoder.prompts.suffix_tokens([normalize_instruction(i)])["attention_mask"].sum()) for i in instructions}
    return prefix, own


def mllm_reuse_figures(encoder, images, instructions, batch_size: int, repeats: int = 3) -> dict:
    """Seconds to encode ``images`` under the first instruction and under all of them, with and without
    prefix reuse, and the parts of the 1-instruction pass that are not the language model (the processor:
    image preprocessing and tokens; the vision tower + projector), each the best of ``repeats`` rounds
    that take the cases in an order rotated every round, after one untimed batch of each."""
    import torch

    batches = [encoder.collate([encoder.prepare(image) for image in images[lo : lo + batch_size]])
               for lo in range(0, len(images), batch_size)]
    first = list(instructions[:1])

    def synced(function):
        started = time.perf_counter()
        function()
        if encoder.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    def encode(reuse: bool, asked: list[str], chunks) -> float:
        encoder.reuse_prefix = reuse
        return synced(lambda: [encoder.encode_batch(chunk, asked) for chunk in chunks])

    @torch.inference_mode()
    def vision(chunks) -> float:
        prefixes = [encoder._on_device(encoder.prompts.prefix_inputs(chunk)) for chunk in chunks]
        pixels = [{k: v for k, v in prefix.items() if k not in ("input_ids", "attention_mask")} for prefix in prefixes]
        with encoder._autocast(encoder.autocast_dtype):
            return synced(lambda: [encoder.language_model.get_image_features(**p) for p in pixels])

    cases = {
        "reuse, 1": lambda chunks: encode(True, first, chunks),
        f"reuse, {len(instructions)}": lambda chunks: encode(True, list(instructions), chunks),
        "whole, 1": lambda chunks: encode(False, first, chunks),
        f"whole, {len(instructions)}": lambda chunks: encode(False, list(instructions), chunks),
        "processor": lambda chunks: synced(lambda: [encoder.prompts.prefix_inputs(chunk) for chunk in chunks]),
        "vision tower + projector": vision,
    }
    reuse = encoder.reuse_prefix
    try:
        for case in cases.values():
            case(batches[:1])
        seconds: dict[str, list[float]] = {name: [] for name in cases}
        names = list(cases)
        for round_number in range(repeats):
            shift = round_number % len(names)
            for name in [*names[shift:], *names[:shift]]:
                seconds[name].append(cases[name](batches))
    finally:
        encoder.reuse_prefix = reuse
    return {name: min(values) for name, values in seconds.items()}


def reuse_goal(ratio: float, bound: float) -> dict:
    """The prefix-reuse goal: 4 vs 1 <= GOAL_REUSE; failing that, where the token bound is above it, within GOAL_REUSE_BOUND of the bound."""
    if bound <= GOAL_REUSE or ratio <= GOAL_REUSE:
        return {"measured": ratio, "target": GOAL_REUSE, "holds": ratio <= GOAL_REUSE, "rule": f"<= {GOAL_REUSE}"}
    target = bound * (1 + GOAL_REUSE_BOUND)
    return {"measured": ratio, "target": target, "holds": ratio <= target,
            "rule": f"within {GOAL_REUSE_BOUND * 100:.0f} % of the token bound {bound:.3f} (the bound is above {GOAL_REUSE})"}


def measure_mllm(location: str, paths: list[Path], args, label: str = "mllm") -> dict:
    """The MLLM family's encode rate and what 4 instructions cost against 1, with and without prefix reuse,
    beside the bound that token counts set."""
    import torch

    from focalsearch.images import load_image
    from focalsearch.models import create_encoder

    encoder = create_encoder(location, encoder="mllm", device=args.device, batch_size=args.batch_size, precision=args.precision)
    images = [load_image(p, min_side=encoder.min_decode_side).image for p in paths]
    where = f"JPEGs decoded once (draft mode, {encoder.min_decode_side} px side), {torch.get_num_threads()} torch threads"
    return report_mllm(label, encoder, images, args.batch_size, args.repeats, where)


def report_mllm(label: str, encoder, images, batch_size: int, repeats: int, images_are: str) -> dict:
    """Measure (mllm_reuse_figures), print and return the figures and the prefix-reuse goal."""
    instructions = list(INSTRUCTIONS)
    count, many = len(images), len(instructions)
    arithmetic = _arithmetic(encoder)
    print(f"\n== {label}: {encoder.info.model} on {encoder.device} ({arithmetic}), {count} images ({images_are}), "
          f"batches of {batch_size}, best of {repeats} rounds in rotated order", flush=True)
    seconds = mllm_reuse_figures(encoder, images, instructions, batch_size, repeats)
    prefix, own = mllm_prompt_tokens(encoder, images[0], instructions)
    one, all_of_them = seconds["reuse, 1"], seconds[f"reuse, {many}"]
    whole_one, whole_all = seconds["whole, 1"], seconds[f"whole, {many}"]
    outside = seconds["processor"] + seconds["vision tower + projector"]
    share = max(0.0, 1 - outside / one)
    extra = statistics.mean(own[i] for i in instructions[1:])
    total = prefix + own[instructions[0]]
    bound = 1 + (many - 1) * share * extra / total
    ratio, whole_ratio = all_of_them / one, whole_all / whole_one
    print(f"tokens: {prefix} shared (chat opening + image tokens), own per instruction: "
          + ", ".join(f"{i!r} {n}" for i, n in own.items()), flush=True)
    print(f"encode, 1 instruction ({instructions[0]!r}): {count / one:8.1f} img/s with prefix reuse | "
          f"{count / whole_one:8.1f} img/s whole sequence", flush=True)
    print(f"encode, {many} instructions: {all_of_them:.3f} s = {ratio:.2f} x the 1-instruction time with reuse "
          f"({count / all_of_them:.1f} img/s) | {whole_all:.3f} s = {whole_ratio:.2f} x without", flush=True)
    print(f"the 1-instruction time {one:.3f} s: processor {seconds['processor']:.3f} s, vision tower + projector "
          f"{seconds['vision tower + projector']:.3f} s, language model (the rest) {one - outside:.3f} s = {share:.2f} of it", flush=True)
    goal = reuse_goal(ratio, bound)
    print(f"bound from token counts: 1 + {many - 1} x {share:.2f} (LM share) x {extra:.1f} (own tokens of each further "
          f"instruction) / {total} (all tokens) = {bound:.3f}; with reuse {ratio:.3f}   goal {goal['rule']}: "
          f"{'holds' if goal['holds'] else 'MISSES'}", flush=True)
    return {
        "model": encoder.info.model, "device": str(encoder.device), "arithmetic": arithmetic, "images": count,
        "batch_size": batch_size, "repeats": repeats, "instructions": instructions, "seconds": seconds,
        "encode_img_s": count / one, "encode_whole_img_s": count / whole_one,
        f"ratio_{many}_vs_1_reuse": ratio, f"ratio_{many}_vs_1_whole": whole_ratio,
        "prefix_tokens": prefix, "own_tokens": own, "lm_share": share, "bound": bound,
        "goals": {f"{label}: prefix reuse, {many} instructions / 1": goal},
    }


def decode_ceiling(encoder, paths: list[Path], workers: int, draft: bool, repeats: int = 1) -> float:
    """Images/s of read + decode + preprocess alone, in the indexer's worker threads (best of ``repeats``)."""
    from focalsearch.images import LoadedImage, load_image

    min_side = encoder.min_decode_side if draft else None

    def one(path: Path):
        loaded = load_image(path, min_side=min_side)
        assert isinstance(loaded, LoadedImage), loaded
        return encoder.preprocess([loaded.image])[0]

    best = float("inf")
    with ThreadPoolExecutor(workers) as pool:
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in pool.map(one, paths):
                pass
            best = min(best, time.perf_counter() - started)
    return len(paths) / best


def instruction_tokens(encoder, instruction: str) -> int:
    """The tokens an instruction adds to a conditional encoding's sequence (0 for the plain pass)."""
    if not instruction or encoder.info.encoder != "focallens":  # clip, clip+text: the image sequence alone
        return 0
    return int(encoder._instruction_features(instruction, encoder.autocast_dtype).shape[1])


def image_tokens(encoder) -> int:
    """The image tokens (patches + class token) of the encoder's vision tower."""
    vision = encoder.model.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 + 1


def encode_rates(encoder, pixels, instructions, batch_size: int, repeats: int = 5, min_seconds: float = 1.0) -> dict[str, dict]:
    """Per instruction: images/s of the encoder's forward passes alone on pre-decoded tensors, and how steady.

    Each instruction's tokens make the sequence (image tokens + instruction tokens) a different
    length, and the CPU kernels are planned per shape. So:
    - warm-up per sequence length: one untimed batch per instruction (its tokens), then one untimed
      full pass per distinct length (kernels, thread pools, allocator at that shape);
    - best of ``repeats``: rounds that time every instruction in turn, keeping each one's best and
      median, the order rotated every round so that no instruction always follows the same one, and
      drifting machine speed hits all of them alike;
    - before each timed pass, one untimed batch of the same instruction, so that a change of
      sequence length from the previous pass is not charged to whichever instruction comes first
      after it. That batch's time per image over the pass's is reported as ``after_switch`` when
      the previous pass had another length and ``after_same`` when not (1.0 = no cost).
    A timed pass goes over the pixels as many times as it takes to last ``min_seconds``: a burst of
    noise on a VM can take a tenth of a second, too much for a pass of a fifth of one.
    """
    batches = [pixels[lo : lo + batch_size] for lo in range(0, len(pixels), batch_size)]
    length = {i: image_tokens(encoder) + instruction_tokens(encoder, i) for i in instructions}

    def timed(instruction: str, chunks, loops: int = 1) -> float:
        started = time.perf_counter()
        for _ in range(loops):
            for chunk in chunks:
                encoder.encode_pixels(chunk, instruction)
        return time.perf_counter() - started

    for instruction in instructions:
        timed(instruction, batches[:1])
    first_of_length = {length[i]: i for i in reversed(instructions)}
    shortest = min(timed(i, batches) for i in first_of_length.values())
    loops = max(1, math.ceil(min_seconds / shortest))

    seconds: dict[str, list[float]] = {i: [] for i in instructions}
    probes: dict[str, dict[str, list[float]]] = {i: {"after_switch": [], "after_same": []} for i in instructions}
    previous = None
    for round_number in range(repeats):
        shift = round_number % len(instructions)
        for instruction in [*instructions[shift:], *instructions[:shift]]:
            probe = timed(instruction, batches[:1]) / len(batches[0])
            per_image = timed(instruction, batches, loops) / (loops * len(pixels))
            seconds[instruction].append(per_image)
            if previous is not None:
                probes[instruction]["after_switch" if length[previous] != length[instruction] else "after_same"].append(probe / per_image)
            previous = instruction
    return {
        i: {"sequence_tokens": length[i], "instruction_tokens": length[i] - image_tokens(encoder),
            "img_s": 1 / min(s), "img_s_median": 1 / statistics.median(s), "spread": max(s) / min(s), "passes": len(s),
            **{k: (statistics.median(v) if v else None) for k, v in probes[i].items()}}
        for i, s in seconds.items()
    }


def interleaved_encode_seconds(encoder, pixels, instructions, batch_size: int, repeats: int = 3) -> float:
    """Seconds to encode ``pixels`` under every instruction the way the indexer does (one call per batch
    under all of them, so the sequence length changes from pass to pass); best of ``repeats``."""
    batches = [pixels[lo : lo + batch_size] for lo in range(0, len(pixels), batch_size)]
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for chunk in batches:
            encoder.encode_batch(chunk, list(instructions))
        best = min(best, time.perf_counter() - started)
    return best


class StageClock:
    """Wall-clock seconds of the indexer's steps, by wrapping its methods for the duration of a ``with``
    block (as index_run counts decodes). Only calls on the main thread within the method named by
    ``scope`` count (the others' time is outside the run's ``seconds``, unless ``always``), each as its
    own time less that of the timed steps it calls, so the stages never overlap and ``seconds`` less
    their sum is the indexer's own loop."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._patched: list[tuple[object, str, object]] = []
        self._children: list[float] = []  # per open timed call: the time of the timed calls inside it
        self._inside = 0

    def _add(self, stage: str, elapsed: float) -> None:
        exclusive = elapsed - self._children.pop()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + exclusive
        if self._children:
            self._children[-1] += elapsed

    def _counts(self, always: bool) -> bool:
        return (always or self._inside > 0) and threading.current_thread() is threading.main_thread()

    def _patch(self, owner, name: str, wrapper) -> None:
        self._patched.append((owner, name, getattr(owner, name)))
        setattr(owner, name, wrapper)

    def scope(self, owner, name: str) -> None:
        """Count steps only while ``owner.name`` runs."""
        original = getattr(owner, name)

        def scoped(*args, **kwargs):
            self._inside += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._inside -= 1

        self._patch(owner, name, scoped)

    def time_method(self, owner, name: str, stage, *, always: bool = False) -> None:
        """Time ``owner.name`` under ``stage`` (a name, or a function of the call's arguments giving one)."""
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            if not self._counts(always):
                return original(*args, **kwargs)
            self._children.append(0.0)
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self._add(stage(*args, **kwargs) if callable(stage) else stage, time.perf_counter() - started)

        self._patch(owner, name, timed)

    def time_generator(self, owner, name: str, stage: str) -> None:
        """Time the waits for each item of the generator method ``owner.name``."""
        original = getattr(owner, name)
        clock = self

        def timed(*args, **kwargs):
            items = original(*args, **kwargs)
            while True:
                counts = clock._counts(False)
                if counts:
                    clock._children.append(0.0)
                started = time.perf_counter()
                try:
                    item = next(items)
                except StopIteration:
                    return
                finally:
                    if counts:
                        clock._add(stage, time.perf_counter() - started)
                yield item

        self._patch(owner, name, timed)

    def __enter__(self) -> "StageClock":
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._patched):
            if isinstance(owner, type) or isinstance(owner, types.ModuleType):
                setattr(owner, name, original)
            else:  # an instance: drop the wrapper so that its class's method shows through again
                delattr(owner, name)
        self._patched.clear()


# The indexer's steps that StageClock times in an index run, by method name: (owner, method, stage).
INDEX_STAGES = (
    ("Indexer", "_encode", "batching (stack, rows)"),  # less the encode_batch calls inside it (ENCODE_STAGE)
    ("Indexer", "_route", "hash check, routing"),
    ("Indexer", "_commit", "commits (write)"),
    ("Indexer", "_flush_touched", "touched records"),
    ("Indexer", "_remove_vanished", "removing vanished"),
    ("Indexer", "_compact", "compaction + cleanup"),
    ("Store", "mark_updated", "catalog"),
    ("Store", "tidy_catalog", "catalog"),
    ("Store", "count", "catalog"),
    ("Store", "untidy", "catalog"),
)
ENCODE_STAGE = "encode (every instruction)"  # the encoder's calls: one per batch, under all of the run's instructions
# The steps of a run that do not grow with its images (commits do past commit_seconds: every 5 s).
BOOKKEEPING = ("scan", "commits (write)", "compaction + cleanup", "catalog")
AFTER_RUN = "FAISS build (after the run, not in its seconds)"


def index_run(model: str, folder: Path, instructions, batch_size: int, workers: int, encoder) -> dict:
    """FocalSearch.index on a fresh index with the encoder already loaded; counts decodes per file and
    times the indexer's steps (StageClock) into ``stages_s``, which add up to ``seconds``."""
    import focalsearch.indexer as indexer_module
    import focalsearch.search as search_module
    from focalsearch.api import FocalSearch
    from focalsearch.indexer import Indexer
    from focalsearch.store import Store

    decodes: dict[str, int] = {}
    original = indexer_module.load_image

    def counting(stat, **kwargs):
        decodes[str(stat.path)] = decodes.get(str(stat.path), 0) + 1
        return original(stat, **kwargs)

    owners = {"Indexer": Indexer, "Store": Store}
    with tempfile.TemporaryDirectory() as index_dir, StageClock() as clock:
        search = FocalSearch(index_dir, model, batch_size=batch_size, workers=workers)
        search._encoders["both"] = encoder  # measure indexing, not model loading
        clock.scope(Indexer, "run")
        clock.time_generator(Indexer, "_decode", "waiting for decoded images")
        clock.time_method(encoder, "encode_batch", ENCODE_STAGE)
        for owner, name, stage in INDEX_STAGES:
            if hasattr(owners[owner], name):  # a step the indexer no longer has is left out, not an error
                clock.time_method(owners[owner], name, stage)
        clock.time_method(search_module, "load_condition_index", AFTER_RUN, always=True)
        indexer_module.load_image = counting
        try:
            report = search.index([folder], list(instructions))
        finally:
            indexer_module.load_image = original
    stages = dict(clock.seconds)
    after = stages.pop(AFTER_RUN, 0.0)
    stages["scan"] = report.timings["scan"]
    stages["other (the indexer's loop)"] = report.seconds - sum(stages.values())
    return {"images": report.encoded, "seconds": report.seconds, "images_per_s": report.encoded / report.seconds,
            "max_decodes_per_image": max(decodes.values()), "timings": report.timings, "stages_s": stages,
            "faiss_build_after_s": after}


def _arithmetic(encoder) -> str:
    weights = str(encoder.dtype).removeprefix("torch.")
    if encoder.autocast_dtype is None:
        return weights
    return f"{weights} weights, {str(encoder.autocast_dtype).removeprefix('torch.')} autocast"


def measure_model(name: str, location: str, paths: list[Path], folder: Path, args) -> dict:
    import torch

    from focalsearch.models import create_encoder

    encoder = create_encoder(location, device=args.device, batch_size=args.batch_size, precision=args.precision)
    workers = args.workers or min(8, os.cpu_count() or 1)
    count = len(paths)
    arithmetic = _arithmetic(encoder)
    print(f"\n== {name}: {encoder.info.model} on {encoder.device} ({arithmetic}), {count} JPEGs, {workers} decode workers, "
          f"{torch.get_num_threads()} torch threads", flush=True)
    decode_plain = decode_ceiling(encoder, paths, workers, draft=False)
    decode = decode_ceiling(encoder, paths, workers, draft=True, repeats=args.repeats)
    print(f"decode+preprocess: {decode_plain:8.1f} img/s full decode | {decode:8.1f} img/s draft mode "
          f"(x{decode / decode_plain:.2f})", flush=True)

    from focalsearch.images import load_image

    pixels = torch.stack([encoder.preprocess([load_image(p, min_side=encoder.min_decode_side).image])[0] for p in paths])
    instructions = list(INSTRUCTIONS[: args.conditions])
    per = encode_rates(encoder, pixels, ["", *instructions], args.batch_size, args.encode_repeats, args.encode_seconds)
    plain, n_image = per[""]["img_s"], image_tokens(encoder)
    print(f"encode only, best of {args.encode_repeats} per instruction (warmed per sequence length; 'after a change' is the first "
          f"batch after a pass of another length, per image, over the pass's):", flush=True)
    print(f"  {'instruction':<30} {'tokens':>6} {'img/s':>8} {'median':>8} {'spread':>7} {'after a change':>14} {'after same':>10} "
          f"{'cost/plain':>10} {'token ratio':>11} {'off':>6}")
    off: dict[str, float] = {}
    for instruction, figures in per.items():
        cost, tokens = plain / figures["img_s"], figures["sequence_tokens"] / n_image
        off[instruction] = abs(cost / tokens - 1)
        switch, same = (f"x{v:.2f}" if v is not None else "-" for v in (figures["after_switch"], figures["after_same"]))
        print(f"  {instruction or '(plain CLIP pass)':<30} {figures['sequence_tokens']:>6} {figures['img_s']:8.1f} "
              f"{figures['img_s_median']:8.1f} {figures['spread']:7.2f} {switch:>14} {same:>10} {cost:10.3f} {tokens:11.3f} "
              f"{off[instruction] * 100:5.1f}%", flush=True)
    instruction = INSTRUCTIONS[1]
    conditional = per[instruction]["img_s"]
    conditional_fp32 = None
    if arithmetic != "float32":
        exact = create_encoder(location, device=args.device, batch_size=args.batch_size, precision="float32")
        fp32 = encode_rates(exact, pixels, [instruction], args.batch_size, args.encode_repeats, args.encode_seconds)
        conditional_fp32 = fp32[instruction]["img_s"]
        print(f"  same, in float32: {conditional_fp32:8.1f} img/s conditional ({instruction!r}): {arithmetic} is "
              f"x{conditional / conditional_fp32:.2f}", flush=True)
        del exact
    interleaved = interleaved_encode_seconds(encoder, pixels, instructions, args.batch_size, args.repeats)
    cost_ratio, tokens = plain / conditional, per[instruction]["sequence_tokens"] / n_image
    worst = max((i for i in instructions), key=lambda i: off[i])

    runs = [(index_run(location, folder, INSTRUCTIONS[:1], args.batch_size, workers, encoder),
             index_run(location, folder, instructions, args.batch_size, workers, encoder))
            for _ in range(args.repeats)]
    one = min((r[0] for r in runs), key=lambda r: r["seconds"])
    four = min((r[1] for r in runs), key=lambda r: r["seconds"])
    ceiling_one = min(decode, per[INSTRUCTIONS[0]]["img_s"])
    steady = {i: count / per[i]["img_s"] for i in instructions}
    bound_four = count / decode + sum(steady.values())
    print(f"index, 1 instruction:  {one['images_per_s']:8.1f} img/s = {one['images_per_s'] / ceiling_one:.2f} x the slower "
          f"ceiling ({ceiling_one:.1f} img/s)   goal >= {GOAL_ONE}", flush=True)
    print(f"index, {args.conditions} instructions: {four['seconds']:8.2f} s = {four['seconds'] / bound_four:.2f} x (decode once "
          f"+ {args.conditions} encodes = {bound_four:.2f} s); decodes per image: {four['max_decodes_per_image']}   "
          f"goal <= {GOAL_FOUR}, 1 decode", flush=True)
    breakdown = show_breakdown(four, count / decode, steady, interleaved)
    print(f"conditional / plain cost ({instruction!r}): {cost_ratio:.3f} vs token ratio {tokens:.3f}: off by "
          f"{off[instruction] * 100:.1f} %; the worst instruction ({worst!r}) is off by {off[worst] * 100:.1f} %   "
          f"goal <= {GOAL_TOKENS * 100:.0f} % for each", flush=True)
    goals = {
        f"{name}: index 1 instruction / slower ceiling": {
            "measured": one["images_per_s"] / ceiling_one, "target": GOAL_ONE, "holds": one["images_per_s"] >= GOAL_ONE * ceiling_one},
        f"{name}: index {args.conditions} instructions / (decode once + {args.conditions} encodes)": {
            "measured": four["seconds"] / bound_four, "target": GOAL_FOUR,
            "holds": four["seconds"] <= GOAL_FOUR * bound_four and four["max_decodes_per_image"] == 1},
        f"{name}: |conditional cost / token ratio - 1|, worst of {args.conditions} instructions": {
            "measured": off[worst], "target": GOAL_TOKENS, "holds": off[worst] <= GOAL_TOKENS},
    }
    return {
        "model": encoder.info.model, "device": str(encoder.device), "arithmetic": arithmetic, "images": count, "workers": workers,
        "torch_threads": torch.get_num_threads(), "batch_size": args.batch_size, "repeats": args.repeats,
        "encode_repeats": args.encode_repeats,
        "decode_full_img_s": decode_plain, "decode_draft_img_s": decode,
        "encode_conditional_img_s": conditional, "encode_plain_img_s": plain, "encode_conditional_float32_img_s": conditional_fp32,
        "encode_per_instruction_img_s": {i: per[i]["img_s"] for i in instructions},
        "encode_per_instruction": {i or "(plain)": {**figures, "cost_over_plain": plain / figures["img_s"], "token_ratio_off": off[i]}
                                   for i, figures in per.items()},
        "encode_interleaved_s": interleaved,
        "index_1": one, f"index_{args.conditions}": four, "bound_4_s": bound_four, f"breakdown_{args.conditions}": breakdown,
        "cost_ratio": cost_ratio, "token_ratio": tokens, "image_tokens": n_image,
        "instruction_tokens": per[instruction]["instruction_tokens"], "goals": goals,
    }


def show_breakdown(run: dict, decode_bound: float, steady: dict[str, float], interleaved: float) -> dict:
    """Print where an index run's seconds went, step by step, beside what the bound allows each step."""
    stages = run["stages_s"]
    rows = [("waiting for decoded images", stages.get("waiting for decoded images", 0.0), decode_bound, "decode once at the ceiling")]
    rows += [(ENCODE_STAGE, stages.get(ENCODE_STAGE, 0.0), sum(steady.values()), "steady encode rates, summed")]
    rows += [(stage, seconds, 0.0, "") for stage, seconds in sorted(stages.items(), key=lambda kv: -kv[1])
             if stage not in ("waiting for decoded images", ENCODE_STAGE)]
    print(f"  where the {run['seconds']:.2f} s went (the best run's steps, wall clock on the indexer's thread):", flush=True)
    print(f"    {'step':<36} {'seconds':>8} {'bound':>8} {'over':>8}")
    for stage, seconds, bound, note in rows:
        print(f"    {stage:<36} {seconds:8.3f} {bound:8.3f} {seconds - bound:+8.3f}  {note}")
    bound = decode_bound + sum(steady.values())
    print(f"    {'total':<36} {run['seconds']:8.3f} {bound:8.3f} {run['seconds'] - bound:+8.3f}", flush=True)
    bookkeeping = sum(stages.get(stage, 0.0) for stage in BOOKKEEPING)
    print(f"  the run's bookkeeping ({', '.join(BOOKKEEPING)}; about the same for any run shorter than the 5 s "
          f"between commits): {bookkeeping:.3f} s = {bookkeeping / bound:.2f} x the bound", flush=True)
    print(f"  the {len(steady)} encodes outside the indexer, one call per batch under every instruction as the indexer makes them: "
          f"{interleaved:.3f} s, against {sum(steady.values()):.3f} s for the steady rates "
          f"(x{interleaved / sum(steady.values()):.2f}); FAISS build after the run (not counted): {run['faiss_build_after_s']:.3f} s",
          flush=True)
    return {"stages_s": stages, "bound_s": {"decode once": decode_bound, ENCODE_STAGE: sum(steady.values())},
            "encode_steady_per_instruction_s": steady,
            "encode_interleaved_s": interleaved, "encode_steady_s": sum(steady.values()), "bookkeeping_s": bookkeeping,
            "faiss_build_after_s": run["faiss_build_after_s"]}


def measure_all(args) -> dict:
    """Sections (a)-(c) for every model in ``--models``, on a generated folder of JPEGs."""
    results = {}
    scratch = Path(tempfile.mkdtemp(prefix="focalsearch-throughput-"))
    try:
        started = time.perf_counter()
        folder = scratch / "photos"
        paths = make_photos(folder, args.images)
        megapixels = statistics.mean(Image.open(p).size[0] * Image.open(p).size[1] for p in paths) / 1e6
        size_mb = sum(p.stat().st_size for p in paths) / len(paths) / 2**20
        print(f"made {len(paths)} JPEGs ({megapixels:.1f} MP, {size_mb:.2f} MB each on average) in {time.perf_counter() - started:.0f} s")
        for name in args.models.split(","):
            location = name
            model_paths, model_folder = paths, folder
            if name == "mllm":
                location = args.mllm_model
                if location in MLLM_SHAPES:
                    location = str(mllm_checkpoint(location, scratch / f"mllm-{location}"))
                results[name] = measure_mllm(location, paths, args)
                continue
            if name in VIT_SHAPES:
                location = str(vit_checkpoint(name, scratch / name))
                model_folder = scratch / "photos-vit"
                model_folder.mkdir()
                model_paths = [shutil.copy(p, model_folder / p.name) and model_folder / p.name for p in paths[: args.vit_images]]
            results[name] = measure_model(name, location, model_paths, model_folder, args)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return results


def focalsearch_command() -> list[str]:
    """The `focalsearch` console script of this interpreter's environment, or its entry point run by this interpreter."""
    script = shutil.which("focalsearch", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-c", "from focalsearch.cli import main; main()"]


@contextmanager
def busy_processes(count: int, lifetime: float) -> Iterator[list[subprocess.Popen]]:
    """``count`` Python processes spinning on the CPU, killed on exit; each also stops by itself after
    ``lifetime`` seconds, so none outlives this benchmark if it is killed before its finally block runs."""
    loop = f"import time\nend = time.monotonic() + {lifetime:.0f}\nwhile time.monotonic() < end: pass"
    processes: list[subprocess.Popen] = []
    try:
        for _ in range(count):
            processes.append(subprocess.Popen([sys.executable, "-c", loop], stdin=subprocess.DEVNULL,
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        yield processes
    finally:
        for process in processes:
            process.kill()
        for process in processes:
            process.wait()


def contention_env(policy: str) -> dict[str, str]:
    """The child's environment: ours without any OpenMP wait policy or thread count, plus the policy's."""
    env = {k: v for k, v in os.environ.items() if k not in CONTENTION_CLEARED}
    env["FOCALSEARCH_VERSION_GRACE_SECONDS"] = "0"  # the post-compaction grace sleep is not indexing
    env.update(CONTENTION_POLICIES[policy][0])
    return env


def index_subprocess(folder: Path, policy: str, timeout: float) -> dict:
    """The --json report of one `focalsearch index` run, in a fresh process on a fresh index."""
    command = [*focalsearch_command(), "index", str(folder)]
    for instruction in CONTENTION_INSTRUCTIONS:
        command += ["-i", instruction]
    with tempfile.TemporaryDirectory(prefix="focalsearch-contention-") as index_dir:
        command += ["--model", "demo", "--index", str(Path(index_dir) / "index"), "--json", "--commit-every", "60",
                    *CONTENTION_POLICIES[policy][1]]
        done = subprocess.run(command, env=contention_env(policy), capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{policy}: focalsearch index exited with {done.returncode}:\n{done.stderr[-2000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if not report["encoded"] or report["skipped"]:
        raise RuntimeError(f"{policy}: encoded {report['encoded']} images, skipped {len(report['skipped'])} in {folder}")
    return report


def measure_contention(args) -> dict:
    """Per policy, the best-of-``repeats`` indexing rate quiet and beside ``busy`` busy processes, interleaved."""
    from focalsearch.threads import available_cores

    folder = args.contention_folder.resolve()
    cores = available_cores()
    busy = cores if args.contention_busy is None else args.contention_busy
    policies = args.contention_policies.split(",")
    for policy in policies:
        if policy not in CONTENTION_POLICIES:
            raise SystemExit(f"unknown --contention-policies entry {policy!r}; choose from {', '.join(CONTENTION_POLICIES)}")
    print(f"\n== contention: {folder} x {len(CONTENTION_INSTRUCTIONS)} instructions, model demo, "
          f"{cores} cores in the affinity, {busy} busy processes, best of {args.repeats}", flush=True)
    runs: dict[str, dict[str, list[float]]] = {p: {"quiet": [], "busy": []} for p in policies}
    images: set[int] = set()
    for repeat in range(args.repeats):
        for policy in policies:
            order = ("quiet", "busy") if repeat % 2 == 0 else ("busy", "quiet")  # neither always goes first
            for state in order:
                if state == "busy":
                    with busy_processes(busy, lifetime=args.contention_timeout + 60):
                        report = index_subprocess(folder, policy, args.contention_timeout)
                else:
                    report = index_subprocess(folder, policy, args.contention_timeout)
                runs[policy][state].append(report["images_per_second"])
                images.add(report["encoded"])
                print(f"  run {repeat + 1}/{args.repeats} {policy:>8} {state:>5}: {report['images_per_second']:8.1f} img/s "
                      f"({report['encoded']} images in {report['seconds']:.2f} s)", flush=True)

    print(f"\n{'policy':>8} | {'quiet img/s':>11} | {'busy img/s':>10} | busy/quiet")
    table = {}
    for policy in policies:
        quiet, loaded = max(runs[policy]["quiet"]), max(runs[policy]["busy"])
        ratio = loaded / quiet if quiet > 0 else 0.0
        table[policy] = {"env": CONTENTION_POLICIES[policy][0], "args": CONTENTION_POLICIES[policy][1],
                         "quiet_img_s": quiet, "busy_img_s": loaded, "busy_over_quiet": ratio,
                         "quiet_runs": runs[policy]["quiet"], "busy_runs": runs[policy]["busy"]}
        print(f"{policy:>8} | {quiet:11.1f} | {loaded:10.1f} | {ratio:10.2f}")
    goals = {}
    if "default" in table:
        ratio = table["default"]["busy_over_quiet"]
        holds = ratio >= GOAL_CONTENTION
        print(f"goal: default busy >= {GOAL_CONTENTION} x quiet beside {busy} busy processes on {cores} cores "
              f"(a fair share is about {cores / (cores + busy):.2f} x): {ratio:.2f} x, {'holds' if holds else 'MISSES'}", flush=True)
        goals[f"contention: default policy busy / quiet img/s ({busy} busy processes, {cores} cores)"] = {
            "measured": ratio, "target": GOAL_CONTENTION, "holds": holds}
    return {"folder": str(folder), "images": sorted(images), "instructions": list(CONTENTION_INSTRUCTIONS), "model": "demo",
            "cores": cores, "busy_processes": busy, "repeats": args.repeats, "policies": table, "goals": goals}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=240, help="JPEGs in the generated folder")
    parser.add_argument("--models", default="demo,vit-b16",
                        help="comma-separated: demo, vit-b16, vit-l14-336, mllm (see --mllm-model), or checkpoint folders/hub ids")
    parser.add_argument("--mllm-model", default="demo-mllm",
                        help=f"the checkpoint of the mllm case, or a random LLaVA of a shape: {', '.join(MLLM_SHAPES)}")
    parser.add_argument("--vit-images", type=int, default=96, help="JPEGs for the vit-* shapes (their encoders are ~100x slower)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="decode threads (default: the indexer's)")
    parser.add_argument("--conditions", type=int, default=4, choices=range(2, 5))
    parser.add_argument("--repeats", type=int, default=3,
                        help="best of this many for the decode ceiling and the index runs (the VM's speed drifts)")
    parser.add_argument("--encode-repeats", type=int, default=5,
                        help="best of this many timed passes per instruction for the encode ceilings")
    parser.add_argument("--encode-seconds", type=float, default=1.0,
                        help="a timed encode pass repeats over the images until it lasts this long (0: one time over them)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", help="auto, float32 or bfloat16 (the indexer's --precision)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--contention", action="store_true", help="also index quiet and beside busy processes, per OpenMP policy")
    parser.add_argument("--contention-only", action="store_true", help="only the contention case (implies --contention)")
    parser.add_argument("--contention-busy", type=int, default=None, help="busy processes (default: the cores in the affinity)")
    parser.add_argument("--contention-folder", type=Path, default=CONTENTION_FOLDER,
                        help="images to index (default: examples/colorshape/images, 120 PNGs for the demo model)")
    parser.add_argument("--contention-policies", default=",".join(CONTENTION_POLICIES),
                        help=f"comma-separated, of: {', '.join(CONTENTION_POLICIES)}")
    parser.add_argument("--contention-timeout", type=float, default=300.0, help="seconds one index run may take")
    args = parser.parse_args()

    results = {}
    if not args.contention_only:
        results = measure_all(args)
    contention = measure_contention(args) if args.contention or args.contention_only else None
    goals = {k: v for r in results.values() for k, v in r.pop("goals").items()}
    if contention is not None:
        goals.update(contention["goals"])
    print("\ngoals:")
    for name, goal in goals.items():
        print(f"  {'holds ' if goal['holds'] else 'MISSES'} {name}: {goal['measured']:.3f} (target {goal['target']})")
    if args.json:
        from focalsearch.threads import available_cores

        payload = {"date": time.strftime("%Y-%m-%d"), "machine": {"cpus": os.cpu_count(), "cores_in_affinity": available_cores(),
                   "platform": platform.platform(), "python": sys.version.split()[0]}, "results": results, "goals": goals}
        if contention is not None:
            payload["contention"] = contention
        args.json.write_text(json.dumps(payload, indent=2, default=float))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
