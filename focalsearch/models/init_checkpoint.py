"""`focalsearch model init`: turn a CLIP checkpoint into a FocalLens-CLIP checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPModel

from focalsearch.errors import ModelLoadError, UserError
from focalsearch.models.focallens_clip import FocalLensCLIPConfig, FocalLensCLIPModel
from focalsearch.models.loading import load_clip_family, resolve_model
from focalsearch.models.saving import write_checkpoint

_CONDITIONING_KEYS = {"instruction_projection.weight", "instruction_projection.bias"}


def focallens_from_clip(model: CLIPModel, *, instruction_max_length: int = 32, seed: int = 0) -> FocalLensCLIPModel:
    """A FocalLens-CLIP model holding a CLIP model's weights and a fresh instruction projection."""
    fields = {k: v for k, v in model.config.to_dict().items() if k not in ("model_type", "architectures")}
    config = FocalLensCLIPConfig(**fields, instruction_max_length=instruction_max_length)
    torch.manual_seed(seed)
    focal = FocalLensCLIPModel(config)
    missing, unexpected = focal.load_state_dict(model.state_dict(), strict=False)
    if set(missing) != _CONDITIONING_KEYS or unexpected:
        raise ModelLoadError(f"the base model does not have CLIP's weight layout (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return focal.eval()


def init_focallens_checkpoint(
    base: str, out: str | Path, *, instruction_max_length: int = 32, seed: int = 0, overwrite: bool = False
) -> Path:
    """Copy a CLIP checkpoint's weights into FocalLens-CLIP with a fresh (untrained) instruction projection.

    The result's unconditional image embedding equals the base model's exactly. A failed run
    leaves no half checkpoint.
    """
    out = Path(out).expanduser().resolve()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} already exists and is not empty; pick another folder or pass --overwrite")
    model, tokenizer, processor = load_clip_family(resolve_model(base))
    if isinstance(model, FocalLensCLIPModel):
        raise UserError(f"{base} is already a FocalLens-CLIP checkpoint")
    focal = focallens_from_clip(model, instruction_max_length=instruction_max_length, seed=seed)
    write_checkpoint(out, focal, tokenizer, processor)
    return out
