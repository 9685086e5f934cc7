"""The model layer: the only part of FocalSearch that imports torch and transformers.

Attributes load lazily, so that resolving a model name does not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ENCODERS": "encoders",
    "ConditionalEncoder": "encoders",
    "CLIP_ENCODERS": "encoders",
    "EncoderInfo": "encoders",
    "create_encoder": "encoders",
    "needed_towers": "encoders",
    "pick_device": "encoders",
    "DEFAULT_MODEL": "loading",
    "MODEL_ENV_VAR": "loading",
    "ModelRef": "loading",
    "default_model": "loading",
    "resolve_model": "loading",
}
__all__ = [*_EXPORTS, "normalize_instruction"]

from focalsearch.instructions import normalize_instruction  # noqa: E402
from focalsearch.threads import prepare_environment  # noqa: E402

prepare_environment()  # before anything here imports torch (see focalsearch.threads)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"focalsearch.models.{_EXPORTS[name]}"), name)
    raise AttributeError(name)
