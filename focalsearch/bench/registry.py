"""The paper's benchmarks by name, each a module with ``run(encoder, data, *, instruction, limit, progress)``.

Some take more options: ``ties`` (GeneCIS, MMVP-VLM) and ``tasks`` (GeneCIS).
"""

from __future__ import annotations

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
EXTRA_OPTIONS = {"genecis": ("ties", "tasks"), "mmvp-vlm": ("ties",)}
_FLAGS = {"ties": "--ties", "tasks": "--task"}


def check_options(name: str, data: Path | None = None, *, ties: str | None = None, tasks: list[str] | None = None) -> dict:
    """The benchmark's extra options that were given, or a one-line error; cheap, so callers check before loading a model."""
    if name not in BENCHMARKS:
        raise UserError(f"unknown benchmark {name!r}; use one of: {', '.join(BENCHMARKS)}")
    if name in NEEDS_DATA and data is None:
        raise UserError(f"{name} needs --data DIR (see README, 'Reproducing the paper')")
    if data is not None and name in NEEDS_DATA and not data.is_dir():
        raise UserError(f"{name}: --data {data} is not a folder")
    given = {key: value for key, value in (("ties", ties), ("tasks", tasks)) if value}
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
) -> BenchReport:
    """Run one benchmark with a ConditionalEncoder (or anything with its interface)."""
    extra = check_options(name, data, ties=ties, tasks=tasks)
    module, function = BENCHMARKS[name]
    return getattr(importlib.import_module(module), function)(
        encoder, data, instruction=instruction, limit=limit, progress=progress, **extra
    )
