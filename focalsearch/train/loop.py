"""Contrastive training (design §2, item 5).

- ``instruction``: InfoNCE between conditional image embeddings and the text embeddings of the
  answers; identical answers in a batch are one class; learnable temperature (CLIP's logit scale);
  an optional caption term (empty instruction ↔ caption); an optional image-image term (images with
  the same answer pull together, others push apart: what conditional retrieval asks of the
  embeddings directly); text tower frozen unless asked; while it trains, an optional anchor term
  holds its token states for the batch's captions at those of the starting text tower.
- ``caption``: plain CLIP training on (image, caption), both towers trained; an optional
  next-token term on the captions gives words that occur in the same caption contexts ("of large
  scale", "of large size") similar token embeddings, which contrast alone never asks for.

A vision-language (MLLM-family) base trains the instruction objective through
focalsearch.train.mllm (MllmTrainer); ``_start`` is the one place the families part, and the loop
here drives either trainer.

Progress is saved every ``save_every`` steps into ``OUT/checkpoint-last`` (safetensors for weights
and optimizer state, JSON for the rest); a rerun with the same OUT resumes from there.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from focalsearch.errors import UserError
from focalsearch.models.encoders import inference_dtype, pick_device
from focalsearch.models.focallens_clip import FocalLensCLIPModel
from focalsearch.models.init_checkpoint import focallens_from_clip
from focalsearch.models.loading import family_of, load_clip_family, load_config, resolve_model
from focalsearch.models.saving import write_checkpoint
from focalsearch.train import distributed
from focalsearch.train.data import TrainingBatch, TrainingSource
from focalsearch.train.distributed import Ranks

RESUME_DIR = "checkpoint-last"
STATE_FILE = "training_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
LOG_FILE = "training_log.json"


@dataclass(frozen=True)
class TrainOptions:
    """How to train; saved with the checkpoint so a resumed run goes on the same way."""

    objective: str = "instruction"
    steps: int = 1000
    batch_size: int = 128
    lr: float = 5e-4
    weight_decay: float = 0.05
    beta2: float = 0.98
    warmup: int = 100
    caption_weight: float = 0.0
    image_weight: float = 0.0
    text_anchor_weight: float = 0.0  # with train_text: weight of text_anchor_loss on the batch's captions
    next_token_weight: float = 0.0  # caption objective: weight of next_token_loss on the captions
    train_text: bool = False
    text_steps: int | None = None  # with train_text: freeze the text tower after this many steps
    seed: int = 0
    save_every: int = 200
    device: str = "auto"
    # The MLLM family (focalsearch.train.mllm): LoRA rank on the language model (0: full fine-tuning),
    # the vision tower trained too, the head's output width (None: the language model's), and
    # activations recomputed in the backward pass to save memory.
    lora_rank: int = 0
    train_vision: bool = False
    head_dim: int | None = None
    gradient_checkpointing: bool = False


@dataclass
class TrainResult:
    """Where the model went and how the loss moved."""

    out: Path
    steps: int
    resumed_from: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def multi_positive_clip_loss(image: torch.Tensor, texts: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor,
                             negatives: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE where ``labels[i]`` indexes the (deduplicated) text of image i.

    Images sharing a text are all positives for it: the text→image side maximises the summed
    probability of its positives instead of treating them as negatives of each other.
    """
    logits = scale * image @ texts.T  # (images, unique texts)
    extra = logits if negatives is None else torch.cat([logits, scale * image @ negatives.T], dim=1)
    image_to_text = F.cross_entropy(extra, labels)
    log_probs = logits.T.log_softmax(dim=1)  # over images, per text
    positives = labels[None, :] == torch.arange(texts.shape[0], device=labels.device)[:, None]
    text_to_image = -torch.logsumexp(log_probs.masked_fill(~positives, float("-inf")), dim=1).mean()
    return (image_to_text + text_to_image) / 2


def same_answer_image_loss(image: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Supervised contrastive loss among the images of a batch: those sharing an answer are positives.

    Text anchors alone leave free whatever the answer does not constrain, and that residue (the
    other attributes) is what makes an image's nearest neighbour share the wrong attribute.
    Images without another of their answer in the batch are left out.
    """
    logits = scale * image @ image.T
    self_mask = torch.eye(len(labels), dtype=torch.bool, device=image.device)
    log_probs = logits.masked_fill(self_mask, float("-inf")).log_softmax(dim=1)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    has_positive = positives.any(dim=1)
    if not has_positive.any():
        return image.sum() * 0.0
    per_anchor = -(log_probs.masked_fill(~positives, 0.0).sum(dim=1) / positives.sum(dim=1).clamp(min=1))
    return per_anchor[has_positive].mean()


def text_anchor_loss(states: torch.Tensor, anchor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cosine distance between the token states of the tuned and the starting text tower.

    Instruction tuning moves the words that instructions use and never their synonyms, which only
    captions use; holding the caption states in place keeps both where caption training put them,
    so a synonym reads like its word wherever captions had tied the two (README, "What made
    synonyms transfer", item 4).
    """
    distance = 1 - F.cosine_similarity(states.float(), anchor.float(), dim=-1)
    return (distance * mask).sum() / mask.sum().clamp(min=1)


def next_token_loss(states: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each caption's next token, read from the causal text tower's states through
    the (tied) token embedding matrix.

    The contrastive loss only needs a caption's value words, so it leaves the attribute names, and
    above all the synonyms that only captions use, wherever they started. Predicting the next token
    ties the embeddings of words seen in the same contexts, as language-model pretraining does for
    a real CLIP's text tower.
    """
    logits = states[:, :-1].float() @ embedding.float().T
    targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def _dedupe(texts: list[str]) -> tuple[list[str], torch.Tensor]:
    unique = list(dict.fromkeys(texts))
    index = {t: i for i, t in enumerate(unique)}
    return unique, torch.tensor([index[t] for t in texts])


def _lr_factor(step: int, options: TrainOptions) -> float:
    if step < options.warmup:
        return (step + 1) / options.warmup
    progress = (step - options.warmup) / max(1, options.steps - options.warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class _Trainer:
    def __init__(self, model, tokenizer, processor, options: TrainOptions, ranks: Ranks = Ranks(), anchor_text_model=None):
        self.model, self.tokenizer, self.processor, self.options = model, tokenizer, processor, options
        self.anchor_text_model = anchor_text_model
        self.ranks = ranks
        self.device = pick_device(options.device)
        if ranks.distributed and self.device.type == "cuda":
            self.device = torch.device("cuda", ranks.local_rank)
        self.autocast_dtype = inference_dtype(self.device)
        self.model.to(self.device).train()
        if anchor_text_model is not None:
            anchor_text_model.to(self.device).eval().requires_grad_(False)
        distributed.broadcast_parameters(self.model, ranks)
        self.freeze_text = False
        if options.objective == "instruction" and not options.train_text:
            self._freeze_text_tower()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(decay_groups(self.trainable, options.weight_decay), lr=options.lr,
                                           betas=(0.9, options.beta2))
        self._text_cache: dict[str, torch.Tensor] = {}
        self._instruction_cache: dict[str, torch.Tensor] = {}

    # -- text side ---------------------------------------------------------------------------
    def _tokens(self, texts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        limit = self.model.config.text_config.max_position_embeddings
        out = self.tokenizer(texts, padding=True, truncation=True, max_length=min(max_length or limit, limit), return_tensors="pt")
        return {k: out[k].to(self.device) for k in ("input_ids", "attention_mask")}

    def _embed_texts(self, texts: list[str]) -> torch.Tensor:
        if not self.freeze_text:
            return F.normalize(self.model.get_text_features(**self._tokens(texts)).pooler_output.float(), dim=-1)
        missing = [t for t in texts if t not in self._text_cache]
        if missing:
            with torch.no_grad():
                features = self.model.get_text_features(**self._tokens(missing)).pooler_output.float()
            self._text_cache.update(zip(missing, F.normalize(features, dim=-1)))
        return torch.stack([self._text_cache[t] for t in texts])

    def _instruction_tokens(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected instruction tokens, padded, with their mask."""
        max_length = self.model.config.instruction_max_length
        if self.freeze_text:
            missing = [i for i in dict.fromkeys(instructions) if i not in self._instruction_cache]
            if missing:  # one padded pass: the causal text tower gives each text's own tokens the same states
                tokens = self._tokens(missing, max_length)
                with torch.no_grad():
                    hidden = self.model.text_model(**tokens).last_hidden_state
                for text, states, keep in zip(missing, hidden, tokens["attention_mask"].bool()):
                    self._instruction_cache[text] = states[keep]
            states = [self._instruction_cache[i] for i in instructions]
            length = max(s.shape[0] for s in states)
            hidden = torch.zeros(len(states), length, states[0].shape[-1], device=self.device)
            mask = torch.zeros(len(states), length, dtype=torch.long, device=self.device)
            for row, s in enumerate(states):
                hidden[row, : s.shape[0]] = s
                mask[row, : s.shape[0]] = 1
            return self.model.instruction_projection(hidden), mask
        tokens = self._tokens(instructions, max_length)
        return self.model.instruction_tokens(**tokens), tokens["attention_mask"]

    # -- one step ------------------------------------------------------------------------------
    def loss(self, batch: TrainingBatch, pixels: torch.Tensor) -> torch.Tensor:
        """The loss of the global batch: this rank's slice, with the other ranks' embeddings gathered."""
        model, scale, ranks = self.model, self.model.logit_scale.exp().clamp(max=100), self.ranks
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.device.type == "cuda"):
            if self.options.objective == "caption":
                image = model.get_image_features(pixel_values=pixels).pooler_output
            else:
                tokens, mask = self._instruction_tokens(batch.instructions)
                image = model.conditional_image_features(pixels, tokens, mask)
            image = distributed.gather_with_grad(F.normalize(image.float(), dim=-1), ranks)
            unique, labels = _dedupe(distributed.gather_strings(batch.targets, ranks))
            labels = labels.to(self.device)
            negatives = None
            if batch.negatives:
                wrong = sorted({t for t in distributed.gather_strings(batch.negatives, ranks) if t} - set(unique))
                negatives = self._embed_texts(wrong) if wrong else None
            if self.options.objective == "caption" and self.options.next_token_weight > 0:
                # one text pass for both terms: get_text_features keeps the token states beside the projection
                tokens = self._tokens(unique)
                output = model.get_text_features(**tokens)
                texts = F.normalize(output.pooler_output.float(), dim=-1)
                embedding = model.text_model.embeddings.token_embedding.weight
                loss = self.options.next_token_weight * next_token_loss(
                    output.last_hidden_state, tokens["input_ids"], tokens["attention_mask"], embedding)
            else:
                texts, loss = self._embed_texts(unique), 0.0
            loss = loss + multi_positive_clip_loss(image, texts, labels, scale, negatives)
            if self.options.objective == "instruction" and self.options.image_weight > 0:
                loss = loss + self.options.image_weight * same_answer_image_loss(image, labels, scale)
            if self.options.objective == "instruction" and self.options.caption_weight > 0 and batch.captions:
                plain = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output.float(), dim=-1)
                plain = distributed.gather_with_grad(plain, ranks)
                unique, labels = _dedupe(distributed.gather_strings(batch.captions, ranks))
                caption_loss = multi_positive_clip_loss(plain, self._embed_texts(unique), labels.to(self.device), scale)
                loss = loss + self.options.caption_weight * caption_loss
            if self.anchor_text_model is not None:
                if not batch.captions:
                    raise UserError("text_anchor_weight needs captions in the training batches (ColorShapeSource(with_captions=True))")
                tokens = self._tokens(batch.captions)
                states = model.text_model(**tokens).last_hidden_state
                with torch.no_grad():
                    anchor = self.anchor_text_model(**tokens).last_hidden_state
                loss = loss + self.options.text_anchor_weight * text_anchor_loss(states, anchor, tokens["attention_mask"])
        return loss

    def _freeze_text_tower(self) -> None:
        self.freeze_text = True
        self.anchor_text_model = None  # only a training text tower is anchored; free the copy
        for part in (self.model.text_model, self.model.text_projection):
            part.requires_grad_(False)
            part.eval()

    def step(self, step: int, batch: TrainingBatch, pixels: torch.Tensor) -> float:
        if self.options.text_steps is not None and step >= self.options.text_steps and not self.freeze_text:
            # Later tuning would move the tuned words away from synonyms it never sees (measured: a
            # synonym of "background" that transferred at step 1,000 was lost by step 3,500).
            self._freeze_text_tower()
        return optimizer_step(self, step, lambda: self.loss(batch, pixels.to(self.device, non_blocking=True)))

    # -- what the family-agnostic loop asks of a trainer --------------------------------------------
    def prepare(self, batch: TrainingBatch) -> torch.Tensor:
        """The model inputs of a batch (run in the prefetch thread)."""
        return self.processor(images=batch.images, return_tensors="pt")["pixel_values"]

    @property
    def scale(self) -> float:
        return self.model.logit_scale.detach().exp().item()

    def save(self, folder: Path, extra, *, final: bool) -> None:
        """A loadable checkpoint (the resume state is one too), with ``extra``'s files."""
        if final:
            self.model.eval()
        write_checkpoint(folder, self.model, self.tokenizer, self.processor, extra)

    def optimizer_tensors(self) -> dict[str, torch.Tensor]:
        return optimizer_tensors(self.optimizer)

    def load_optimizer_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        load_optimizer_tensors(self.optimizer, tensors)


def optimizer_step(trainer, step: int, loss_of) -> float:
    """One update of ``trainer`` (its options, optimizer, trainable parameters and ranks) on ``loss_of()``."""
    for group in trainer.optimizer.param_groups:
        group["lr"] = trainer.options.lr * _lr_factor(step, trainer.options)
    loss = loss_of()
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    # Every rank computed the whole global batch's loss; the gathered rows sent each rank world x
    # its own rows' gradient, so the average across ranks is the one-process gradient.
    distributed.average_gradients(trainer.trainable, trainer.ranks)
    torch.nn.utils.clip_grad_norm_(trainer.trainable, 1.0)
    trainer.optimizer.step()
    return float(loss.detach())


def decay_groups(trainable: list[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """CLIP's convention: no weight decay on gains, biases, the class embedding and the temperature
    (decay pulls the log temperature towards 0 and undoes what the loss learns)."""
    return [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]


# -- optimizer state as safetensors (never pickle) ---------------------------------------------------
def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    state = optimizer.state_dict()["state"]
    return {f"{index}.{key}": value.detach().cpu().contiguous() if torch.is_tensor(value) else torch.tensor(value)
            for index, entries in state.items() for key, value in entries.items()}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    saved = optimizer.state_dict()
    saved["state"] = state
    optimizer.load_state_dict(saved)


MLLM_ONLY = {"lora_rank": "--lora-rank", "train_vision": "--train-vision", "head_dim": "--head-dim",
             "gradient_checkpointing": "--gradient-checkpointing"}


def _start(base: str, out: Path, options: TrainOptions, ranks: Ranks):
    """The trainer for ``base``'s family, and the saved state when resuming from OUT/checkpoint-last.

    The one place the families part: each trainer owns its model, inputs, loss and saving.
    """
    resume, state = out / RESUME_DIR, None
    if (resume / STATE_FILE).is_file():
        state = json.loads((resume / STATE_FILE).read_text())
        # options added since the state was saved did not exist then: their defaults are what ran
        if {**asdict(TrainOptions()), **state["options"]} != asdict(options):
            raise UserError(f"{resume} was saved with other training options; use the same options to resume, or another --out")
    elif (out / "config.json").is_file():
        raise UserError(f"{out} already holds a trained model; pick another --out")
    ref = resolve_model(base)
    if family_of(load_config(ref)) == "mllm":
        from focalsearch.train.mllm import MllmTrainer

        return MllmTrainer(ref, options, ranks, resume if state else None), state
    for name, flag in MLLM_ONLY.items():
        if getattr(options, name) != getattr(TrainOptions, name):
            raise UserError(f"{flag} applies to vision-language (MLLM-family) checkpoints; {ref.model_id} is a CLIP-family one")
    model, tokenizer, processor = load_clip_family(resolve_model(str(resume)) if state else ref)
    if options.objective == "instruction" and not isinstance(model, FocalLensCLIPModel):
        model = focallens_from_clip(model, seed=options.seed)
    anchor = None
    if options.objective == "instruction" and options.train_text and options.text_anchor_weight > 0:
        anchor = load_clip_family(ref)[0].text_model  # the starting tower, also when resuming
    return _Trainer(model, tokenizer, processor, options, ranks, anchor), state


def _prefetch(source: TrainingSource, prepare, steps: range, batch_size: int, ranks: Ranks = Ranks()):
    """Build (batch, prepare(batch)) for the coming steps in a thread while the current step trains;
    with several ranks, each takes its slice of the global batch (a distributed sampler over the source)."""
    results: dict[int, tuple[TrainingBatch, torch.Tensor]] = {}
    ready = threading.Condition()
    errors: list[BaseException] = []
    stop = threading.Event()

    def work() -> None:
        try:
            for step in steps:
                batch = distributed.shard(source.batch(step, batch_size), ranks)
                inputs = prepare(batch)
                with ready:
                    while len(results) >= 2 and not stop.is_set():
                        ready.wait()
                    if stop.is_set():
                        return
                    results[step] = (batch, inputs)
                    ready.notify_all()
        except BaseException as exc:  # surfaced in the training thread
            with ready:
                errors.append(exc)
                ready.notify_all()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        for step in steps:
            with ready:
                while step not in results and not errors:
                    ready.wait()
                if step not in results:  # the batch for this step failed to build
                    raise errors[0]
                item = results.pop(step)
                ready.notify_all()
            yield step, item
    finally:
        stop.set()
        with ready:
            ready.notify_all()


def train(base: str, out: str | Path, source: TrainingSource, options: TrainOptions, *, progress: bool = True) -> TrainResult:
    """Train from ``base`` (or resume OUT/checkpoint-last) and save a from_pretrained-loadable model to ``out``.

    Under torchrun (WORLD_SIZE > 1) every process trains its slice of each global batch of
    ``options.batch_size``, and rank 0 alone writes checkpoints.
    """
    if options.objective not in ("instruction", "caption"):
        raise UserError(f"unknown objective {options.objective!r}; use instruction or caption")
    ranks = distributed.setup(options.device)
    try:
        return _train(base, Path(out).expanduser().resolve(), source, options, progress and ranks.is_main, ranks)
    finally:
        distributed.teardown(ranks)


def _train(base: str, out: Path, source: TrainingSource, options: TrainOptions, progress: bool, ranks: Ranks) -> TrainResult:
    if options.batch_size % ranks.world:
        raise UserError(f"--batch-size {options.batch_size} (the global batch) must divide among {ranks.world} processes")
    torch.manual_seed(options.seed)
    trainer, state = _start(base, out, options, ranks)
    start = 0
    losses: list[float] = []
    if state is not None:
        start, losses = state["step"], state["losses"]
        trainer.load_optimizer_tensors(load_file(str(out / RESUME_DIR / OPTIMIZER_FILE)))
    result = TrainResult(out=out, steps=options.steps, resumed_from=start, losses=losses)
    started = time.perf_counter()

    def save_progress(step: int) -> None:
        def extra(folder: Path) -> None:
            save_file(trainer.optimizer_tensors(), str(folder / OPTIMIZER_FILE))
            (folder / STATE_FILE).write_text(json.dumps({"step": step, "losses": losses, "options": asdict(options)}))

        if ranks.is_main:
            trainer.save(out / RESUME_DIR, extra, final=False)
        distributed.barrier(ranks)

    with tqdm(total=options.steps, initial=start, disable=not progress, desc=f"training ({options.objective})", unit="step") as bar:
        for step, (batch, inputs) in _prefetch(source, trainer.prepare, range(start, options.steps), options.batch_size, ranks):
            losses.append(round(trainer.step(step, batch, inputs), 5))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", scale=f"{trainer.scale:.1f}")
            if (step + 1) % options.save_every == 0 and step + 1 < options.steps:
                save_progress(step + 1)

    def write_log(folder: Path) -> None:
        (folder / LOG_FILE).write_text(json.dumps({"options": asdict(options), "losses": losses, "processes": ranks.world}))

    # The finished model replaces the whole OUT folder, resume state included.
    if ranks.is_main:
        trainer.save(out, write_log, final=True)
        shutil.rmtree(out / RESUME_DIR, ignore_errors=True)
    distributed.barrier(ranks)
    result.seconds = time.perf_counter() - started
    return result
