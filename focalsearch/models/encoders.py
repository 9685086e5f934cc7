"""The ConditionalEncoder interface and its CLIP-family implementations."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from focalsearch.defaults import PRECISIONS
from focalsearch.errors import UserError
from focalsearch.instructions import normalize_instruction
from focalsearch.models.focallens_clip import FocalLensCLIPConfig, FocalLensCLIPModel
from focalsearch.models.loading import ModelRef, load_clip_family, load_config, resolve_model

ENCODERS = ("focallens", "clip", "clip+text")


@dataclass(frozen=True)
class EncoderInfo:
    """What produced a set of vectors: recorded with every condition and shown to users."""

    encoder: str
    model: str
    dim: int


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
    if not image_query:
        return "text"
    return "vision" if encoder == "clip" or not normalize_instruction(instruction) else "both"


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


class ConditionalEncoder:
    """Encodes images under an instruction, and texts, into L2-normalised float32 vectors.

    ``encoder`` picks how the instruction is used:
    - ``focallens``: instruction tokens join the ViT's sequence (FocalLens-CLIP checkpoints);
    - ``clip``: the instruction is ignored;
    - ``clip+text``: normalised mean of the image and the instruction's text embedding.
    An empty instruction always gives the plain CLIP image embedding.

    ``towers`` ("both", "text" or "vision") loads only what a caller needs (see needed_towers);
    asking a one-tower encoder for the other tower's work is a programming error.
    """

    def __init__(
        self,
        ref: ModelRef,
        encoder: str = "auto",
        device: str = "auto",
        batch_size: int = 32,
        towers: str = "both",
        precision: str = "auto",
    ):
        self.device = pick_device(device)
        self.dtype, self.autocast_dtype = compute_dtypes(self.device, precision)
        model, tokenizer, processor = load_clip_family(ref, towers)
        if towers == "both":
            is_focallens = isinstance(model, FocalLensCLIPModel)
        else:
            is_focallens = isinstance(load_config(ref), FocalLensCLIPConfig)
        self.towers = towers
        if encoder == "auto":
            encoder = "focallens" if is_focallens else "clip+text"
        if encoder not in ENCODERS:
            raise UserError(f"unknown encoder {encoder!r}; use one of: auto, {', '.join(ENCODERS)}")
        if encoder == "focallens" and not is_focallens:
            raise UserError(
                f"model {ref.model_id} is a plain CLIP checkpoint; use --encoder clip or clip+text, "
                "or turn it into FocalLens-CLIP with `focalsearch model init`"
            )
        self.model = model.to(self.device, dtype=self.dtype)
        self.tokenizer = tokenizer
        self.image_processor = processor
        self.batch_size = batch_size
        self.info = EncoderInfo(encoder=encoder, model=ref.model_id, dim=model.config.projection_dim)
        text_config = model.config if towers == "text" else getattr(model.config, "text_config", None)
        self._max_text_length = text_config.max_position_embeddings if text_config is not None else 0
        # (instruction, autocast dtype) -> its tokens (focallens) or text embedding (clip+text)
        self._instruction_cache: dict[tuple[str, torch.dtype | None], torch.Tensor] = {}
        self._lock = threading.Lock()

    # -- inputs -------------------------------------------------------------------------------
    @property
    def min_decode_side(self) -> int:
        """The smallest side an image may be decoded at without changing what preprocessing keeps."""
        size, crop = self.image_processor.size, getattr(self.image_processor, "crop_size", None)
        sides = [getattr(size, "shortest_edge", None), getattr(size, "height", None), getattr(size, "width", None)]
        if crop is not None:
            sides += [getattr(crop, "height", None), getattr(crop, "width", None)]
        return max(s for s in sides if s)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Resize, crop and normalise RGB images into a (N, 3, H, W) float32 tensor."""
        return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    def _tokenize(self, texts: Sequence[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        self._require("text")
        limit = self._max_text_length
        tokens = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=min(max_length or limit, limit),
            return_tensors="pt",
        )
        return {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}

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

    def _require(self, tower: str) -> None:
        if self.towers not in ("both", tower):
            raise RuntimeError(f"this encoder was loaded with the {self.towers} tower only; it cannot use the {tower} tower")

    # -- instruction features, computed once per instruction ----------------------------------
    def _instruction_features(self, instruction: str, autocast: torch.dtype | None):
        self._require("text")
        key = (instruction, autocast)  # kept per arithmetic, so that a float32 pass reads float32 features
        with self._lock:
            if key not in self._instruction_cache:
                if self.info.encoder == "focallens":
                    tokens = self._tokenize([instruction], self.model.config.instruction_max_length)
                    keep = tokens["attention_mask"][0].bool()
                    ids = tokens["input_ids"][:, keep]
                    with self._autocast(autocast):
                        self._instruction_cache[key] = self.model.instruction_tokens(ids)
                else:
                    self._instruction_cache[key] = self._text_features([instruction], autocast)[0]
            return self._instruction_cache[key]

    # -- encoding -------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_pixels(self, pixel_values: torch.Tensor, instruction: str = "", *, precision: str | None = None) -> np.ndarray:
        """Encode a preprocessed batch under one instruction (in ``precision``; None: this encoder's arithmetic)."""
        self._require("vision")
        autocast = self.autocast_for(precision)
        instruction = normalize_instruction(instruction)
        pixels = pixel_values.to(self.device, dtype=self.dtype, non_blocking=True)
        conditioned = bool(instruction) and self.info.encoder != "clip"
        read = self._instruction_features(instruction, autocast) if conditioned else None  # tokens, or a text embedding
        with self._autocast(autocast):
            if conditioned and self.info.encoder == "focallens":
                features = _l2_normalize(self.model.conditional_image_features(pixels, read))
            else:
                features = _l2_normalize(self._image_features(pixels))
        if conditioned and self.info.encoder == "clip+text":
            features = _l2_normalize(features + read[None, :])
        return features.cpu().numpy().astype(np.float32, copy=False)

    def encode_images(self, images: Sequence[Image.Image], instruction: str = "", *, precision: str | None = None) -> np.ndarray:
        """Encode RGB images under an instruction, in batches (in ``precision``; None: this encoder's arithmetic)."""
        chunks = [
            self.encode_pixels(self.preprocess(images[i : i + self.batch_size]), instruction, precision=precision)
            for i in range(0, len(images), self.batch_size)
        ]
        return np.concatenate(chunks) if chunks else np.zeros((0, self.info.dim), np.float32)

    @torch.inference_mode()
    def _text_features(self, texts: Sequence[str], autocast: torch.dtype | None) -> torch.Tensor:
        tokens = self._tokenize(texts)
        with self._autocast(autocast):
            if self.towers == "text":
                return _l2_normalize(self.model(**tokens).text_embeds)
            return _l2_normalize(self.model.get_text_features(**tokens).pooler_output)

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.towers == "vision":
            return self.model(pixel_values=pixels).image_embeds
        return self.model.get_image_features(pixel_values=pixels).pooler_output

    def encode_texts(self, texts: Sequence[str], *, precision: str | None = None) -> np.ndarray:
        """Encode texts with the text tower, in batches (in ``precision``; None: this encoder's arithmetic)."""
        autocast = self.autocast_for(precision)
        chunks = [
            self._text_features(texts[i : i + self.batch_size], autocast).cpu().numpy()
            for i in range(0, len(texts), self.batch_size)
        ]
        return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros((0, self.info.dim), np.float32)

    # -- unnormalised features: GeneCIS's official image+text baseline averages these -----------
    @torch.inference_mode()
    def raw_image_features(self, pixel_values: torch.Tensor) -> np.ndarray:
        """Plain CLIP image embeddings of a preprocessed batch, before L2 normalisation (no instruction)."""
        self._require("vision")
        pixels = pixel_values.to(self.device, dtype=self.dtype)
        with self._autocast(self.autocast_dtype):
            features = self._image_features(pixels)
        return features.float().cpu().numpy()

    @torch.inference_mode()
    def raw_text_features(self, texts: Sequence[str]) -> np.ndarray:
        """Plain CLIP text embeddings, before L2 normalisation."""
        tokens = self._tokenize(texts)
        with self._autocast(self.autocast_dtype):
            if self.towers == "text":
                features = self.model(**tokens).text_embeds
            else:
                features = self.model.get_text_features(**tokens).pooler_output
        return features.float().cpu().numpy()


def create_encoder(
    model: str | None = None,
    encoder: str = "auto",
    device: str = "auto",
    batch_size: int = 32,
    towers: str = "both",
    precision: str = "auto",
) -> ConditionalEncoder:
    """Load a ConditionalEncoder from a hub id or local folder (None = the default model)."""
    return ConditionalEncoder(
        resolve_model(model), encoder=encoder, device=device, batch_size=batch_size, towers=towers, precision=precision
    )
