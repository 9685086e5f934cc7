"""FocalLens-MLLM training (design §2): the instruction objective for a vision-language checkpoint.

The (image, instruction) vector is the final state of the prompt's last token, read exactly as
MllmEncoder reads it (the checkpoint's chat template through PromptBuilder), through a learned head
and L2-normalised. The answer's vector is the same language model's reading of the answer under the
text prompt, through the same head. The two meet in the multi-positive InfoNCE of the CLIP family
(learnable temperature, optional same-answer image term and caption term), and gradients reach both
sides, since one language model reads both.

Trained: the head and the temperature; the language model and the projector (full fine-tuning), or
LoRA adapters on the language model's attention and MLP projections plus the projector
(``lora_rank`` > 0). The vision tower stays frozen unless ``train_vision``. The head starts as the
identity, so training starts from the prompted-only embedding.

The finished checkpoint is a plain transformers checkpoint (LoRA merged into the weights) with
``focallens_head.safetensors`` and the prompt templates in its config. The resume state holds only
what trains (adapters included) and the optimizer, in safetensors; the rest comes from the base.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from focalsearch.errors import UserError
from focalsearch.instructions import normalize_instruction
from focalsearch.models.encoders import inference_dtype, pick_device
from focalsearch.models.loading import MLLM_HEAD_FILE, ModelRef, load_mllm_family
from focalsearch.models.mllm_family import PromptBuilder, last_states, templates_of
from focalsearch.models.saving import write_checkpoint, write_folder
from focalsearch.train import distributed
from focalsearch.train.data import TrainingBatch
from focalsearch.train.distributed import Ranks
from focalsearch.train.loop import (
    TrainOptions, _dedupe, decay_groups, load_optimizer_tensors, multi_positive_clip_loss, optimizer_step,
    optimizer_tensors, same_answer_image_loss,
)

TRAINABLE_FILE = "trainable.safetensors"
# The language model's attention and MLP projections (Llama, Mistral, Qwen2 and most others name them so).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION_PARTS = ("vision_tower", "vision_model")  # LLaVA-style, Idefics3/SmolVLM
CLIP_ONLY = {"train_text": "--train-text", "text_steps": "--text-steps", "text_anchor_weight": "--text-anchor-weight",
             "next_token_weight": "--next-token-weight"}


def parts(mllm) -> tuple[torch.nn.Module, torch.nn.Module, list[torch.nn.Module]]:
    """(vision tower, language model, the rest: projector or connector) of a vision-language model."""
    inner = mllm.model
    language = inner.get_decoder()
    vision = next((getattr(inner, name) for name in VISION_PARTS if hasattr(inner, name)), None)
    if vision is None:
        raise UserError(f"cannot find the vision tower of this {type(mllm).__name__} (looked for {', '.join(VISION_PARTS)})")
    rest = [child for child in inner.children() if child is not language and child is not vision]
    return vision, language, rest


def make_head(width: int, dim: int | None, seed: int) -> torch.nn.Linear:
    """A head that starts as the identity (dim = width), or as an orthogonal map onto ``dim`` coordinates."""
    dim = dim or width
    head = torch.nn.Linear(width, dim)
    with torch.no_grad():
        head.bias.zero_()
        if dim == width:
            head.weight.copy_(torch.eye(width))
        else:
            torch.nn.init.orthogonal_(head.weight, generator=torch.Generator().manual_seed(seed))
    return head


def _checkpointing(mllm, on: bool) -> None:
    """Recompute activations in the backward pass (transformers 5.25 renamed gradient_ to activation_checkpointing)."""
    prefix = "activation" if hasattr(mllm, "activation_checkpointing_enable") else "gradient"
    if on:
        getattr(mllm, f"{prefix}_checkpointing_enable")({"use_reentrant": False})
    else:
        getattr(mllm, f"{prefix}_checkpointing_disable")()


class FocalLensMllm(torch.nn.Module):
    """The vision-language model with the FocalLens head and temperature: vectors with gradients."""

    def __init__(self, mllm, head: torch.nn.Linear):
        super().__init__()
        self.mllm, self.head = mllm, head
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def project(self, states: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(states.to(self.head.weight.dtype)).float(), dim=-1)

    def image_vectors(self, prefix: dict[str, torch.Tensor], suffix: dict[str, torch.Tensor]) -> torch.Tensor:
        """Row i: image i under instruction i, read in one pass over prefix and suffix, as the encoder does."""
        length = prefix["input_ids"].shape[1]
        inputs = {**prefix, "input_ids": torch.cat([prefix["input_ids"], suffix["input_ids"]], dim=1),
                  "attention_mask": torch.cat([prefix["attention_mask"], suffix["attention_mask"]], dim=1)}
        hidden = self.mllm.model(**inputs, use_cache=False).last_hidden_state[:, length:]
        return self.project(last_states(hidden, suffix["attention_mask"]))

    def text_vectors(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.mllm.model(**tokens, use_cache=False).last_hidden_state
        return self.project(last_states(hidden, tokens["attention_mask"]))


class MllmTrainer:
    """Trains a FocalLensMllm; the interface loop.py's family-agnostic loop drives (prepare, step, save)."""

    def __init__(self, ref: ModelRef, options: TrainOptions, ranks: Ranks = Ranks(), resume: Path | None = None):
        for name, flag in CLIP_ONLY.items():
            if getattr(options, name) != getattr(TrainOptions, name):
                raise UserError(f"{flag} applies to the CLIP family; {ref.model_id} is a vision-language (MLLM) checkpoint, "
                                "whose language model reads both instructions and answers")
        self.ref, self.options, self.ranks = ref, options, ranks
        mllm, processor, head_tensors = load_mllm_family(ref)
        self.processor, self.tokenizer = processor, processor.tokenizer
        self.templates = templates_of(mllm.config)
        self.prompts = PromptBuilder(processor, self.templates)
        self._lock = threading.Lock()  # the tokenizer is shared by the prefetch thread and the loss
        self.save_dtype = next(mllm.parameters()).dtype
        self.device = pick_device(options.device)
        if ranks.distributed and self.device.type == "cuda":
            self.device = torch.device("cuda", ranks.local_rank)
        self.autocast_dtype = inference_dtype(self.device)
        mllm.float()
        self.vision = parts(mllm)[0]
        self.peft = self._choose_trainable(mllm)
        self.model = FocalLensMllm(mllm, self._head(mllm, head_tensors))
        if options.gradient_checkpointing:
            _checkpointing(mllm, True)
        self.model.to(self.device).train()
        self.vision.train(options.train_vision)
        distributed.broadcast_parameters(self.model, ranks)
        named = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        self.trainable_names = [name for name, _ in named]
        self.trainable = [p for _, p in named]
        if resume is not None:
            self._load_trainable(resume / TRAINABLE_FILE)
        self.optimizer = torch.optim.AdamW(decay_groups(self.trainable, options.weight_decay), lr=options.lr,
                                           betas=(0.9, options.beta2))

    def _choose_trainable(self, mllm):
        """Freeze what does not train; with LoRA, wrap the language model's projections (returns the PeftModel)."""
        vision, language, rest = parts(mllm)
        mllm.requires_grad_(False)
        peft_model = None
        if self.options.lora_rank:
            from peft import LoraConfig, get_peft_model

            inside = {id(m) for m in language.modules()}
            targets = [name for name, module in mllm.named_modules()
                       if id(module) in inside and name.rsplit(".", 1)[-1] in LORA_TARGETS and isinstance(module, torch.nn.Linear)]
            if not targets:
                raise UserError(f"--lora-rank: no projections named {', '.join(LORA_TARGETS)} in the language model of {self.ref.model_id}")
            rank = self.options.lora_rank
            config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets)
            peft_model = get_peft_model(mllm, config)  # adds the adapters in place, inside mllm
        else:
            language.requires_grad_(True)
        for module in rest:
            module.requires_grad_(True)
        if self.options.train_vision:
            vision.requires_grad_(True)
        return peft_model

    def _head(self, mllm, saved: dict[str, torch.Tensor] | None) -> torch.nn.Linear:
        width = mllm.config.get_text_config().hidden_size
        if saved is None:
            return make_head(width, self.options.head_dim, self.options.seed)
        dim = saved["weight"].shape[0]
        if self.options.head_dim not in (None, dim):
            raise UserError(f"--head-dim {self.options.head_dim}: {self.ref.model_id} already has a head of width {dim}")
        head = torch.nn.Linear(width, dim, bias="bias" in saved)
        head.load_state_dict({k: v.float() for k, v in saved.items()})
        return head

    def _load_trainable(self, path: Path) -> None:
        with safe_open(str(path), "pt") as f:
            saved_base = (f.metadata() or {}).get("base")
        if saved_base != self.ref.model_id:
            raise UserError(f"{path.parent} was saved while training {saved_base}, not {self.ref.model_id}; "
                            "use the same --base to resume, or another --out")
        tensors = load_file(str(path))
        if sorted(tensors) != sorted(self.trainable_names):
            raise UserError(f"{path.parent} holds other trainable weights than these options train; use another --out")
        with torch.no_grad():
            for name, p in zip(self.trainable_names, self.trainable):
                p.copy_(tensors[name])

    # -- inputs and loss ------------------------------------------------------------------------
    def prepare(self, batch: TrainingBatch) -> dict[str, dict[str, torch.Tensor]]:
        """Tokens and pixels of a batch (run in the prefetch thread)."""
        with self._lock:
            inputs = {"prefix": self.prompts.prefix_inputs(batch.images),
                      "suffix": self.prompts.suffix_tokens([normalize_instruction(i) for i in batch.instructions])}
            if self.options.caption_weight > 0 and batch.captions:
                inputs["plain"] = self.prompts.suffix_tokens([""] * len(batch.images))
        return inputs

    def _on_device(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value.to(self.device, non_blocking=True) for key, value in inputs.items()}

    def _texts(self, texts: list[str]) -> torch.Tensor:
        with self._lock:
            tokens = self.prompts.text_tokens(texts)
        return self.model.text_vectors(self._on_device(tokens))

    def loss(self, batch: TrainingBatch, inputs: dict[str, dict[str, torch.Tensor]]) -> torch.Tensor:
        """The loss of the global batch: this rank's slice, with the other ranks' vectors gathered."""
        model, ranks, options = self.model, self.ranks, self.options
        scale = model.logit_scale.exp().clamp(max=100)
        prefix = self._on_device(inputs["prefix"])
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.device.type == "cuda"):
            image = distributed.gather_with_grad(model.image_vectors(prefix, self._on_device(inputs["suffix"])), ranks)
            unique, labels = _dedupe(distributed.gather_strings(batch.targets, ranks))
            labels = labels.to(self.device)
            negatives = None
            if batch.negatives:
                wrong = sorted({t for t in distributed.gather_strings(batch.negatives, ranks) if t} - set(unique))
                negatives = self._texts(wrong) if wrong else None
            loss = multi_positive_clip_loss(image, self._texts(unique), labels, scale, negatives)
            if options.image_weight > 0:
                loss = loss + options.image_weight * same_answer_image_loss(image, labels, scale)
            if "plain" in inputs:
                plain = distributed.gather_with_grad(model.image_vectors(prefix, self._on_device(inputs["plain"])), ranks)
                captions, caption_labels = _dedupe(distributed.gather_strings(batch.captions, ranks))
                caption_loss = multi_positive_clip_loss(plain, self._texts(captions), caption_labels.to(self.device), scale)
                loss = loss + options.caption_weight * caption_loss
        return loss

    def step(self, step: int, batch: TrainingBatch, inputs: dict) -> float:
        return optimizer_step(self, step, lambda: self.loss(batch, inputs))

    @property
    def scale(self) -> float:
        return self.model.logit_scale.detach().exp().item()

    # -- saving ---------------------------------------------------------------------------------
    def save(self, folder: Path, extra, *, final: bool) -> None:
        """The resume state (what trains, in float32), or the finished checkpoint (LoRA merged, the base's dtype)."""
        if not final:
            tensors = {name: p.detach().float().cpu().contiguous() for name, p in zip(self.trainable_names, self.trainable)}

            def write(staging: Path) -> None:
                save_file(tensors, str(staging / TRAINABLE_FILE), metadata={"base": self.ref.model_id})
                extra(staging)

            write_folder(folder, write)
            return
        self.model.eval()
        mllm = self.peft.merge_and_unload() if self.peft is not None else self.model.mllm
        if self.options.gradient_checkpointing:
            _checkpointing(mllm, False)
        mllm.to(self.save_dtype)
        mllm.config.focallens_prompts = self.templates.to_dict()
        head = {name: value.detach().float().cpu().contiguous() for name, value in self.model.head.state_dict().items()}

        def write_head(staging: Path) -> None:
            save_file(head, str(staging / MLLM_HEAD_FILE))
            extra(staging)

        write_checkpoint(folder, mllm, self.tokenizer, self.processor, write_head)

    def optimizer_tensors(self) -> dict[str, torch.Tensor]:
        return optimizer_tensors(self.optimizer)

    def load_optimizer_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        load_optimizer_tensors(self.optimizer, tensors)
