"""Thumbnails of indexed images, made once and cached on disk beside the index."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

from focalsearch import objectstore
from focalsearch.images import DEFAULT_MAX_PIXELS, LoadedImage, load_image


class ThumbnailCache:
    """JPEG thumbnails by (image id, size) under ``folder``; remade when the source file is newer.

    A read-only index keeps its thumbnails in a private temporary folder instead.
    """

    def __init__(self, folder: Path, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.folder = folder
        self.max_pixels = max_pixels
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=folder, delete=True)
            probe.close()
        except OSError:
            self.folder = Path(tempfile.mkdtemp(prefix="focalsearch-thumbnails-"))

    def get(self, image_id: str, source: Path | str, size: int) -> bytes | None:
        """The thumbnail as JPEG bytes, made now when missing or older than its source; None if
        the source cannot be read. A cache that cannot be written (a full disk) only costs remaking."""
        target = self.folder / str(size) / f"{image_id}.jpg"
        try:
            if objectstore.is_uri(str(source)):
                found = objectstore.stat(str(source))
                source_mtime = found[1] if found else None
            else:
                source_mtime = Path(source).stat().st_mtime_ns
            if source_mtime is not None and target.stat().st_mtime_ns >= source_mtime:
                return target.read_bytes()
        except OSError:
            pass
        loaded = load_image(source, max_pixels=self.max_pixels, min_side=size)
        if not isinstance(loaded, LoadedImage):
            return None
        picture = loaded.image.copy()
        picture.thumbnail((size, size))
        buffer = io.BytesIO()
        picture.save(buffer, "JPEG", quality=85)
        data = buffer.getvalue()
        tmp = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, target)
        except OSError:
            pass
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
        return data
