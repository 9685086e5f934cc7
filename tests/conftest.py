"""Shared fixtures: tiny CLIP / FocalLens-CLIP checkpoints built offline, and generated image folders."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Indexing waits this long before deleting superseded table versions (a grace for concurrent readers).
os.environ.setdefault("FOCALSEARCH_VERSION_GRACE_SECONDS", "0")

CORPUS = [
    "a red circle on a blue background",
    "two green squares on a white background",
    "three apples on a table",
    "what color is the object?",
    "how many shapes are there?",
    "background",
    "quantity",
    "color",
    "shape",
]


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """A small random CLIP saved by transformers, with a BPE tokenizer learned from CORPUS."""
    from focalsearch.models.tiny import save_tiny_clip

    return save_tiny_clip(
        tmp_path_factory.mktemp("models") / "tiny-clip", CORPUS * 4, vocab_size=700, width=32, projection_dim=32
    )


@pytest.fixture(scope="session")
def tiny_focal(tiny_clip, tmp_path_factory) -> Path:
    """The tiny CLIP turned into FocalLens-CLIP (untrained instruction projection)."""
    from focalsearch.models.init_checkpoint import init_focallens_checkpoint

    return init_focallens_checkpoint(str(tiny_clip), tmp_path_factory.mktemp("models") / "tiny-focal")


MLLM_CORPUS = [*CORPUS, "answer in one word.", "describe the image in one word.", "summarize the above in one word.",
               "what shape is the object?", "red green blue circle square"]


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    """A small random LLaVA (CLIP vision tower, Llama language model) with a chat template."""
    from focalsearch.models.tiny_mllm import save_tiny_mllm

    return save_tiny_mllm(tmp_path_factory.mktemp("models") / "tiny-llava", MLLM_CORPUS * 4, "llava")


@pytest.fixture(scope="session")
def tiny_idefics3(tmp_path_factory) -> Path:
    """A small random Idefics3 (SmolVLM's family: image tiles, so image token counts vary with the image's shape)."""
    from focalsearch.models.tiny_mllm import save_tiny_mllm

    return save_tiny_mllm(tmp_path_factory.mktemp("models") / "tiny-idefics3", MLLM_CORPUS * 4, "idefics3")


def draw_image(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A deterministic picture: coloured shapes on a coloured background."""
    rng = random.Random(seed)
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 4)):
        x, y = rng.randrange(size[0] - 10), rng.randrange(size[1] - 10)
        w, h = rng.randint(5, 20), rng.randint(5, 20)
        fill = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x, y, x + w, y + h], fill=fill)
    return image


def make_image_folder(root: Path, n: int, *, start: int = 0, size: tuple[int, int] = (48, 40)) -> list[Path]:
    """n images as JPEG, PNG and WebP spread over nested subfolders."""
    paths = []
    formats = [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")]
    for i in range(start, start + n):
        ext, fmt = formats[i % 3]
        folder = root / f"set{i % 4}" / ("deep" if i % 5 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img{i:04d}.{ext}"
        draw_image(i, size).save(path, fmt)
        paths.append(path)
    return paths


def make_broken_files(root: Path) -> list[Path]:
    """Five files that look like images but are not readable ones."""
    root.mkdir(parents=True, exist_ok=True)
    good_jpeg = root / "_tmp.jpg"
    draw_image(999, (64, 64)).save(good_jpeg, "JPEG")
    data = good_jpeg.read_bytes()
    good_jpeg.unlink()
    good_png = root / "_tmp.png"
    draw_image(998, (64, 64)).save(good_png, "PNG")
    png = good_png.read_bytes()
    good_png.unlink()
    files = {
        "empty.jpg": b"",
        "truncated.jpg": data[: len(data) // 2],
        "truncated.png": png[: len(png) // 2],
        "random.webp": np.random.default_rng(0).bytes(2048),
        "notes.png": b"these are my holiday notes, not a picture\n",
    }
    for name, content in files.items():
        (root / name).write_bytes(content)
    return [root / name for name in files]


@pytest.fixture()
def photos(tmp_path) -> Path:
    """A folder of 30 generated images."""
    root = tmp_path / "photos"
    make_image_folder(root, 30)
    return root
