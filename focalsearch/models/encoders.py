"""The ConditionalEncoder interface, shared arithmetic helpers, and create_encoder (which picks the family)."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from focalsearch.defaults import PRECISIONS
from focalsearch.errors import UserError
from focalsearch.instructions import normalize_instruction
from focalsearch.models.loading import ModelRef, load_config, resolve_model

CLIP_ENCODERS = ("focallens", "clip", "clip+text")
ENCODERS = (*CLIP_ENCODERS, "mllm")


@dataclass(frozen=True)
class EncoderInfo:
    """What produced a set of vectors: recorded with every condition and shown to users."""

    encoder: str
    model: str
    dim: int
    prompts: str = ""  # the MLLM family's prompt templates (JSON): part of the condition


def pick_device(device: str = "auto") -> torch.device:
    """'auto' is CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available")
    if device not in ("cpu", "cuda"):
        raise UserError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def inference_dtype(device: torch.device) -> torch.dtype:
    """float32 on the CPU; bf16 (fp16 where unsupported) on CUDA."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX512-BF16 or AMX); without it bf16 is emulated and slow."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def compute_dtypes(device: torch.device, precision: str = "auto") -> tuple[torch.dtype, torch.dtype | None]:
    """(weights dtype, autocast dtype or None) for inference.

    "auto": on CUDA, bf16 (fp16) weights; on a CPU with native bf16, float32 weights under bf16
    autocast, which keeps norms and softmax in float32 (measured: 1.1-1.5x the demo's and 1.9-2.5x a
    ViT-B/16's encoding rate, cosine to float32 above 0.9999; benchmarks/throughput.py); elsewhere
    float32. "float32" and "bfloat16" force the one or the other.
    """
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use one of: {', '.join(PRECISIONS)}")
    if precision == "float32":
        return torch.float32, None
    if device.type == "cuda":
        return (torch.bfloat16 if precision == "bfloat16" else inference_dtype(device)), None
    if precision == "bfloat16" or cpu_has_native_bf16():
        return torch.float32, torch.bfloat16
    return torch.float32, None


def arithmetic_name(autocast_dtype: torch.dtype | None, weights: torch.dtype = torch.float32) -> str:
    """What a pass computes in, as --precision spells it: its autocast dtype where it has one, else its weights'."""
    return str(autocast_dtype or weights).removeprefix("torch.")


def needed_towers(encoder: str, instruction: str, *, image_query: bool) -> str:
    """Which towers a query needs: a text query only the text tower; an image query the vision
    tower, plus the text tower where the instruction is read (focallens, clip+text)."""
    if encoder == "mllm":  # one model reads both
        return "both"
    if not image_query:
        return "text"
    return "vision" if encoder == "clip" or not normalize_instruction(instruction) else "both"


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


class ConditionalEncoder(ABC):
    """Encodes images under instructions, and texts, into L2-normalised float32 vectors (design §2).

    One implementation per family: the CLIP family (clip_family.ClipFamilyEncoder: focallens, clip,
    clip+text) and the MLLM family (mllm_family.MllmEncoder). Callers never branch on the family.

    A batch goes through three steps: ``prepare`` one decoded RGB image (in decode workers),
    ``collate`` the prepared items, then ``encode_batch`` under *all* of a run's instructions at once,
    which lets a family share work across them. ``towers`` ("both", "text" or "vision") is what a
    caller asked to load (see needed_towers).
    """

    info: EncoderInfo
    device: torch.device
    dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    towers: str = "both"
    batch_size: int = 32
    image_processor = None

    @property
    def reads_instruction(self) -> bool:
        """Whether an image's vector depends on the instruction; when not (plain ``clip``), one encoding serves them all."""
        return True

    # -- inputs -------------------------------------------------------------------------------
    @property
    def min_decode_side(self) -> int:
        """The smallest side an image may be decoded at without changing what preprocessing keeps."""
        size, crop = self.image_processor.size, getattr(self.image_processor, "crop_size", None)
        names = ("shortest_edge", "longest_edge", "height", "width")
        sides = [_size_field(size, n) for n in names] + [_size_field(crop, n) for n in names]
        return max(s for s in sides if s)

    @abstractmethod
    def prepare(self, image: Image.Image):
        """One decoded RGB image as this encoder's model input (runs in decode workers)."""

    @abstractmethod
    def collate(self, items: Sequence):
        """A batch of prepared images."""

    def select(self, batch, rows: Sequence[int]):
        """The rows of a collated batch, as a batch."""
        return batch[list(rows)]

    def preprocess(self, images: Sequence[Image.Image]):
        """Prepare and collate RGB images."""
        return self.collate([self.prepare(image) for image in images])

    # -- encoding -------------------------------------------------------------------------------
    @abstractmethod
    def encode_batch(self, batch, instructions: Sequence[str], *, precision: str | None = None) -> list[np.ndarray]:
        """One (N, dim) array per instruction for a collated batch (in ``precision``; None: this encoder's arithmetic)."""

    @abstractmethod
    def encode_texts(self, texts: Sequence[str], *, precision: str | None = None) -> np.ndarray:
        """Texts as query vectors, in batches."""

    def encode_pixels(self, batch, instruction: str = "", *, precision: str | None = None) -> np.ndarray:
        """A collated batch under one instruction."""
        return self.encode_batch(batch, [instruction], precision=precision)[0]

    def encode_images_under(self, images: Sequence[Image.Image], instructions: Sequence[str], *,
                            precision: str | None = None) -> list[np.ndarray]:
        """RGB images under each instruction, in batches: one (N, dim) array per instruction."""
        chunks = [self.encode_batch(self.preprocess(images[i : i + self.batch_size]), instructions, precision=precision)
                  for i in range(0, len(images), self.batch_size)]
        if not chunks:
            return [np.zeros((0, self.info.dim), np.float32) for _ in instructions]
        return [np.concatenate([chunk[k] for chunk in chunks]) for k in range(len(instructions))]

    def encode_images(self, images: Sequence[Image.Image], instruction: str = "", *, precision: str | None = None) -> np.ndarray:
        """RGB images under one instruction, in batches."""
        return self.encode_images_under(images, [instruction], precision=precision)[0]

    # -- unnormalised features: GeneCIS's official image+text baseline averages these -----------
    def raw_image_features(self, pixel_values) -> np.ndarray:
        raise UserError(f"the {self.info.encoder} encoder has no plain CLIP features; this baseline needs a CLIP checkpoint")

    def raw_text_features(self, texts: Sequence[str]) -> np.ndarray:
        raise UserError(f"the {self.info.encoder} encoder has no plain CLIP features; this baseline needs a CLIP checkpoint")

    # -- arithmetic -----------------------------------------------------------------------------
    def _autocast(self, dtype: torch.dtype | None):
        """One pass's arithmetic: autocast to ``dtype``, or None for the weights' own dtype."""
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def autocast_for(self, precision: str | None) -> torch.dtype | None:
        """The autocast dtype of a pass in ``precision`` ("float32" or "bfloat16"; None: this encoder's autocast_dtype).

        Only float32 weights can run either way (the CPU's bf16 autocast); other weights run as loaded.
        """
        if precision is None or precision == arithmetic_name(self.autocast_dtype, self.dtype):
            return self.autocast_dtype
        if self.dtype == torch.float32 and precision in ("float32", "bfloat16"):
            return None if precision == "float32" else torch.bfloat16
        raise ValueError(f"an encoder with {self.dtype} weights cannot run a pass in {precision!r}")


def _size_field(size, name: str) -> int | None:
    if size is None:
        return None
    return size.get(name) if isinstance(size, dict) else getattr(size, name, None)


def model_family(ref: ModelRef) -> str:
    """ "clip" or "mllm", from the checkpoint's config (model_type)."""
    from focalsearch.models.loading import family_of

    return family_of(load_config(ref))


def create_encoder(
    model: str | None = None,
    encoder: str = "auto",
    device: str = "auto",
    batch_size: int = 32,
    towers: str = "both",
    precision: str = "auto",
) -> ConditionalEncoder:
    """Load an encoder from a hub id or local folder (None = the default model).

    ``encoder`` "auto" follows the checkpoint's family; "mllm" asks for the MLLM family and the
    others for the CLIP family, and a checkpoint of the other family is a one-line error.
    """
    if encoder not in ENCODERS and encoder != "auto":
        raise UserError(f"unknown encoder {encoder!r}; use one of: auto, {', '.join(ENCODERS)}")
    ref = resolve_model(model)
    family = model_family(ref)
    if encoder == "mllm" and family != "mllm":
        raise UserError(f"model {ref.model_id} is a CLIP-family checkpoint, not a vision-language model; "
                        f"use --encoder {', '.join(CLIP_ENCODERS)} or auto")
    if family == "mllm":
        if encoder not in ("auto", "mllm"):
            raise UserError(f"model {ref.model_id} is a vision-language (MLLM) checkpoint; use --encoder mllm or auto")
        from focalsearch.models.mllm_family import MllmEncoder

        return MllmEncoder(ref, device=device, batch_size=batch_size, precision=precision)
    from focalsearch.models.clip_family import ClipFamilyEncoder

    return ClipFamilyEncoder(ref, encoder=encoder, device=device, batch_size=batch_size, towers=towers, precision=precision)
