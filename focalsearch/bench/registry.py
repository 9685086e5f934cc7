"""The paper's benchmarks by name, each a module with ``run(encoder, data, *, instruction, limit, progress)``.

Some take more options: ``ties`` (GeneCIS, MMVP-VLM), ``tasks`` and ``baseline`` (GeneCIS).

Which encoder a run uses, so that the default is the official baseline (see encoder_to_load):
``--encoder auto`` is ``focallens`` on a FocalLens-CLIP checkpoint and ``mllm`` on a vision-language
one; on a plain CLIP checkpoint it is plain ``clip`` for MMVP-VLM and SugarCrepe, whose official
scripts score plain CLIP, and ``clip+text`` elsewhere. ``--encoder text-only`` is GeneCIS's text-only
baseline (split_encoder).
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

from focalsearch.bench.common import BenchReport, check_ties
from focalsearch.errors import UserError

BENCHMARKS = {
    "genecis": ("focalsearch.bench.genecis", "run"),
    "celeba-attribute": ("focalsearch.bench.celeba", "run"),
    "mmvp-vlm": ("focalsearch.bench.mmvp", "run"),
    "sugarcrepe": ("focalsearch.bench.sugarcrepe", "run"),
    "colorshape": ("focalsearch.bench.colorshape", "run_report"),
}
NEEDS_DATA = {name for name in BENCHMARKS if name != "colorshape"}
EXTRA_OPTIONS = {"genecis": ("ties", "tasks", "baseline"), "mmvp-vlm": ("ties",)}
_FLAGS = {"ties": "--ties", "tasks": "--task", "baseline": "--encoder text-only"}
BASELINES = ("text-only",)  # a benchmark's own baseline, asked for with --encoder
PLAIN_CLIP_BY_DEFAULT = ("mmvp-vlm", "sugarcrepe")  # their official scripts score plain CLIP


def split_encoder(encoder: str) -> tuple[str, str | None]:
    """(the encoder to load, the benchmark baseline asked for or None). A baseline (``text-only``) loads
    the checkpoint's own encoder: it reads only empty-instruction image vectors, which are the plain
    ones in every family (FocalLens-CLIP's equal plain CLIP's), and text vectors."""
    return ("auto", encoder) if encoder in BASELINES else (encoder, None)


def is_plain_clip_checkpoint(model: str | None) -> bool:
    """Whether the checkpoint is plain CLIP (not FocalLens-CLIP, not a vision-language model), from its
    config alone (no weights are read)."""
    from focalsearch.models.focallens_clip import FocalLensCLIPConfig
    from focalsearch.models.loading import family_of, load_config, resolve_model

    config = load_config(resolve_model(model))
    return family_of(config) == "clip" and not isinstance(config, FocalLensCLIPConfig)


def encoder_to_load(name: str, encoder: str, model: str | None) -> str:
    """``--encoder`` as the benchmark runs it: ``auto`` on a plain CLIP checkpoint is ``clip`` for
    MMVP-VLM and SugarCrepe (the official baselines); anything else is left to the encoder."""
    if encoder == "auto" and name in PLAIN_CLIP_BY_DEFAULT and is_plain_clip_checkpoint(model):
        return "clip"
    return encoder


def scoring_precision(encoder) -> str:
    """The arithmetic the encoder runs in (models.encoders.arithmetic_name); "unknown" for one that does not say."""
    autocast, weights = getattr(encoder, "autocast_dtype", None), getattr(encoder, "dtype", None)
    if autocast is None and weights is None:
        return "unknown"
    from focalsearch.models.encoders import arithmetic_name

    return arithmetic_name(autocast, weights)


def check_options(
    name: str,
    data: Path | None = None,
    *,
    ties: str | None = None,
    tasks: list[str] | None = None,
    baseline: str | None = None,
) -> dict:
    """The benchmark's extra options that were given, or a one-line error; cheap, so callers check before loading a model."""
    if name not in BENCHMARKS:
        raise UserError(f"unknown benchmark {name!r}; use one of: {', '.join(BENCHMARKS)}")
    if name in NEEDS_DATA and data is None:
        raise UserError(f"{name} needs --data DIR (see README, 'Reproducing the paper')")
    if data is not None and name in NEEDS_DATA and not data.is_dir():
        raise UserError(f"{name}: --data {data} is not a folder")
    if baseline and baseline not in BASELINES:
        raise UserError(f"unknown baseline {baseline!r}; use one of: {', '.join(BASELINES)}")
    given = {key: value for key, value in (("ties", ties), ("tasks", tasks), ("baseline", baseline)) if value}
    for key in given:
        if key not in EXTRA_OPTIONS.get(name, ()):
            takers = [n for n, keys in EXTRA_OPTIONS.items() if key in keys]
            raise UserError(f"{_FLAGS[key]} applies only to {' and '.join(takers)}, not to {name}")
    if ties:
        check_ties(ties)
    if tasks:
        from focalsearch.bench.genecis import check_task_names

        check_task_names(tasks)
    return given


def run_benchmark(
    name: str,
    encoder,
    data: Path | None = None,
    *,
    instruction: str | None = None,
    limit: int | None = None,
    progress: bool = False,
    ties: str | None = None,
    tasks: list[str] | None = None,
    baseline: str | None = None,
) -> BenchReport:
    """Run one benchmark with a ConditionalEncoder (or anything with its interface); the report
    records the precision the encoder scored in."""
    extra = check_options(name, data, ties=ties, tasks=tasks, baseline=baseline)
    module, function = BENCHMARKS[name]
    report = getattr(importlib.import_module(module), function)(
        encoder, data, instruction=instruction, limit=limit, progress=progress, **extra
    )
    return dataclasses.replace(report, precision=scoring_precision(encoder))
