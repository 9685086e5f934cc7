"""Defaults shared by the CLI and the library, importable without the heavy dependencies."""

from pathlib import Path

DEFAULT_INDEX_DIR = Path("indexes/default")
