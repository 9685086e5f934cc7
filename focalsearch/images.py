"""Safe image loading: the only module that decodes image files."""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import itertools
import os
import stat as stat_mod
import threading
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from focalsearch import objectstore
from focalsearch.defaults import DEFAULT_MAX_QUERY_PIXELS
from focalsearch.errors import InvalidImageError, UserError

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)
DEFAULT_MAX_PIXELS: int = 178_956_970
# DEFAULT_MAX_QUERY_PIXELS (from defaults): the query-image cap. A JPEG counts at its reduced (draft)
# decode size; other formats cannot be decoded smaller, so above the cap they are refused from their
# header before any pixel is decoded. Decoding an image at the cap and encoding it costs about 13.5
# bytes a pixel at peak (decoded image, the preprocessor's array and its resize copy).

# Modes other than 8-bit RGB are converted a strip of about this many pixels at a time, so the
# conversion needs the source and the RGB result, not several full-size intermediates.
_STRIP_PIXELS = 1 << 20

# Only plain raster formats; this keeps out plugins that shell out (EPS runs
# Ghostscript) and header-less formats (TGA) that "identify" random bytes.
_WANTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "DIB", "TIFF", "PPM", "ICO", "AVIF")

# We enforce max_pixels ourselves, so PIL's warning for images between its
# MAX_IMAGE_PIXELS and our (larger) default limit is noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_pil_limit_lock = threading.Lock()


@dataclass(frozen=True)
class FileStat:
    """Cheap identity of a file on disk."""

    path: Path | str  # absolute and resolved; an object store URI (str) for objects
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class LoadedImage:
    """A decoded RGB image (EXIF orientation applied) with its file identity and hash."""

    stat: FileStat
    image: Image.Image
    width: int
    height: int
    content_hash: str  # sha256 hex of the exact bytes that were decoded


@dataclass(frozen=True)
class SkippedImage:
    """A file that could not be used as an image, with a short human reason."""

    path: Path
    reason: str


def _resolve(path: str | Path) -> Path:
    # os.path.realpath does not raise on symlink loops (Path.resolve does on 3.11).
    return Path(os.path.realpath(os.path.expanduser(path)))


def stat_file(path: Path) -> FileStat:
    """Stat ``path`` (following symlinks); raises OSError if it cannot be stat'ed."""
    st = os.stat(resolved := _resolve(path))
    return FileStat(path=resolved, size=st.st_size, mtime_ns=st.st_mtime_ns)


def _walk(root: Path, visited: set[tuple[int, int]], skipped: list[SkippedImage]) -> Iterator[Path]:
    """Yield image files under ``root``, skipping hidden entries; ``visited`` breaks symlink loops.

    What cannot be scanned (an unreadable folder, a symlink loop, a broken symlink named like an
    image) is appended to ``skipped`` with its reason.
    """
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            st = folder.stat()
            if (st.st_dev, st.st_ino) in visited:
                real = _resolve(folder)
                if folder.is_symlink() and _resolve(folder.parent).is_relative_to(real):
                    skipped.append(SkippedImage(folder, f"symlink loop: points back to {real}"))
                continue  # a second way into a folder already scanned: its files are indexed once
            visited.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as exc:
            skipped.append(SkippedImage(folder, f"unreadable folder: {_os_reason(exc)}"))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            is_image_name = os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS
            try:
                if entry.is_dir():
                    stack.append(path)
                elif entry.is_file():
                    if is_image_name:
                        yield path
                elif entry.is_symlink():  # is_dir and is_file are both False for a broken or looping link
                    os.stat(path)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    skipped.append(SkippedImage(path, "symlink loop"))
                elif isinstance(exc, FileNotFoundError):
                    if is_image_name:
                        skipped.append(SkippedImage(path, "broken symlink: its target does not exist"))
                else:
                    skipped.append(SkippedImage(path, f"unreadable: {_os_reason(exc)}"))


def _os_reason(exc: OSError) -> str:
    return exc.strerror or _one_line(exc)


def source_exists(path: str | Path) -> bool:
    """Whether an image file, folder or object-store prefix is there."""
    if objectstore.is_uri(str(path)):
        return objectstore.exists(str(path))
    return Path(path).expanduser().exists()


def scan_images(paths: Iterable[str | Path], skipped: list[SkippedImage] | None = None) -> list[FileStat]:
    """Image files from files and (recursively) folders, deduplicated and sorted by path.

    What could not be scanned is appended to ``skipped`` with its reason, when given.
    Raises UserError if a given path does not exist.
    """
    skipped = skipped if skipped is not None else []
    found: dict[Path | str, FileStat] = {}
    visited: set[tuple[int, int]] = set()
    for raw in paths:
        if objectstore.is_uri(str(raw)):
            for uri, size, mtime_ns in objectstore.list_objects(str(raw)):
                name = uri.rsplit("/", 1)[-1]
                explicit = uri.rstrip("/") == str(raw).rstrip("/")
                hidden = any(part.startswith(".") for part in uri[len(str(raw)):].split("/"))
                if explicit or (not hidden and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS):
                    found.setdefault(uri, FileStat(uri, size, mtime_ns))
            continue
        root = Path(os.path.expanduser(raw))
        if not root.exists():
            raise UserError(f"path not found: {raw}")
        # An explicitly named file is kept whatever its extension: the user asked for it.
        candidates = _walk(root, visited, skipped) if root.is_dir() else iter([root])
        for candidate in candidates:
            try:
                st = stat_file(candidate)
            except OSError as exc:  # vanished or became unreadable while scanning
                skipped.append(SkippedImage(candidate, f"unreadable: {_os_reason(exc)}"))
                continue
            found.setdefault(st.path, st)
    return sorted(found.values(), key=lambda s: (0, s.path.parts, "") if isinstance(s.path, Path) else (1, (), s.path))


@functools.cache
def _decode_formats() -> tuple[str, ...]:
    Image.init()
    # Image.open raises KeyError for a format name it does not know, so keep only registered ones.
    return tuple(f for f in _WANTED_FORMATS if f in Image.OPEN)


@contextlib.contextmanager
def _pil_pixel_limit(max_pixels: int) -> Iterator[None]:
    """Keep PIL's global bomb check from rejecting what a larger ``max_pixels`` allows."""
    # PIL raises above 2 * Image.MAX_IMAGE_PIXELS at open and again during load
    # (GIF frames, TIFF tiles), before our own check could run. For a larger user
    # limit, set the global to max_pixels (PIL then only warns about images we
    # reject anyway) under a lock for the whole open+decode, then restore it.
    current = Image.MAX_IMAGE_PIXELS
    if current is None or 2 * current >= max_pixels:
        yield
        return
    with _pil_limit_lock:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _read(path: Path) -> tuple[os.stat_result, bytes] | str:
    """Read a regular file once; return (stat, bytes) or a skip reason."""
    try:
        # O_NONBLOCK so that a FIFO named like an image cannot block us.
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
        fd = os.open(path, flags)
        try:
            st = os.fstat(fd)
            if not stat_mod.S_ISREG(st.st_mode):
                return "not a regular file"
            with os.fdopen(fd, "rb", closefd=False) as f:
                return st, f.read()
        finally:
            os.close(fd)
    except FileNotFoundError:
        return "file not found"
    except PermissionError:
        return "permission denied"
    except OSError as exc:
        return f"unreadable: {exc.strerror or _one_line(exc)}"


def _header_size(data: bytes) -> tuple[int, int] | None:
    """Size from the header alone with PIL's bomb check off; nothing is decoded."""
    with _pil_limit_lock:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            with Image.open(io.BytesIO(data), formats=_decode_formats()) as im:
                return im.size
        except Exception:
            return None
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def load_image(
    stat_or_path: FileStat | Path | str, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None,
    max_decoded_pixels: int | None = None,
) -> LoadedImage | SkippedImage:
    """Read, hash and decode one image; a bad file gives SkippedImage, never an exception.

    The returned ``stat`` describes the bytes actually read (fstat of the open file). With
    ``min_side``, a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, PIL's
    draft mode) as long as both sides stay at least ``min_side``: several times faster for a
    photo that is only going to be shrunk to the model's input. ``width`` and ``height`` are
    always the image's full size. With ``max_decoded_pixels``, see decode_image_bytes.
    """
    path = stat_or_path.path if isinstance(stat_or_path, FileStat) else stat_or_path
    if objectstore.is_uri(str(path)):
        return _load_object(str(path), stat_or_path, max_pixels, min_side, max_decoded_pixels)
    path = path if isinstance(stat_or_path, FileStat) else _resolve(path)
    read = _read(path)
    if isinstance(read, str):
        return SkippedImage(path, read)
    st, data = read
    return decode_image_bytes(
        data, path, mtime_ns=st.st_mtime_ns, max_pixels=max_pixels, min_side=min_side, max_decoded_pixels=max_decoded_pixels
    )


def _load_object(
    uri: str, stat_or_path, max_pixels: int, min_side: int | None, max_decoded_pixels: int | None
) -> LoadedImage | SkippedImage:
    """An image in object storage: its identity is the (size, LastModified) the listing saw."""
    if isinstance(stat_or_path, FileStat):
        mtime_ns = stat_or_path.mtime_ns
    else:
        found = objectstore.stat(uri)
        if found is None:
            return SkippedImage(uri, "file not found")
        mtime_ns = found[1]
    data = objectstore.read(uri)
    if isinstance(data, str):
        return SkippedImage(uri, data)
    return decode_image_bytes(
        data, uri, mtime_ns=mtime_ns, max_pixels=max_pixels, min_side=min_side, max_decoded_pixels=max_decoded_pixels
    )


def _too_large_for_query(full: tuple[int, int], decoded: tuple[int, int], limit: int) -> str:
    reduced = f" ({decoded[0]}x{decoded[1]} even at the reduced JPEG decode)" if decoded != full else ""
    return (f"too large: {full[0]}x{full[1]} pixels{reduced} exceeds the query-image limit of {limit} pixels "
            "(--max-query-pixels)")


_TURNED = frozenset({2, 3, 4, 5, 6, 7, 8})  # EXIF orientations that need a transpose


def decode_image_bytes(
    data: bytes, path: Path | str, *, mtime_ns: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None,
    max_decoded_pixels: int | None = None,
) -> LoadedImage | SkippedImage:
    """Decode an image held in memory (a file's bytes, or an upload named ``path``) with every
    check load_image makes: decompression-bomb limit, truncation, EXIF orientation, modes.

    With ``max_decoded_pixels`` (the query-image cap), an image whose decode would hold more pixels
    than that, after any reduced JPEG decode, is refused from its header without being decoded.
    No step keeps a second full-size copy beside the decoded image and its RGB result.
    """
    if not data:
        return SkippedImage(path, "empty file")
    file_stat = FileStat(path=path, size=len(data), mtime_ns=mtime_ns)
    content_hash = hashlib.sha256(data).hexdigest()
    try:
        with _pil_pixel_limit(max_pixels), Image.open(io.BytesIO(data), formats=_decode_formats()) as im:
            width, height = im.size  # from the header; no pixels decoded yet
            if width * height > max_pixels:
                return SkippedImage(path, f"too large: {width}x{height} pixels exceeds limit {max_pixels}")
            if min_side and im.format == "JPEG":
                im.draft(im.mode, (min_side, min_side))
            decoded_size = im.size
            if max_decoded_pixels is not None and decoded_size[0] * decoded_size[1] > max_decoded_pixels:
                return SkippedImage(path, _too_large_for_query((width, height), decoded_size, max_decoded_pixels))
            im.load()  # first frame only for animations; raises on truncated data
            try:
                turned = im.getexif().get(ExifTags.Base.Orientation, 1) in _TURNED
            except Exception:  # malformed EXIF must not cost us an otherwise good image
                turned = False
            if turned:
                try:
                    im = ImageOps.exif_transpose(im)  # the unturned pixels go when the with-block ends
                except Exception:
                    pass
            if im.size != decoded_size:  # EXIF turned it by 90 degrees
                width, height = height, width
    except UnidentifiedImageError:
        return SkippedImage(path, "not an image (cannot identify image file)")
    except Image.DecompressionBombError as exc:
        # PIL's hard limit fired before our check; re-read the header for a uniform message.
        size = _header_size(data)
        if size is not None and size[0] * size[1] > max_pixels:
            return SkippedImage(path, f"too large: {size[0]}x{size[1]} pixels exceeds limit {max_pixels}")
        return SkippedImage(path, f"too large: {_one_line(exc)}")
    except Exception as exc:  # PIL plugins raise many types (OSError, SyntaxError, struct.error, ...)
        return SkippedImage(path, f"truncated or corrupt: {_one_line(exc)}")
    try:
        rgb = to_rgb(im)
    except Exception as exc:
        return SkippedImage(path, f"unsupported image mode {im.mode}: {_one_line(exc)}")
    return LoadedImage(file_stat, rgb, width, height, content_hash)


def decoded_pixels(data: bytes, *, min_side: int | None = None) -> int | None:
    """How many pixels decode_image_bytes would decode ``data`` at (a JPEG at its reduced size), from
    the header alone; None when the header cannot be read."""
    with _pil_limit_lock:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            with Image.open(io.BytesIO(data), formats=_decode_formats()) as im:
                if min_side and im.format == "JPEG":
                    im.draft(im.mode, (min_side, min_side))
                return im.size[0] * im.size[1]
        except Exception:
            return None
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def open_query_image(
    path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None,
    max_query_pixels: int | None = DEFAULT_MAX_QUERY_PIXELS,
) -> LoadedImage:
    """Like load_image (with the same reduced JPEG decode), but raise InvalidImageError for anything
    that is not a usable image, or that would decode at more than ``max_query_pixels`` pixels."""
    result = load_image(path, max_pixels=max_pixels, min_side=min_side, max_decoded_pixels=max_query_pixels)
    if isinstance(result, SkippedImage):
        raise InvalidImageError(f"cannot read query image {path}: {result.reason}")
    return result


def _gray_to_rgb(values: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8)).convert("RGB")


def to_rgb(image: Image.Image, *, strip_pixels: int = _STRIP_PIXELS) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited over white.

    Every conversion is per pixel (float images share one value range, taken over the whole image),
    so a large image is converted in horizontal strips of about ``strip_pixels``: the result is the
    same, and the peak memory is the source plus the RGB result.
    """
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    convert = _strip_to_rgb
    if mode == "F":
        span = _float_range(image, strip_pixels)
        convert = functools.partial(_float_to_rgb, span=span)
    strips = _rows(image, strip_pixels)
    first = next(strips)
    if first is image:
        return convert(image)
    out = Image.new("RGB", image.size)
    top = 0
    for strip in itertools.chain([first], strips):
        out.paste(convert(strip), (0, top))
        top += strip.size[1]
    return out


def _rows(image: Image.Image, strip_pixels: int) -> Iterator[Image.Image]:
    width, height = image.size
    rows = max(1, strip_pixels // max(1, width))
    for top in range(0, height, rows):
        yield image.crop((0, top, width, min(height, top + rows))) if rows < height else image


def _float_values(image: Image.Image) -> np.ndarray:
    return np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)


def _float_range(image: Image.Image, strip_pixels: int) -> tuple[float, float]:
    """(lowest, highest) value of a float image, NaN and infinities counted as 0."""
    lows, highs = zip(*((float(v.min()), float(v.max())) for v in map(_float_values, _rows(image, strip_pixels))))
    return min(lows), max(highs)


def _float_to_rgb(image: Image.Image, *, span: tuple[float, float]) -> Image.Image:
    values = _float_values(image)
    lo, hi = span
    if lo >= 0.0 and hi <= 1.0:  # normalized float data
        return _gray_to_rgb(values * 255.0)
    width = hi - lo
    return _gray_to_rgb((values - lo) * (255.0 / width) if width > 0 else np.zeros_like(values))


def _strip_to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit data (16-bit PNG/TIFF decode to "I;16*" or "I"): scale 0..65535 to 0..255.
        return _gray_to_rgb(np.asarray(image, dtype=np.float64) / 257.0)
    if mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in image.info:
        rgba = image if mode == "RGBA" else image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")
