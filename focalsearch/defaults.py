"""Defaults shared by the CLI and the library, importable without the heavy dependencies."""

from pathlib import Path

DEFAULT_INDEX_DIR = Path("indexes/default")
PRECISIONS = ("auto", "float32", "bfloat16")  # inference arithmetic; see models.encoders.compute_dtypes
