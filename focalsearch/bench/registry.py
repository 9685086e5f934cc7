"""The paper's benchmarks by name, each a module with ``run(encoder, data, *, instruction, limit, progress)``."""

from __future__ import annotations

import importlib
from pathlib import Path

from focalsearch.bench.common import BenchReport
from focalsearch.errors import UserError

BENCHMARKS = {
    "genecis": ("focalsearch.bench.genecis", "run"),
    "celeba-attribute": ("focalsearch.bench.celeba", "run"),
    "mmvp-vlm": ("focalsearch.bench.mmvp", "run"),
    "sugarcrepe": ("focalsearch.bench.sugarcrepe", "run"),
    "colorshape": ("focalsearch.bench.colorshape", "run_report"),
}
NEEDS_DATA = {name for name in BENCHMARKS if name != "colorshape"}


def run_benchmark(
    name: str,
    encoder,
    data: Path | None = None,
    *,
    instruction: str | None = None,
    limit: int | None = None,
    progress: bool = False,
) -> BenchReport:
    """Run one benchmark with a ConditionalEncoder (or anything with its interface)."""
    if name not in BENCHMARKS:
        raise UserError(f"unknown benchmark {name!r}; use one of: {', '.join(BENCHMARKS)}")
    if name in NEEDS_DATA and data is None:
        raise UserError(f"{name} needs --data DIR (see README, 'Reproducing the paper')")
    if data is not None and name in NEEDS_DATA and not data.is_dir():
        raise UserError(f"{name}: --data {data} is not a folder")
    module, function = BENCHMARKS[name]
    return getattr(importlib.import_module(module), function)(
        encoder, data, instruction=instruction, limit=limit, progress=progress
    )
