"""Training data: (image, instruction, answer) triples from LLaVA-style JSON or the ColorShape world.

A source hands out batches by step number, deterministically for its seed, so a resumed run sees
exactly the batches an uninterrupted one would have seen.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from PIL import Image

from focalsearch.errors import UserError
from focalsearch.images import LoadedImage, load_image
from focalsearch.synth import colorshape as cs

_IMAGE_TOKEN = re.compile(r"\s*<image>\s*")


@dataclass(frozen=True)
class Triple:
    """One training example: an image file, an instruction about it, and the answer."""

    image: str
    instruction: str
    answer: str


@dataclass(frozen=True)
class TrainingBatch:
    """Images with, for each, the instruction ('' for captions) and the target text."""

    images: list[Image.Image]
    instructions: list[str]
    targets: list[str]
    captions: list[str] | None = None
    negatives: list[str] | None = None  # per image, a text that must not match it ('' for none)


class TrainingSource(Protocol):
    def batch(self, step: int, size: int) -> TrainingBatch: ...

    def texts(self) -> list[str]:
        """Text the source can produce (for building a tokenizer)."""
        ...


def read_llava_json(path: str | Path) -> list[Triple]:
    """Read LLaVA-style conversations: each human turn and the gpt turn after it become one triple.

    ``<image>`` tokens are stripped; turns that are empty after stripping are dropped.
    """
    path = Path(path)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read training data {path}: {' '.join(str(exc).split())[:200]}") from exc
    if not isinstance(records, list):
        raise UserError(f"{path} must hold a JSON list of conversations")
    triples = []
    for number, record in enumerate(records):
        if not isinstance(record, dict) or "image" not in record or not isinstance(record.get("conversations"), list):
            raise UserError(f"{path}: record {number} lacks 'image' or a 'conversations' list")
        turns = record["conversations"]
        for human, gpt in zip(turns, turns[1:]):
            if not (isinstance(human, dict) and isinstance(gpt, dict)):
                raise UserError(f"{path}: record {number} has a turn that is not an object")
            if human.get("from") != "human" or gpt.get("from") != "gpt":
                continue
            question = _IMAGE_TOKEN.sub(" ", str(human.get("value", ""))).strip()
            answer = _IMAGE_TOKEN.sub(" ", str(gpt.get("value", ""))).strip()
            if question and answer:
                triples.append(Triple(str(record["image"]), " ".join(question.split()), " ".join(answer.split())))
    return triples


class LlavaSource:
    """Batches of triples read from LLaVA JSON, shuffled per epoch; unreadable images are skipped."""

    def __init__(self, triples: Sequence[Triple], image_root: str | Path, seed: int = 0):
        if not triples:
            raise UserError("the training data holds no (instruction, answer) turns")
        self.triples = list(triples)
        self.image_root = Path(image_root)
        self.seed = seed
        self._order: dict[int, list[int]] = {}

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._order:
            order = list(range(len(self.triples)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._order = {epoch: order}
        return self._order[epoch]

    def batch(self, step: int, size: int) -> TrainingBatch:
        images, instructions, targets = [], [], []
        position = step * size
        while len(images) < size:
            epoch, offset = divmod(position, len(self.triples))
            triple = self.triples[self._epoch_order(epoch)[offset]]
            position += 1
            loaded = load_image(self.image_root / triple.image)
            if isinstance(loaded, LoadedImage):
                images.append(loaded.image)
                instructions.append(triple.instruction)
                targets.append(triple.answer)
            elif position - step * size > 10 * size:
                raise UserError(f"too many unreadable training images under {self.image_root} (last: {loaded.path}: {loaded.reason})")
        return TrainingBatch(images, instructions, targets)

    def texts(self) -> list[str]:
        return [t.instruction for t in self.triples] + [t.answer for t in self.triples]


class ColorShapeSource:
    """Generated ColorShape data from the training split: captions, or instruction triples."""

    def __init__(
        self,
        objective: str = "instruction",
        resolution: int = 64,
        seed: int = 0,
        with_captions: bool = False,
        group: int = 4,
        grayscale: float = 0.0,
        recolor: float = 0.0,
        phrasing_noise: float = 0.0,
        name_negatives: bool = False,
        name_first_captions: bool = False,
        size_synonym_captions: bool = False,
        question_frame_captions: bool = False,
        focus: str | None = None,
        focus_share: float = 0.0,
    ):
        if objective not in ("instruction", "caption"):
            raise ValueError(objective)
        if not 0.0 <= grayscale <= 1.0:
            raise ValueError(f"grayscale must be a probability, got {grayscale}")
        if not 0.0 <= recolor <= 1.0:
            raise ValueError(f"recolor must be a probability, got {recolor}")
        if not 0.0 <= phrasing_noise <= 1.0:
            raise ValueError(f"phrasing_noise must be a probability, got {phrasing_noise}")
        if focus is not None and focus not in cs.ATTRIBUTES:
            raise ValueError(f"unknown focus attribute {focus!r}")
        if not 0.0 <= focus_share <= 1.0:
            raise ValueError(f"focus_share must be a probability, got {focus_share}")
        self.objective = objective
        self.resolution = resolution
        self.seed = seed
        self.with_captions = with_captions
        self.group = group
        self.grayscale = grayscale
        self.recolor = recolor
        self.phrasing_noise = phrasing_noise
        self.name_negatives = name_negatives and objective == "caption"
        self.caption_style = dict(name_first=name_first_captions, size_synonyms=size_synonym_captions,
                                  question_frames=question_frame_captions)
        self.focus = focus if objective == "instruction" and focus_share > 0 else None
        self.focus_share = focus_share
        self.scenes = cs.split_attributes("train")

    def batch(self, step: int, size: int) -> TrainingBatch:
        """Groups of scenes that differ in one attribute, so each batch holds hard negatives.

        Caption batches name the varied attribute. Instruction batches ask about the varied
        attribute for half the groups (different answers) and about another one for the rest
        (one shared answer: the varied attribute must not matter). With ``grayscale`` > 0, that
        share of the images asked about a colour-free attribute (shape, count, size) lose their
        colours (where the objects stay visible), so shape is also learned apart from the few
        colours it comes in. With ``recolor`` > 0, that share of the images asked about anything but
        colour show their objects in a random colour (``off_palette_fill``). No held-out (colour,
        shape) pair is ever shown. With ``phrasing_noise`` > 0, that share of the instructions lose
        some filler words and gain others (``cs.noisy_instruction``). With ``name_negatives``, each
        caption batch also holds, per image, its caption with one attribute name swapped for another
        attribute's (``cs.name_swapped``; '' where the caption names none), a negative in the loss.
        ``name_first_captions``, ``size_synonym_captions`` and ``question_frame_captions`` pick the caption
        style (``cs.caption``), for caption batches, for the captions beside instructions and for ``texts``.
        With ``focus`` and ``focus_share`` > 0, that share of the instruction groups ask about the
        focus attribute, and half of those vary it (four values of it on one scene).
        """
        rng = random.Random(self.seed * 1_000_003 + step)
        images, instructions, targets, captions, negatives = [], [], [], [], []
        while len(images) < size:
            if self.focus and rng.random() < self.focus_share:
                varied, group = cs.variants(rng, self.scenes, self.group, self.focus if rng.random() < 0.5 else None)
                asked = self.focus
            else:
                varied, group = cs.variants(rng, self.scenes, self.group)
                asked = varied if rng.random() < 0.5 else rng.choice([a for a in cs.ATTRIBUTES if a != varied])
            for scene in group[: size - len(images)]:
                recolored = self.recolor > 0 and self.objective == "instruction" and asked != "color" and rng.random() < self.recolor
                fill = cs.off_palette_fill(scene, rng) if recolored else None
                image = cs.render(scene, rng.getrandbits(31), self.resolution, fill=fill)
                if self.grayscale and self.objective == "instruction" and asked in cs.COLOR_FREE_ATTRIBUTES:
                    if rng.random() < self.grayscale and cs.visible_in_grayscale(scene):
                        image = image.convert("L").convert("RGB")
                images.append(image)
                captions.append(cs.caption(scene, rng, mentioning=varied, **self.caption_style))
                if self.objective == "caption":
                    instructions.append("")
                    targets.append(captions[-1])
                    if self.name_negatives:
                        negatives.append(cs.name_swapped(captions[-1], rng))
                else:
                    text = cs.instruction(asked, rng, "train")
                    if self.phrasing_noise > 0 and rng.random() < self.phrasing_noise:
                        text = cs.noisy_instruction(text, rng)
                    instructions.append(text)
                    targets.append(scene.get(asked))
        return TrainingBatch(images, instructions, targets, captions if self.with_captions else None,
                             negatives if self.name_negatives else None)

    def texts(self) -> list[str]:
        rng = random.Random(self.seed)
        captions = [cs.caption(rng.choice(self.scenes), rng, **self.caption_style) for _ in range(5000)]
        phrasings = [p for group in cs.TRAIN_PHRASINGS.values() for p in group]
        return captions + phrasings * 20 + [v for values in cs.VALUES.values() for v in values] * 20
