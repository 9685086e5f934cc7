"""Tests for focalsearch.images: safe loading, mode conversion and scanning."""

from __future__ import annotations

import hashlib
import io
import os
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from focalsearch import images
from focalsearch.errors import InvalidImageError, UserError
from focalsearch.images import (
    DEFAULT_MAX_PIXELS,
    FileStat,
    LoadedImage,
    SkippedImage,
    load_image,
    open_query_image,
    scan_images,
    stat_file,
    to_rgb,
)


def _noise(size: tuple[int, int] = (64, 48)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _bomb_png(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims width x height pixels (data is far too short)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    chunks = _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)
    return path


def _skipped(result: LoadedImage | SkippedImage) -> SkippedImage:
    assert isinstance(result, SkippedImage), result
    return result


# --- good files ---------------------------------------------------------------------------


def test_load_good_png_hash_and_stat(tmp_path: Path) -> None:
    path = _save(_noise(), tmp_path / "a.png")
    result = load_image(path)
    assert isinstance(result, LoadedImage)
    assert result.content_hash == hashlib.sha256(path.read_bytes()).hexdigest()
    assert result.image.mode == "RGB"
    assert (result.width, result.height) == (64, 48) == result.image.size
    assert np.array_equal(np.asarray(result.image), np.asarray(_noise()))
    st = os.stat(path)
    assert result.stat == FileStat(path.resolve(), st.st_size, st.st_mtime_ns)
    assert result.stat == stat_file(path)
    assert load_image(str(path)).content_hash == result.content_hash
    assert load_image(stat_file(path)).content_hash == result.content_hash


def test_image_is_fully_loaded_and_detached(tmp_path: Path) -> None:
    path = _save(_noise(), tmp_path / "a.jpg", quality=90)
    result = load_image(path)
    assert isinstance(result, LoadedImage)
    path.unlink()
    assert result.image.getpixel((0, 0)) is not None
    assert result.image.tobytes()


def test_exif_orientation_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (20, 10), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW on display
    path = _save(img, tmp_path / "rot.jpg", exif=exif)
    result = load_image(path)
    assert isinstance(result, LoadedImage)
    assert (result.width, result.height) == (10, 20)
    assert result.image.size == (10, 20)


def _photo_like(width: int, height: int) -> Image.Image:
    """Smooth content with some edges, as JPEG photos have."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 127 + 100 * np.sin(x / 37.0) * np.cos(y / 53.0)
    g = 127 + 100 * np.cos((x + y) / 71.0)
    b = np.where((x // 97 + y // 89) % 2 == 0, 40, 210).astype(np.float32)
    return Image.fromarray(np.stack([r, g, b], axis=-1).clip(0, 255).astype(np.uint8))


def test_draft_decode_keeps_min_side_and_reports_full_size(tmp_path: Path) -> None:
    path = _save(_photo_like(1600, 1000), tmp_path / "big.jpg", quality=90)
    full = load_image(path)
    small = load_image(path, min_side=224)
    assert isinstance(full, LoadedImage) and isinstance(small, LoadedImage)
    assert small.image.size == (400, 250)  # 1/4 scale: 1/8 would give a 125 px side
    assert (small.width, small.height) == (full.width, full.height) == (1600, 1000)
    assert small.content_hash == full.content_hash
    # What the model sees after shrinking to its input size barely differs.
    target = (358, 224)
    a = np.asarray(full.image.resize(target, Image.Resampling.BICUBIC), dtype=np.float32)
    b = np.asarray(small.image.resize(target, Image.Resampling.BICUBIC), dtype=np.float32)
    assert np.abs(a - b).mean() < 3.0


def test_draft_decode_never_goes_below_min_side(tmp_path: Path) -> None:
    path = _save(_photo_like(500, 300), tmp_path / "mid.jpg")
    assert load_image(path, min_side=224).image.size == (500, 300)  # halving would give 150 px
    assert load_image(path, min_side=150).image.size == (250, 150)


def test_draft_decode_with_exif_rotation(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(_photo_like(1600, 800), tmp_path / "rot.jpg", exif=exif)
    result = load_image(path, min_side=100)
    assert isinstance(result, LoadedImage)
    assert result.image.size == (100, 200)
    assert (result.width, result.height) == (800, 1600)


def test_draft_leaves_other_formats_alone(tmp_path: Path) -> None:
    path = _save(_photo_like(800, 600), tmp_path / "big.png")
    result = load_image(path, min_side=64)
    assert isinstance(result, LoadedImage) and result.image.size == (800, 600)


def test_animated_gif_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    result = load_image(path)
    assert isinstance(result, LoadedImage)
    r, g, b = result.image.getpixel((4, 4))
    assert r > 200 and g < 50 and b < 50


def test_animated_webp_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in [(0, 0, 255), (255, 0, 0)]]
    path = tmp_path / "anim.webp"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, lossless=True)
    result = load_image(path)
    assert isinstance(result, LoadedImage)
    assert result.image.getpixel((4, 4)) == (0, 0, 255)


def test_content_sniffed_not_extension(tmp_path: Path) -> None:
    path = _save(_noise(), tmp_path / "actually_png.jpg", format="PNG")
    assert isinstance(load_image(path), LoadedImage)


# --- broken files -------------------------------------------------------------------------


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    skipped = _skipped(load_image(path))
    assert skipped.reason == "empty file"
    assert skipped.path == path.resolve()


@pytest.mark.parametrize("fmt,name", [("JPEG", "t.jpg"), ("PNG", "t.png")])
def test_truncated(tmp_path: Path, fmt: str, name: str) -> None:
    buf = io.BytesIO()
    _noise((128, 128)).save(buf, format=fmt)
    data = buf.getvalue()
    path = tmp_path / name
    path.write_bytes(data[: len(data) // 2])
    skipped = _skipped(load_image(path))
    assert skipped.reason.startswith("truncated or corrupt: ")
    assert "\n" not in skipped.reason


def test_random_bytes_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "noise.jpg"
    path.write_bytes(random.Random(0).randbytes(4096))
    assert _skipped(load_image(path)).reason == "not an image (cannot identify image file)"


def test_text_named_png(tmp_path: Path) -> None:
    path = tmp_path / "readme.png"
    path.write_text("hello, I am not a picture\n" * 20)
    assert _skipped(load_image(path)).reason == "not an image (cannot identify image file)"


def test_vanished_between_scan_and_load(tmp_path: Path) -> None:
    path = _save(_noise(), tmp_path / "gone.png")
    st = stat_file(path)
    path.unlink()
    skipped = _skipped(load_image(st))
    assert skipped.reason == "file not found"
    assert skipped.path == st.path


# An unreadable file: tests/test_hardening.py runs that case without root's power over file modes.


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_does_not_block(tmp_path: Path) -> None:
    path = tmp_path / "pipe.jpg"
    os.mkfifo(path)
    assert _skipped(load_image(path)).reason == "not a regular file"


def test_directory_is_skipped(tmp_path: Path) -> None:
    folder = tmp_path / "dir.png"
    folder.mkdir()
    assert _skipped(load_image(folder)).reason == "not a regular file"


# --- pixel limits -------------------------------------------------------------------------


@pytest.fixture
def load_calls(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Record every pixel decode (ImageFile.load)."""
    calls: list[object] = []
    original = ImageFile.ImageFile.load

    def spy(self: ImageFile.ImageFile):
        calls.append(self)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return calls


def test_too_large_skipped_without_decoding(tmp_path: Path, load_calls: list[object]) -> None:
    path = _save(_noise((100, 50)), tmp_path / "big.png")
    skipped = _skipped(load_image(path, max_pixels=4999))
    assert skipped.reason == "too large: 100x50 pixels exceeds limit 4999"
    assert load_calls == []
    assert isinstance(load_image(path, max_pixels=5000), LoadedImage)
    assert load_calls  # the spy does see real decodes


def test_bomb_header_skipped_without_decoding(tmp_path: Path, load_calls: list[object]) -> None:
    path = _bomb_png(tmp_path / "bomb.png", 20000, 20000)
    skipped = _skipped(load_image(path))
    assert skipped.reason == f"too large: 20000x20000 pixels exceeds limit {DEFAULT_MAX_PIXELS}"
    assert load_calls == []
    # Far beyond PIL's own hard limit: still a clean skip.
    huge = _bomb_png(tmp_path / "huge.png", 100000, 100000)
    assert _skipped(load_image(huge)).reason.startswith("too large: ")
    assert load_calls == []


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_larger_user_limit_overrides_pil_global(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL would reject > 200 pixels
    path = _save(_noise((40, 30)), tmp_path / "a.png")
    result = load_image(path, max_pixels=1200)
    assert isinstance(result, LoadedImage)
    assert Image.MAX_IMAGE_PIXELS == 100  # restored
    assert _skipped(load_image(path, max_pixels=1199)).reason.startswith("too large: 40x30")


# --- open_query_image ---------------------------------------------------------------------


def test_open_query_image(tmp_path: Path) -> None:
    good = _save(_noise(), tmp_path / "q.png")
    assert isinstance(open_query_image(good), LoadedImage)

    bad = tmp_path / "q.jpg"
    bad.write_text("not an image")
    with pytest.raises(InvalidImageError, match=r"^cannot read query image .*q\.jpg: not an image"):
        open_query_image(bad)
    with pytest.raises(InvalidImageError, match="file not found"):
        open_query_image(tmp_path / "missing.png")
    with pytest.raises(InvalidImageError, match="too large"):
        open_query_image(good, max_pixels=10)
    assert issubclass(InvalidImageError, UserError)


# --- to_rgb -------------------------------------------------------------------------------


def _px(img: Image.Image) -> tuple[int, int, int]:
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == img.size
    return out.getpixel((0, 0))


def test_to_rgb_alpha_over_white() -> None:
    assert _px(Image.new("RGBA", (2, 2), (10, 20, 30, 0))) == (255, 255, 255)
    assert _px(Image.new("RGBA", (2, 2), (10, 20, 30, 255))) == (10, 20, 30)
    half = _px(Image.new("RGBA", (2, 2), (0, 0, 0, 128)))
    assert all(120 <= c <= 135 for c in half)
    assert _px(Image.new("LA", (2, 2), (0, 0))) == (255, 255, 255)
    assert _px(Image.new("LA", (2, 2), (40, 255))) == (40, 40, 40)


def test_to_rgb_palette() -> None:
    pal = Image.new("P", (2, 2), 1)
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    assert _px(pal) == (200, 100, 50)
    pal.info["transparency"] = 1
    assert _px(pal) == (255, 255, 255)
    pa = Image.new("PA", (2, 2), (1, 0))
    pa.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    assert _px(pa) == (255, 255, 255)


def test_to_rgb_transparent_palette_gif_roundtrip(tmp_path: Path) -> None:
    img = Image.new("P", (4, 4), 0)
    img.putpalette([9, 9, 9, 200, 0, 0] + [0] * 762)
    img.putpixel((3, 3), 1)
    path = _save(img, tmp_path / "t.gif", transparency=0)
    result = load_image(path)
    assert isinstance(result, LoadedImage)
    assert result.image.getpixel((0, 0)) == (255, 255, 255)
    assert result.image.getpixel((3, 3)) == (200, 0, 0)


def test_to_rgb_cmyk() -> None:
    assert _px(Image.new("CMYK", (2, 2), (0, 0, 0, 0))) == (255, 255, 255)
    assert _px(Image.new("CMYK", (2, 2), (0, 0, 0, 255))) == (0, 0, 0)
    assert _px(Image.new("CMYK", (2, 2), (0, 255, 255, 0))) == (255, 0, 0)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_to_rgb_16bit_scaled_not_clipped(mode: str) -> None:
    img = Image.new(mode, (3, 1))
    img.putpixel((0, 0), 65535)
    img.putpixel((1, 0), 32768)
    img.putpixel((2, 0), 0)
    out = to_rgb(img)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (128, 128, 128)
    assert out.getpixel((2, 0)) == (0, 0, 0)


def test_16bit_png_file(tmp_path: Path) -> None:
    arr = np.array([[65535, 257 * 100, 0]], dtype=np.uint16)
    path = _save(Image.fromarray(arr), tmp_path / "deep.png")
    result = load_image(path)
    assert isinstance(result, LoadedImage)
    assert [result.image.getpixel((x, 0))[0] for x in range(3)] == [255, 100, 0]


def test_to_rgb_float() -> None:
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    out = to_rgb(unit)
    assert [out.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]
    wide = to_rgb(Image.fromarray(np.array([[-10.0, 90.0]], dtype=np.float32)))
    assert [wide.getpixel((x, 0))[0] for x in range(2)] == [0, 255]


def test_to_rgb_gray_and_bilevel() -> None:
    assert _px(Image.new("L", (2, 2), 77)) == (77, 77, 77)
    assert _px(Image.new("1", (2, 2), 1)) == (255, 255, 255)
    assert _px(Image.new("1", (2, 2), 0)) == (0, 0, 0)
    rgb = Image.new("RGB", (2, 2), (1, 2, 3))
    assert to_rgb(rgb).getpixel((0, 0)) == (1, 2, 3)


def _every_mode() -> dict[str, Image.Image]:
    """Random images in every mode to_rgb converts, 37x23 pixels."""
    rng = np.random.default_rng(7)
    h, w = 23, 37
    rgba = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8))
    rgb = rgba.convert("RGB")
    palette = rgb.quantize(16)
    palette_keyed = palette.copy()
    palette_keyed.info["transparency"] = 3
    rgb_keyed = rgb.copy()
    rgb_keyed.putpixel((5, 20), (1, 2, 3))
    rgb_keyed.info["transparency"] = (1, 2, 3)
    floats = rng.normal(0.5, 0.2, (h, w)).astype(np.float32)
    floats[20:, 30:] = 40.0  # the range only the last strips see
    floats[1, 1], floats[2, 2], floats[3, 3] = np.nan, np.inf, -np.inf
    return {
        "RGBA": rgba, "LA": Image.fromarray(rng.integers(0, 256, (h, w, 2), dtype=np.uint8)), "PA": palette.convert("PA"),
        "RGBa": rgba.convert("RGBa"), "P": palette, "P+transparency": palette_keyed, "RGB+transparency": rgb_keyed,
        "L": rgb.convert("L"), "1": rgb.convert("1"), "CMYK": rgb.convert("CMYK"), "YCbCr": rgb.convert("YCbCr"),
        "I;16": Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16)),
        "I;16B": Image.frombytes("I;16B", (w, h), rng.integers(0, 256, h * w * 2, dtype=np.uint8).tobytes()),
        "I": Image.fromarray(rng.integers(-5, 70000, (h, w), dtype=np.int32)),
        "F": Image.fromarray(floats), "F unit": Image.fromarray(rng.random((h, w), dtype=np.float32)),
    }


@pytest.mark.parametrize("name", list(_every_mode()))
def test_to_rgb_in_strips_equals_the_whole_image_at_once(name: str) -> None:
    image = _every_mode()[name]
    whole = to_rgb(image, strip_pixels=10**9)
    assert whole.mode == "RGB" and whole.size == image.size
    for strip_pixels in (1, 100, 37 * 22):  # one row, a few rows, all rows but one
        assert to_rgb(image, strip_pixels=strip_pixels).tobytes() == whole.tobytes(), strip_pixels


# --- the query-image cap (max_decoded_pixels) -------------------------------------------------


def test_query_cap_refuses_from_the_header_without_decoding(tmp_path: Path) -> None:
    # The header claims 9000x9000 but the data is far too short: decoding would say "truncated".
    path = _bomb_png(tmp_path / "claims.png", 9000, 9000)
    assert _skipped(load_image(path)).reason.startswith("truncated or corrupt")
    reason = _skipped(load_image(path, max_decoded_pixels=25_000_000)).reason
    assert reason == "too large: 9000x9000 pixels exceeds the query-image limit of 25000000 pixels (--max-query-pixels)"
    with pytest.raises(InvalidImageError, match=r"query-image limit of 25000000 pixels \(--max-query-pixels\)"):
        open_query_image(path)  # the default cap
    assert images.DEFAULT_MAX_QUERY_PIXELS == 25_000_000


def test_query_cap_counts_a_jpeg_at_its_reduced_size(tmp_path: Path) -> None:
    jpeg = _save(_photo_like(1600, 1000), tmp_path / "big.jpg", quality=90)
    png = _save(_photo_like(1600, 1000), tmp_path / "big.png")
    reduced = load_image(jpeg, min_side=224, max_decoded_pixels=100_000)  # decoded at 400x250
    assert isinstance(reduced, LoadedImage) and reduced.image.size == (400, 250)
    assert _skipped(load_image(jpeg, min_side=224, max_decoded_pixels=99_999)).reason == (
        "too large: 1600x1000 pixels (400x250 even at the reduced JPEG decode) exceeds the query-image limit "
        "of 99999 pixels (--max-query-pixels)"
    )
    assert "1600x1000 pixels exceeds" in _skipped(load_image(png, min_side=224, max_decoded_pixels=100_000)).reason
    assert isinstance(load_image(png, min_side=224, max_decoded_pixels=1_600_000), LoadedImage)  # at the cap
    assert images.decoded_pixels(jpeg.read_bytes(), min_side=224) == 100_000
    assert images.decoded_pixels(png.read_bytes(), min_side=224) == 1_600_000
    assert images.decoded_pixels(b"not an image") is None


def test_query_cap_leaves_pixels_unchanged(tmp_path: Path) -> None:
    path = _save(_every_mode()["RGBA"], tmp_path / "a.png")
    capped, plain = load_image(path, max_decoded_pixels=37 * 23), load_image(path)
    assert capped.image.tobytes() == plain.image.tobytes() == to_rgb(Image.open(path)).tobytes()


# --- scan_images --------------------------------------------------------------------------


def _touch_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")  # scanning never decodes
    return path


def test_scan_recurses_filters_and_sorts(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    expected = [
        _touch_image(root / "b.JPG"),
        _touch_image(root / "a.png"),
        _touch_image(root / "sub" / "deep" / "c.TiFf"),
        _touch_image(root / "sub" / "d.webp"),
    ]
    _touch_image(root / "notes.txt")
    _touch_image(root / "noext")
    _touch_image(root / ".hidden.png")
    _touch_image(root / ".cache" / "e.png")
    result = scan_images([root])
    assert [s.path for s in result] == sorted(p.resolve() for p in expected)
    assert all(isinstance(s, FileStat) and s.size == 1 for s in result)


def test_scan_dedups_and_accepts_explicit_files(tmp_path: Path) -> None:
    root = tmp_path / "p"
    a = _touch_image(root / "a.png")
    txt = _touch_image(root / "explicit.txt")
    link = root / "link.jpg"
    link.symlink_to(a)
    result = scan_images([root, str(a), root / "." / "a.png", txt])
    assert [s.path for s in result] == sorted([a.resolve(), txt.resolve()])


def test_scan_symlink_loop_terminates(tmp_path: Path) -> None:
    root = tmp_path / "r"
    a = _touch_image(root / "sub" / "a.png")
    (root / "sub" / "up").symlink_to(root)
    (root / "self").symlink_to(root / "self")
    (root / "broken.png").symlink_to(tmp_path / "nowhere.png")
    result = scan_images([root])
    assert [s.path for s in result] == [a.resolve()]


def test_scan_follows_symlinked_files_outside(tmp_path: Path) -> None:
    outside = _touch_image(tmp_path / "elsewhere" / "x.gif")
    root = tmp_path / "r"
    root.mkdir()
    (root / "y.gif").symlink_to(outside)
    assert [s.path for s in scan_images([root])] == [outside.resolve()]


def test_scan_missing_path_raises(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(UserError, match=r"^path not found: .*nope$"):
        scan_images([tmp_path, missing])


def test_scan_empty_folder(tmp_path: Path) -> None:
    assert scan_images([tmp_path]) == []


def test_extensions_constant() -> None:
    assert images.IMAGE_EXTENSIONS == frozenset(
        {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
    )
    assert DEFAULT_MAX_PIXELS == 178_956_970
