"""The MLLM family: a LLaVA-style vision-language model as a conditional encoder (FocalLens-MLLM, design §2).

The model reads the image, then the instruction, then an ask for a one-word answer, through the
checkpoint's own chat template. The embedding is the final hidden state of the last prompt token,
L2-normalised (through the learned head of a FocalLens-trained checkpoint). A text is read alone with
a matching "in one word" prompt.

The image comes before the instruction, so the vision tower, the projector and the language model's
pass over that prefix are computed once per image batch: every instruction's own few tokens follow the
prefix in the same row, each behind a block mask that shows it the prefix and itself only.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from focalsearch.instructions import normalize_instruction
from focalsearch.models.encoders import ConditionalEncoder, EncoderInfo, compute_dtypes, l2_normalize, pick_device
from focalsearch.models.loading import ModelRef, load_mllm_family
from focalsearch.models.mllm_prompts import DEFAULT_TEMPLATES, PromptTemplates

_SLOT = "\x00focalsearch-user-text\x00"


def templates_of(config) -> PromptTemplates:
    """The checkpoint's prompt templates (a FocalLens-trained one records those it was trained with), else the defaults."""
    recorded = getattr(config, "focallens_prompts", None)
    return PromptTemplates.from_dict(recorded) if recorded else DEFAULT_TEMPLATES


class PromptBuilder:
    """Renders the chat template once and splits it into the image prefix and the per-request user text."""

    def __init__(self, processor, templates: PromptTemplates):
        self.processor, self.tokenizer, self.templates = processor, processor.tokenizer, templates
        image_chat = self._render([{"type": "image"}, {"type": "text", "text": _SLOT}])
        self.image_prefix, self.image_tail = image_chat.split(_SLOT)
        self.text_head, self.text_tail = self._render([{"type": "text", "text": _SLOT}]).split(_SLOT)
        bos = self.tokenizer.bos_token
        # A template that writes BOS itself must not get a second one from the tokenizer.
        self.add_special_tokens = not (bos and image_chat.startswith(bos))

    def _render(self, content: list[dict]) -> str:
        messages = [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def image_suffix(self, instruction: str) -> str:
        return self.templates.image_prompt(instruction) + self.image_tail

    def text_chat(self, text: str) -> str:
        return self.text_head + self.templates.text_prompt(text) + self.text_tail

    def prefix_inputs(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """The image prefix of every image, left-padded where images give different numbers of tokens."""
        return dict(self.processor(text=[self.image_prefix] * len(images), images=list(images), return_tensors="pt",
                                   padding=True, padding_side="left", add_special_tokens=self.add_special_tokens))

    def suffix_tokens(self, instructions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Each instruction's own tokens, right-padded (a causal model never reads a later pad)."""
        return dict(self.tokenizer([self.image_suffix(i) for i in instructions], return_tensors="pt", padding=True,
                                   padding_side="right", add_special_tokens=False))

    def text_tokens(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer([self.text_chat(t) for t in texts], return_tensors="pt", padding=True,
                                   padding_side="right", add_special_tokens=self.add_special_tokens))


def last_states(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The state of each row's last real token (rows are right-padded)."""
    last = mask.long().sum(dim=1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]


class MllmEncoder(ConditionalEncoder):
    """A vision-language checkpoint (AutoModelForImageTextToText) read as a conditional encoder.

    ``reuse_prefix`` False runs every instruction over the whole sequence: the reference that prefix
    reuse must equal, and the baseline it is measured against. ``loaded``: (model, processor, head or
    None) already in memory instead of read from ``ref`` (a benchmark's random model of a real shape).
    """

    def __init__(self, ref: ModelRef, device: str = "auto", batch_size: int = 32, precision: str = "auto",
                 reuse_prefix: bool = True, loaded: tuple | None = None):
        self.device = pick_device(device)
        self.dtype, self.autocast_dtype = compute_dtypes(self.device, precision)
        model, processor, head = loaded or load_mllm_family(ref)
        self.model = model.to(self.device, dtype=self.dtype)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.templates = templates_of(model.config)
        self.prompts = PromptBuilder(processor, self.templates)
        self.head = None
        if head is not None:
            self.head = torch.nn.Linear(head["weight"].shape[1], head["weight"].shape[0], bias="bias" in head)
            self.head.load_state_dict(head)
            self.head.to(self.device, dtype=self.dtype).eval()
        width = model.config.get_text_config().hidden_size
        dim = self.head.out_features if self.head is not None else width
        self.info = EncoderInfo(encoder="mllm", model=ref.model_id, dim=dim, prompts=self.templates.to_json())
        self.batch_size = batch_size
        self.towers = "both"
        self.reuse_prefix = reuse_prefix
        self._lock = threading.Lock()  # the processor's tokenizer is not safe to share between threads

    @property
    def language_model(self):
        """The part of the model that returns last_hidden_state (no vocabulary logits)."""
        return self.model.model

    # -- inputs ---------------------------------------------------------------------------------
    def prepare(self, image: Image.Image) -> Image.Image:
        # The checkpoint's processor decides the image tokens together with the prompt, so it runs at encode time.
        return image

    def collate(self, items: Sequence[Image.Image]) -> list[Image.Image]:
        return list(items)

    def select(self, batch: list[Image.Image], rows: Sequence[int]) -> list[Image.Image]:
        return [batch[i] for i in rows]

    def _on_device(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in inputs.items():
            value = value.to(self.device)
            out[key] = value.to(self.dtype) if value.is_floating_point() else value
        return out

    def _project(self, states: torch.Tensor) -> torch.Tensor:
        if self.head is not None:
            states = self.head(states.to(self.head.weight.dtype))
        return l2_normalize(states)

    # -- encoding -------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_batch(self, batch: Sequence[Image.Image], instructions: Sequence[str], *, precision: str | None = None) -> list[np.ndarray]:
        instructions = [normalize_instruction(i) for i in instructions]
        if not len(batch):
            return [np.zeros((0, self.info.dim), np.float32) for _ in instructions]
        autocast = self.autocast_for(precision)
        with self._lock:
            prefix = self._on_device(self.prompts.prefix_inputs(batch))
            suffix = self._on_device(self.prompts.suffix_tokens(instructions))
        with self._autocast(autocast):
            if self.reuse_prefix:
                states = self._with_prefix_reuse(prefix, suffix)
            else:
                states = torch.stack([self._whole(prefix, suffix, k) for k in range(len(instructions))], dim=1)
            vectors = self._project(states)  # (images, instructions, dim)
        vectors = vectors.float().cpu().numpy()
        return [np.ascontiguousarray(vectors[:, k]) for k in range(len(instructions))]

    def _with_prefix_reuse(self, prefix: dict, suffix: dict) -> torch.Tensor:
        """(images, instructions, width): one pass over each image's prefix followed by every instruction's
        tokens, packed into one row. A block mask lets each instruction see the prefix and itself only, and
        its positions restart where the prefix ends, so each reads exactly as if it were alone after the image.

        Packing shares the prefix without copying its keys and values per instruction (expanding a
        prefix cache along the batch copies them, and costs a second pass).
        """
        images, width = prefix["input_ids"].shape
        lengths = suffix["attention_mask"].sum(dim=1).tolist()
        if len(lengths) == 1:  # nothing to share: the plain causal pass is the fastest
            return self._whole(prefix, suffix, 0)[:, None]
        device = prefix["input_ids"].device
        ids, positions, ends = [prefix["input_ids"]], [torch.arange(width, device=device)], []
        allowed = [torch.ones(width, width, dtype=torch.bool, device=device).tril()]
        for k, length in enumerate(lengths):
            ids.append(suffix["input_ids"][k : k + 1, :length].expand(images, length))
            positions.append(width + torch.arange(length, device=device))
            ends.append(width + sum(lengths[: k + 1]) - 1)
        total = width + sum(lengths)
        mask = torch.zeros(total, total, dtype=torch.bool, device=device)
        mask[:width, :width] = allowed[0]
        start = width
        for length in lengths:
            mask[start : start + length, :width] = True
            mask[start : start + length, start : start + length] = torch.ones(length, length, dtype=torch.bool, device=device).tril()
            start += length
        keys = torch.cat([prefix["attention_mask"].bool(), torch.ones(images, total - width, dtype=torch.bool, device=device)], dim=1)
        mask = (mask[None, None] & keys[:, None, None, :]) | torch.eye(total, dtype=torch.bool, device=device)  # a pad sees itself
        additive = torch.zeros(mask.shape, dtype=self.dtype, device=device).masked_fill_(~mask, torch.finfo(self.dtype).min)
        inputs = {**prefix, "input_ids": torch.cat(ids, dim=1), "attention_mask": additive,
                  "position_ids": torch.cat(positions)[None].expand(images, total)}
        hidden = self.language_model(**inputs, use_cache=False).last_hidden_state
        return hidden[:, ends]

    def _whole(self, prefix: dict, suffix: dict, k: int) -> torch.Tensor:
        """(images, width): instruction k read with the image in one pass over the whole sequence."""
        images = prefix["input_ids"].shape[0]
        ids = suffix["input_ids"][k : k + 1].repeat(images, 1)
        mask = suffix["attention_mask"][k : k + 1].repeat(images, 1)
        inputs = {**prefix, "input_ids": torch.cat([prefix["input_ids"], ids], dim=1),
                  "attention_mask": torch.cat([prefix["attention_mask"], mask], dim=1)}
        hidden = self.language_model(**inputs, use_cache=False).last_hidden_state[:, prefix["input_ids"].shape[1]:]
        return last_states(hidden, mask)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], *, precision: str | None = None) -> np.ndarray:
        autocast = self.autocast_for(precision)
        chunks = []
        for i in range(0, len(texts), self.batch_size):
            with self._lock:
                tokens = self._on_device(self.prompts.text_tokens(texts[i : i + self.batch_size]))
            with self._autocast(autocast):
                hidden = self.language_model(**tokens, use_cache=False).last_hidden_state
                chunks.append(self._project(last_states(hidden, tokens["attention_mask"])).float().cpu().numpy())
        return np.concatenate(chunks) if chunks else np.zeros((0, self.info.dim), np.float32)
