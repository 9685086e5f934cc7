"""Resolve a model name or path and load checkpoints of either encoder family (safetensors only)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from focalsearch.errors import ModelLoadError

# The paper's backbone. Plain CLIP checkpoints are served by the training-free `clip+text`
# encoder; pass a FocalLens-CLIP checkpoint (`focalsearch model init`, training) for conditioning.
DEFAULT_MODEL = "openai/clip-vit-large-patch14-336"
MODEL_ENV_VAR = "FOCALSEARCH_MODEL"
# Small checkpoints shipped inside the package (scripts/build_demo_models.py rebuilds them).
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "checkpoints"
BUNDLED_MODELS = ("demo", "demo-clip", "demo-mllm")

_OFFLINE_HINT = (
    "pass --model PATH to a local checkpoint folder "
    "(see README, 'Offline quick start')"
)


@dataclass(frozen=True)
class ModelRef:
    """Where a model comes from: ``location`` is what from_pretrained gets, ``model_id`` is recorded."""

    model_id: str
    location: str
    is_local: bool


def default_model() -> str:
    """The model used when none is named: $FOCALSEARCH_MODEL, else DEFAULT_MODEL."""
    return os.environ.get(MODEL_ENV_VAR) or DEFAULT_MODEL


def resolve_model(name_or_path: str | None) -> ModelRef:
    """Turn a hub id or a local folder into a ModelRef; local folders are recorded by absolute path."""
    name = name_or_path or default_model()
    if name in BUNDLED_MODELS:
        bundled = BUNDLED_DIR / name
        if not (bundled / "config.json").is_file():
            raise ModelLoadError(f"bundled model {name} is missing from this install; rebuild it with python scripts/build_demo_models.py")
        return ModelRef(model_id=name, location=str(bundled), is_local=True)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model folder {path} has no config.json; {_OFFLINE_HINT}")
        resolved = str(path.resolve())
        return ModelRef(model_id=resolved, location=resolved, is_local=True)
    # A hub id is "name" or "owner/name"; anything else can only have meant a local folder.
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"model folder {name} does not exist; {_OFFLINE_HINT}")
    return ModelRef(model_id=name, location=name, is_local=False)


def _hub_reachable() -> bool:
    """Whether the model hub answers at all; without this, an offline load retries for half a minute."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


def _load_options(ref: ModelRef) -> dict:
    return {} if ref.is_local or _hub_reachable() else {"local_files_only": True}


def load_config(ref: ModelRef, options: dict | None = None):
    """Load the checkpoint's config (CLIPConfig or FocalLensCLIPConfig)."""
    from transformers import AutoConfig

    import focalsearch.models.focallens_clip  # noqa: F401  (registers the model type)

    try:
        return AutoConfig.from_pretrained(ref.location, **(options if options is not None else _load_options(ref)))
    except Exception as exc:  # transformers/hub raise many kinds; all mean "cannot load"
        raise ModelLoadError(_cannot_load(ref, exc)) from exc


TOWERS = ("both", "text", "vision")


def quiet_transformers() -> None:
    """Keep transformers' own progress bars ("Loading weights") and notices off stderr.

    Loading a checkpoint is not news to a user of a search tool; our own progress bars stay.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# Image preprocessing runs on PIL images (as the original CLIP's does), whether or not torchvision is
# installed: the same arithmetic for an index and its queries on any machine, and no transformers
# notice about which backend it fell back to.
IMAGE_PROCESSOR_BACKEND = "pil"


def _image_processor(ref: ModelRef, options: dict):
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(ref.location, backend=IMAGE_PROCESSOR_BACKEND, **options)


def load_image_processor(name_or_path: str | None):
    """Only the image processor of a checkpoint (resize, crop, normalise), for decode workers."""
    quiet_transformers()
    ref = resolve_model(name_or_path)
    try:
        return _image_processor(ref, _load_options(ref))
    except Exception as exc:
        raise ModelLoadError(_cannot_load(ref, exc)) from exc


def load_clip_family(ref: ModelRef, towers: str = "both"):
    """Load model, tokenizer and image processor; the model is a CLIPModel or FocalLensCLIPModel.

    ``towers="text"`` or ``"vision"`` loads only that tower with its projection (a
    CLIPTextModelWithProjection or CLIPVisionModelWithProjection holding the same weights), which
    is all a text query, or a plain image query, needs.
    """
    from transformers import AutoTokenizer, CLIPModel

    from focalsearch.models.focallens_clip import FocalLensCLIPConfig, FocalLensCLIPModel

    if towers not in TOWERS:
        raise ValueError(f"towers must be one of {TOWERS}, not {towers!r}")
    quiet_transformers()
    options = _load_options(ref)
    config = load_config(ref, options)
    if isinstance(config, FocalLensCLIPConfig):
        model_class = FocalLensCLIPModel
    elif config.model_type == "clip":
        model_class = CLIPModel
    else:
        raise ModelLoadError(
            f"model {ref.model_id} is a '{config.model_type}' checkpoint; "
            "FocalSearch needs a CLIP, FocalLens-CLIP or vision-language (LLaVA-style) checkpoint"
        )
    try:
        if towers == "both":
            model = model_class.from_pretrained(ref.location, use_safetensors=True, **options)
        else:
            model = _load_tower(ref, config, towers, options)
        tokenizer = AutoTokenizer.from_pretrained(ref.location, **options)
        processor = _image_processor(ref, options)
    except Exception as exc:
        raise ModelLoadError(_cannot_load(ref, exc)) from exc
    return model.eval(), tokenizer, processor


def family_of(config) -> str:
    """The encoder family a checkpoint belongs to: "clip" (CLIP, FocalLens-CLIP) or "mllm" (a vision-language
    model that transformers loads with AutoModelForImageTextToText: LLaVA, SmolVLM, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from focalsearch.models.focallens_clip import FocalLensCLIPConfig

    if isinstance(config, FocalLensCLIPConfig) or config.model_type == "clip":
        return "clip"
    if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return "mllm"
    return "unknown"


# Vision-language families whose reading the MLLM encoder would change: it packs every instruction
# behind the image prefix under its own causal block mask, with positions restarting after the prefix.
UNSUPPORTED_MLLMS = {
    "qwen2_vl": "its 3-D rotary positions are computed over the whole sequence",
    "qwen2_5_vl": "its 3-D rotary positions are computed over the whole sequence",
    "qwen3_vl": "its 3-D rotary positions are computed over the whole sequence",
    "paligemma": "its image and prompt attend to each other both ways, not causally",
    "gemma3": "its image tokens attend to each other both ways, not causally",
}


# A FocalLens-trained MLLM keeps its projection head beside the transformers checkpoint, which stays
# loadable as the plain vision-language model it was.
MLLM_HEAD_FILE = "focallens_head.safetensors"


def load_mllm_family(ref: ModelRef):
    """Load a vision-language checkpoint: (model, processor, head weights or None).

    The model is whatever AutoModelForImageTextToText maps its config to; the processor brings the
    tokenizer, the image processor and the chat template.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.utils import cached_file

    quiet_transformers()
    options = _load_options(ref)
    config = load_config(ref, options)
    if family_of(config) != "mllm":
        raise ModelLoadError(f"model {ref.model_id} is a '{config.model_type}' checkpoint, not a vision-language model "
                             "that transformers' AutoModelForImageTextToText loads")
    if config.model_type in UNSUPPORTED_MLLMS:
        raise ModelLoadError(f"model {ref.model_id} is a '{config.model_type}' checkpoint, which the MLLM encoder does not "
                             f"support yet: {UNSUPPORTED_MLLMS[config.model_type]}")
    try:
        model = AutoModelForImageTextToText.from_pretrained(ref.location, use_safetensors=True, **options)
        processor = AutoProcessor.from_pretrained(ref.location, backend=IMAGE_PROCESSOR_BACKEND, **options)
        head_file = cached_file(ref.location, MLLM_HEAD_FILE, _raise_exceptions_for_missing_entries=False, **options)
    except Exception as exc:
        raise ModelLoadError(_cannot_load(ref, exc)) from exc
    if getattr(processor, "chat_template", None) is None:
        raise ModelLoadError(f"model {ref.model_id} has no chat template; FocalSearch reads images and instructions through it")
    head = None
    if head_file:
        from safetensors.torch import load_file

        head = load_file(head_file)
    return model.eval(), processor, head


def _load_tower(ref: ModelRef, config, tower: str, options: dict):
    """One tower of a CLIP-family checkpoint; the other tower's weights are left on disk."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModelWithProjection
    from transformers.utils import logging as hf_logging

    if tower == "text":
        model_class, tower_config = CLIPTextModelWithProjection, CLIPTextConfig(**config.text_config.to_dict())
    else:
        model_class, tower_config = CLIPVisionModelWithProjection, CLIPVisionConfig(**config.vision_config.to_dict())
    tower_config.projection_dim = config.projection_dim
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the other tower's weights are "unexpected" on purpose
    try:
        model, info = model_class.from_pretrained(
            ref.location, config=tower_config, use_safetensors=True, output_loading_info=True, **options
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    if info.get("missing_keys"):
        raise ModelLoadError(f"model {ref.model_id} lacks {tower} tower weights: {sorted(info['missing_keys'])[:3]}")
    return model


def _cannot_load(ref: ModelRef, exc: Exception) -> str:
    if not ref.is_local and not _hub_reachable():
        return f"cannot load model {ref.model_id}: the model hub is unreachable (offline) and it is not in the local cache; {_OFFLINE_HINT}"
    reason = " ".join(str(exc).split())[:200] or type(exc).__name__
    where = "local folder" if ref.is_local else "hub id"
    return f"cannot load model {ref.model_id} ({where}): {reason}; {_OFFLINE_HINT}"
