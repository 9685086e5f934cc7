"""The model layer: the only part of FocalSearch that imports torch and transformers."""

from focalsearch.models.encoders import (
    ENCODERS,
    ConditionalEncoder,
    EncoderInfo,
    create_encoder,
    normalize_instruction,
    pick_device,
)
from focalsearch.models.loading import DEFAULT_MODEL, MODEL_ENV_VAR, ModelRef, default_model, resolve_model

__all__ = [
    "DEFAULT_MODEL",
    "ENCODERS",
    "MODEL_ENV_VAR",
    "ConditionalEncoder",
    "EncoderInfo",
    "ModelRef",
    "create_encoder",
    "default_model",
    "normalize_instruction",
    "pick_device",
    "resolve_model",
]
