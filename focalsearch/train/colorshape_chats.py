"""ColorShape chats for generative (LLaVA-style) training, from the training split only.

Three kinds, mixed in every batch:
- question: an image, a training phrasing (some with filler words dropped and inserted), and the
  attribute's value as a one-word answer, read under the encoder's image prompt;
- caption: an image, a request for a caption, and a caption (``cs.caption`` in the demo build's
  style), so that the language model learns the words only captions use (hue, form, backdrop,
  scale, "the number of items is", ...) in the context of an image;
- text: a value word, or a short caption that names one attribute ("a teal backdrop", "which
  scale? large"), read under the encoder's text prompt, answered by the value word, so that a text
  query's state lands where the images with that answer land.
No held-out (colour, shape) pair is ever shown, and no held-out phrasing is ever an instruction.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from focalsearch.models.mllm_prompts import DEFAULT_TEMPLATES, PromptTemplates
from focalsearch.synth import colorshape as cs
from focalsearch.train.generative import Chat

CAPTION_REQUESTS = (
    "Describe the image.",
    "Write a caption for the image.",
    "What does the image show?",
    "Describe the image in a sentence.",
    "Give a short caption.",
)
# A scene whose values are their own slots: a caption of it is the template it was drawn from.
_SLOTS = cs.Attributes(**{attribute: "{" + attribute + "}" for attribute in cs.ATTRIBUTES})


@dataclass(frozen=True)
class ChatMix:
    """Shares of each kind of chat (the rest are questions) and how they are drawn."""

    caption: float = 0.2
    text: float = 0.2
    phrasing_noise: float = 0.5  # share of questions with filler words dropped and inserted
    recolor: float = 0.0  # share of questions not about colour shown in a random colour
    focus: tuple[str, ...] = ()  # attributes asked about more often ...
    focus_share: float = 0.0  # ... in this share of the questions


class ColorShapeChats:
    """Batches of ColorShape chats by step number, deterministic for a seed."""

    def __init__(self, resolution: int = 64, seed: int = 0, mix: ChatMix = ChatMix(),
                 templates: PromptTemplates = DEFAULT_TEMPLATES):
        self.resolution = resolution
        self.seed = seed
        self.mix = mix
        self.templates = templates
        self.scenes = cs.split_attributes("train")
        self.caption_style = dict(name_first=True, size_synonyms=True, question_frames=True)

    def __call__(self, step: int, size: int) -> list[Chat]:
        rng = random.Random(self.seed * 1_000_003 + step)
        chats = []
        for _ in range(size):
            draw = rng.random()
            if draw < self.mix.caption:
                chats.append(self.caption_chat(rng))
            elif draw < self.mix.caption + self.mix.text:
                chats.append(self.text_chat(rng))
            else:
                chats.append(self.question_chat(rng))
        return chats

    def question_chat(self, rng: random.Random) -> Chat:
        scene = rng.choice(self.scenes)
        if self.mix.focus and rng.random() < self.mix.focus_share:
            asked = rng.choice(self.mix.focus)
        else:
            asked = rng.choice(cs.ATTRIBUTES)
        recolored = asked != "color" and rng.random() < self.mix.recolor
        fill = cs.off_palette_fill(scene, rng) if recolored else None
        image = cs.render(scene, rng.getrandbits(31), self.resolution, fill=fill)
        text = cs.instruction(asked, rng, "train")
        if rng.random() < self.mix.phrasing_noise:
            text = cs.noisy_instruction(text, rng)
        return Chat(self.templates.image_prompt(text), scene.get(asked), image)

    def caption_chat(self, rng: random.Random) -> Chat:
        scene = rng.choice(self.scenes)
        image = cs.render(scene, rng.getrandbits(31), self.resolution)
        return Chat(rng.choice(CAPTION_REQUESTS), cs.caption(scene, rng, **self.caption_style), image)

    def text_chat(self, rng: random.Random) -> Chat:
        scene = rng.choice(self.scenes)
        attribute = rng.choice(cs.ATTRIBUTES)
        value = scene.get(attribute)
        if rng.random() < 0.25:
            return Chat(self.templates.text_prompt(value), value)
        return Chat(self.templates.text_prompt(single_attribute_caption(attribute, value, rng)), value)

    def texts(self) -> list[str]:
        """Text the chats use (for building a tokenizer)."""
        rng = random.Random(self.seed)
        captions = [cs.caption(rng.choice(self.scenes), rng, **self.caption_style) for _ in range(5000)]
        phrasings = [p for group in cs.TRAIN_PHRASINGS.values() for p in group]
        values = [v for group in cs.VALUES.values() for v in group]
        prompts = [self.templates.image_prompt("x"), self.templates.image_prompt(""), self.templates.text_prompt("x"),
                   *CAPTION_REQUESTS]
        return captions + phrasings * 20 + values * 20 + prompts * 20


def single_attribute_caption(attribute: str, value: str, rng: random.Random) -> str:
    """A caption that names only ``attribute`` ("a teal backdrop", "which scale? big", "the form is a star")."""
    while True:
        template = cs.caption(_SLOTS, rng, mentioning=attribute, name_first=True, question_frames=True)
        if template.count("{") == 1:
            break
    if attribute == "size" and rng.random() < 0.5:
        value = cs.SIZE_SYNONYMS[value]
    return template.replace("{" + attribute + "}", value)
