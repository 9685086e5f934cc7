"""Generative training of a LLaVA-style model: next-token cross-entropy on the assistant's answer.

A chat is one user turn (an optional image, then text) and the answer. The user turn is read
exactly as an MLLM-family encoder reads a prompt (the processor's chat template with the generation
prompt), and the answer's tokens and the end-of-turn token follow it; only those carry a loss, as in
LLaVA's instruction tuning. The state of the prompt's last token is what predicts the answer's first
token, so after this training it summarises the answer: that state is the prompted embedding.

Chats with and without an image are run as separate forward passes, so that short text-only chats
are not padded to the image's length.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm


@dataclass(frozen=True)
class Chat:
    """One user turn and the assistant's answer to it."""

    prompt: str
    answer: str
    image: Image.Image | None = None


@dataclass(frozen=True)
class GenerativeOptions:
    """How to train; recorded in the checkpoint's training log."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at this share of lr
    weight_decay: float = 0.05
    warmup: int = 100
    train_vision_from: int | None = None  # step from which the vision tower trains too (None: always frozen)
    vision_lr: float = 1e-4
    per_chat: bool = False  # every chat weighs the same (else every answer token, as in LLaVA)
    seed: int = 0


@dataclass
class GenerativeResult:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def user_turn(processor, prompt: str, with_image: bool) -> str:
    """The prompt text of a user turn (image first), ending with the opening of the assistant's turn."""
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": prompt}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)


def encode_chats(processor, chats: list[Chat]) -> dict[str, torch.Tensor]:
    """Model inputs and labels for chats that all have an image or all have none (right padded).

    Labels are -100 except on the answer's tokens and the end-of-turn token after them.
    """
    tokenizer = processor.tokenizer
    with_image = chats[0].image is not None
    if any((chat.image is not None) != with_image for chat in chats):
        raise ValueError("encode_chats needs chats that all have an image or all have none")
    prompts = [user_turn(processor, chat.prompt, with_image) for chat in chats]
    images = [chat.image for chat in chats] if with_image else None
    encoded = processor(text=prompts, images=images, return_tensors="pt", padding=True)
    lengths = encoded["attention_mask"].sum(dim=1).tolist()
    prompt_ids = [ids[:n].tolist() for ids, n in zip(encoded["input_ids"], lengths)]
    answers = tokenizer([chat.answer + tokenizer.eos_token for chat in chats], add_special_tokens=False)["input_ids"]
    rows = [prompt + list(answer) for prompt, answer in zip(prompt_ids, answers)]
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, (prompt, answer, row) in enumerate(zip(prompt_ids, answers, rows)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        labels[i, len(prompt) : len(row)] = torch.tensor(answer)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if with_image:
        inputs["pixel_values"] = encoded["pixel_values"]
    return inputs


def answer_loss(model, inputs: dict[str, torch.Tensor], per_chat: bool = False) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of the labelled tokens and how many there are; with ``per_chat``, the sum of
    each chat's mean and how many chats there are."""
    labels = inputs["labels"]
    batch = {key: value for key, value in inputs.items() if key != "labels"}
    logits = model(**batch).logits[:, :-1]
    targets = labels[:, 1:]
    losses = F.cross_entropy(logits.transpose(1, 2).float(), targets, ignore_index=-100, reduction="none")
    labelled = (targets != -100).sum(dim=1)
    if per_chat:
        return (losses.sum(dim=1) / labelled.clamp(min=1)).sum(), len(labelled)
    return losses.sum(), int(labelled.sum())


def _prefetch(batches: Callable[[int, int], list[Chat]], processor, steps: range, size: int) -> Iterator[list[dict]]:
    """Encoded batches for the coming steps, built in a thread while the current step trains."""
    results: dict[int, list[dict]] = {}
    errors: list[BaseException] = []
    ready = threading.Condition()
    stop = threading.Event()

    def work() -> None:
        try:
            for step in steps:
                chats = batches(step, size)
                parts = [encode_chats(processor, group) for group in (
                    [c for c in chats if c.image is not None], [c for c in chats if c.image is None]) if group]
                with ready:
                    while len(results) >= 2 and not stop.is_set():
                        ready.wait()
                    if stop.is_set():
                        return
                    results[step] = parts
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
                if step not in results:
                    raise errors[0]
                parts = results.pop(step)
                ready.notify_all()
            yield parts
    finally:
        stop.set()
        with ready:
            ready.notify_all()


def _schedule(options: GenerativeOptions) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < options.warmup:
            return (step + 1) / options.warmup
        progress = (step - options.warmup) / max(1, options.steps - options.warmup)
        return options.min_lr_ratio + (1 - options.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def train_generative(model, processor, batches: Callable[[int, int], list[Chat]], options: GenerativeOptions, *,
                     progress: bool = True, after_step: Callable[[int], None] | None = None) -> GenerativeResult:
    """Train a LlavaForConditionalGeneration in place, next-token on the answers of ``batches(step, size)``.

    The vision tower is frozen until ``options.train_vision_from`` (then trained at ``vision_lr``);
    the projector and the language model train throughout. Deterministic for a seed and a source
    whose batches depend only on the step. ``after_step(step)`` runs after each step (evaluations).
    """
    torch.manual_seed(options.seed)
    vision = model.model.vision_tower
    vision_params = list(vision.parameters())
    vision_ids = {id(p) for p in vision_params}
    rest = [p for p in model.parameters() if id(p) not in vision_ids]
    decay = [p for p in rest if p.ndim >= 2]
    no_decay = [p for p in rest if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": options.weight_decay, "lr": options.lr},
              {"params": no_decay, "weight_decay": 0.0, "lr": options.lr}]
    if options.train_vision_from is not None:
        groups.append({"params": vision_params, "weight_decay": options.weight_decay, "lr": options.vision_lr})
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.98))
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    factor = _schedule(options)
    for p in vision_params:
        p.requires_grad_(False)
    model.train()
    vision.eval()  # CLIP has no dropout; eval keeps a frozen tower exactly as it was
    result = GenerativeResult()
    started = time.perf_counter()
    with tqdm(total=options.steps, disable=not progress, desc="training (generative)", unit="step") as bar:
        for step, parts in enumerate(_prefetch(batches, processor, range(options.steps), options.batch_size)):
            if options.train_vision_from is not None and step == options.train_vision_from:
                for p in vision_params:
                    p.requires_grad_(True)
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * factor(step)
            losses = [answer_loss(model, inputs, options.per_chat) for inputs in parts]
            count = sum(n for _, n in losses)
            total = sum(loss for loss, _ in losses) / max(1, count)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            result.losses.append(round(total.item(), 5))
            bar.update(1)
            bar.set_postfix(loss=f"{result.losses[-1]:.4f}")
            if after_step is not None:
                after_step(step)
    model.eval()
    result.seconds = time.perf_counter() - started
    return result


@torch.no_grad()
def prompt_embeddings(model, processor, prompts: list[str], images: list[Image.Image] | None = None,
                      batch_size: int = 64) -> torch.Tensor:
    """L2-normalised final state (after the final norm) of each user turn's last token, the opening
    of the assistant's turn: the prompted embedding of an image under a prompt, or of a text alone."""
    out = []
    for start in range(0, len(prompts), batch_size):
        texts = [user_turn(processor, p, images is not None) for p in prompts[start : start + batch_size]]
        chunk = images[start : start + batch_size] if images is not None else None
        inputs = processor(text=texts, images=chunk, return_tensors="pt", padding=True)
        states = model.model(**inputs).last_hidden_state
        last = inputs["attention_mask"].sum(dim=1) - 1
        out.append(F.normalize(states[torch.arange(len(texts)), last].float(), dim=-1))
    return torch.cat(out)
