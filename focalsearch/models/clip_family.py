"""The CLIP family of encoders: FocalLens-CLIP and the plain-CLIP baselines (design §2)."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from focalsearch.errors import UserError
from focalsearch.instructions import normalize_instruction
from focalsearch.models.encoders import (
    CLIP_ENCODERS,
    ConditionalEncoder,
    EncoderInfo,
    compute_dtypes,
    l2_normalize,
    pick_device,
)
from focalsearch.models.focallens_clip import FocalLensCLIPConfig, FocalLensCLIPModel
from focalsearch.models.loading import ModelRef, load_clip_family, load_config


class ClipFamilyEncoder(ConditionalEncoder):
    """The CLIP family: encodes images under an instruction, and texts, with one CLIP-style checkpoint.

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
        if encoder not in CLIP_ENCODERS:
            raise UserError(f"model {ref.model_id} is a CLIP-family checkpoint; use --encoder {', '.join(CLIP_ENCODERS)}, not {encoder!r}")
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

    @property
    def reads_instruction(self) -> bool:
        return self.info.encoder != "clip"

    # -- inputs -------------------------------------------------------------------------------
    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Resize, crop and normalise RGB images into a (N, 3, H, W) float32 tensor."""
        return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    def prepare(self, image: Image.Image) -> torch.Tensor:
        return self.preprocess([image])[0]

    def collate(self, items: Sequence[torch.Tensor]) -> torch.Tensor:
        pixels = torch.stack(list(items))
        if self.device.type == "cuda":  # one pinned, asynchronous copy per batch, shared by every instruction
            pixels = pixels.pin_memory().to(self.device, non_blocking=True)
        return pixels

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
    def encode_batch(self, batch: torch.Tensor, instructions: Sequence[str], *, precision: str | None = None) -> list[np.ndarray]:
        """Encode a preprocessed batch under each instruction; the plain image embedding that clip and
        clip+text start from is computed once for all of them."""
        self._require("vision")
        autocast = self.autocast_for(precision)
        pixels = batch.to(self.device, dtype=self.dtype, non_blocking=True)
        plain = None
        out = []
        for instruction in map(normalize_instruction, instructions):
            conditioned = bool(instruction) and self.info.encoder != "clip"
            read = self._instruction_features(instruction, autocast) if conditioned else None  # tokens, or a text embedding
            if conditioned and self.info.encoder == "focallens":
                with self._autocast(autocast):
                    features = l2_normalize(self.model.conditional_image_features(pixels, read))
            else:
                if plain is None:
                    with self._autocast(autocast):
                        plain = l2_normalize(self._image_features(pixels))
                features = l2_normalize(plain + read[None, :]) if conditioned else plain
            out.append(features.cpu().numpy().astype(np.float32, copy=False))
        return out

    @torch.inference_mode()
    def _text_features(self, texts: Sequence[str], autocast: torch.dtype | None) -> torch.Tensor:
        tokens = self._tokenize(texts)
        with self._autocast(autocast):
            if self.towers == "text":
                return l2_normalize(self.model(**tokens).text_embeds)
            return l2_normalize(self.model.get_text_features(**tokens).pooler_output)

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
