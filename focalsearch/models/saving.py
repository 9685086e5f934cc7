"""Writing checkpoint folders so that a crash never leaves half of one in place."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_checkpoint(out: Path, model, tokenizer, processor, extra: Callable[[Path], None] | None = None) -> Path:
    """save_pretrained model, tokenizer and processor into a staging folder beside ``out``, then swap it in.

    ``extra`` may write more files (training state) into the staging folder first.
    """

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        processor.save_pretrained(staging)
        if extra is not None:
            extra(staging)

    return write_folder(out, write)


def write_folder(out: Path, write: Callable[[Path], None]) -> Path:
    """Let ``write`` fill a staging folder beside ``out``, then swap it in for ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(staging)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            staging.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    out.chmod(0o755)  # mkdtemp made the staging folder private
    return out
