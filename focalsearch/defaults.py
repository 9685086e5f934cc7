"""Defaults shared by the CLI and the library, importable without the heavy dependencies."""

from pathlib import Path

DEFAULT_INDEX_DIR = Path("indexes/default")
PRECISIONS = ("auto", "float32", "bfloat16")  # inference arithmetic; see models.encoders.compute_dtypes
# The most pixels a query image (a CLI query file or object, a server upload) is decoded at; see
# images.decode_image_bytes. A JPEG counts at its reduced decode size.
DEFAULT_MAX_QUERY_PIXELS = 25_000_000  # 6000x4000 fits; at about 13.5 bytes a pixel, an image at the cap takes 340 MB
