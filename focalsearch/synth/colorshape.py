"""ColorShape: a procedural world of coloured shapes with independent attributes (design §4).

Each image is fully described by five attributes. The world yields caption data (to pretrain a
small CLIP), instruction data (image, instruction, answer) with several phrasings per attribute, and
the conditional retrieval benchmark: for a query and a condition, one positive shares only the
queried attribute, while the distractors share every other attribute.

Held out from training: the (color, shape) pairs in HELD_OUT_PAIRS, and the phrasings in
HELDOUT_PHRASINGS, HELDOUT_SYNONYMS and HELDOUT_QUESTIONS. Every word of a held-out phrasing occurs in the captions, so
the text tower knows it.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw

COLORS = {
    "red": (215, 38, 38),
    "green": (40, 160, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 40),
    "purple": (135, 55, 185),
    "orange": (245, 135, 25),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
COUNTS = ("one", "two", "three", "four")
BACKGROUNDS = {
    "white": (245, 245, 245),
    "black": (25, 25, 25),
    "gray": (125, 125, 125),
    "beige": (225, 205, 160),
    "teal": (30, 115, 120),
    "pink": (245, 175, 205),
}
SIZES = ("small", "large")
ATTRIBUTES = ("color", "shape", "count", "background", "size")
COLOR_FREE_ATTRIBUTES = ("shape", "count", "size")  # answers that survive turning the image gray
VALUES: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "count": COUNTS,
    "background": tuple(BACKGROUNDS),
    "size": SIZES,
}
# Compositions never shown in training: each colour once, no shape more than twice.
HELD_OUT_PAIRS = frozenset(
    {("red", "star"), ("green", "circle"), ("blue", "cross"), ("yellow", "square"), ("purple", "triangle"), ("orange", "star")}
)

TRAIN_PHRASINGS: dict[str, tuple[str, ...]] = {
    "color": ("color", "what color is the object?", "what is the color of the shapes?", "object color", "which color are the objects?"),
    "shape": ("shape", "what shape is the object?", "what kind of shapes are there?", "object shape", "which shape do the objects have?"),
    "count": ("count", "how many shapes are there?", "how many objects are there?", "number of objects", "quantity"),
    "background": ("background", "background color", "what color is the background?", "what is behind the objects?"),
    "size": ("size", "what size are the shapes?", "how big are the objects?", "object size"),
}
# New wordings that the instruction data never uses; their words are all known from the captions.
HELDOUT_PHRASINGS: dict[str, tuple[str, ...]] = {
    "color": ("the color of the items", "which color do the shapes have?"),
    "shape": ("the shape of the items", "what shape are the items?"),
    "count": ("the number of shapes", "how many items are shown?"),
    "background": ("the background of the items", "which background do the shapes have?"),
    "size": ("the size of the items", "which size do the shapes have?"),
}
# Harder: the attribute's own word is replaced by a synonym that only the captions use.
HELDOUT_SYNONYMS: dict[str, tuple[str, ...]] = {
    "color": ("hue", "what hue are the shapes?"),
    "shape": ("form", "which form do the items have?"),
    "count": ("number of items", "how many items are there in number?"),
    "background": ("backdrop", "what is the backdrop?"),
    "size": ("scale", "how large are the items?"),
}
# Hardest: questions whose sentence frame and attribute word both come from the captions only (the
# frames of "which hue? {color}.", "how large? {size}.", "with a {color} hue", "the form is a
# {shape}", "shapes that have a {shape} form", "the number of {color} items is {count}", "on a
# {background} backdrop", "items of {size} scale"), never from an instruction.
HELDOUT_QUESTIONS: dict[str, tuple[str, ...]] = {
    "color": ("which hue?", "with which hue?"),
    "shape": ("the form is a", "shapes that have which form?"),
    "count": ("the number of items is", "the number of items is which?"),
    "background": ("on a backdrop", "on which backdrop?"),
    "size": ("how large?", "items of which scale?"),
}
PHRASINGS = {"train": TRAIN_PHRASINGS, "heldout": HELDOUT_PHRASINGS, "synonyms": HELDOUT_SYNONYMS, "questions": HELDOUT_QUESTIONS}

_CAPTION_TEMPLATES = (
    "{count} {size} {color} {shape}s on a {background} background",
    "a {background} backdrop with {count} {color} {shape}s",
    "{count} {size} {shape}s with a {color} hue on {background}",
    "the number of {color} items is {count}",
    "{count} items shown in {color} on a {background} backdrop",
    "{size} {color} {shape} forms on a {background} background",
    "{color} {shape}s of {size} scale",
    "the items are {size} and {color}, the form is a {shape}",
    "{count} objects, {color} color, {shape} shape, {background} backdrop",
    "{color}",
    "{shape}",
    "{count}",
    "{background} background",
    "{size} objects",
    "a {color} hue",
    "the form is a {shape}",
    "the number of objects is {count}",
    "a {background} backdrop",
    "items of {size} scale",
    "how large? {size}. how many? {count}. which hue? {color}.",
    "{count} {color} shapes that have a {shape} form",
    "what a {size} {color} {shape}",
    "the {shape}s do not touch on the {background} backdrop",
    "there are {count} {color} {shape}s of {size} size",
)


_TEMPLATES_NAMING = {a: tuple(t for t in _CAPTION_TEMPLATES if "{" + a + "}" in t) for a in ATTRIBUTES}


@dataclass(frozen=True)
class Attributes:
    """One ColorShape scene."""

    color: str
    shape: str
    count: str
    background: str
    size: str

    def get(self, attribute: str) -> str:
        return getattr(self, attribute)

    def replace(self, **changes: str) -> Attributes:
        return Attributes(**{**asdict(self), **changes})


def all_attributes() -> list[Attributes]:
    """Every combination of attribute values (1,440 scenes)."""
    return [Attributes(*values) for values in itertools.product(*(VALUES[a] for a in ATTRIBUTES))]


def is_held_out(attrs: Attributes) -> bool:
    """Whether a scene's composition is kept out of training."""
    return (attrs.color, attrs.shape) in HELD_OUT_PAIRS


def split_attributes(split: str) -> list[Attributes]:
    """Scenes of the 'train' or 'heldout' split."""
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}")
    return [a for a in all_attributes() if is_held_out(a) == (split == "heldout")]


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        return [
            (cx + (r if i % 2 == 0 else r * 0.45) * math.cos(-math.pi / 2 + i * math.pi / 5),
             cy + (r if i % 2 == 0 else r * 0.45) * math.sin(-math.pi / 2 + i * math.pi / 5))
            for i in range(10)
        ]
    if shape == "cross":
        a, b = r, r * 0.35
        return [(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b), (cx + a, cy + b), (cx + b, cy + b),
                (cx + b, cy + a), (cx - b, cy + a), (cx - b, cy + b), (cx - a, cy + b), (cx - a, cy - b), (cx - b, cy - b)]
    return None  # circle


def render(
    attrs: Attributes, seed: int, resolution: int = 64, supersample: int = 4, fill: tuple[int, int, int] | None = None
) -> Image.Image:
    """Draw a scene; the seed places the objects, so one scene has many distinct images.

    ``fill`` paints the objects in another colour than ``attrs.color`` (see :func:`off_palette_fill`).
    """
    rng = random.Random(seed)
    fill = fill or COLORS[attrs.color]
    side = resolution * supersample
    image = Image.new("RGB", (side, side), BACKGROUNDS[attrs.background])
    draw = ImageDraw.Draw(image)
    # A 2x2 grid keeps even four large objects apart and big enough for a small ViT to tell apart.
    cell = side / 2
    radius = cell * (0.26 if attrs.size == "small" else 0.42)
    cells = rng.sample(range(4), COUNTS.index(attrs.count) + 1)
    for index in cells:
        slack = cell / 2 - radius
        cx = (index % 2 + 0.5) * cell + rng.uniform(-slack, slack) * 0.9
        cy = (index // 2 + 0.5) * cell + rng.uniform(-slack, slack) * 0.9
        points = _shape_points(attrs.shape, cx, cy, radius)
        if points is None:
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
        else:
            draw.polygon(points, fill=fill)
    return image.resize((resolution, resolution), Image.Resampling.LANCZOS) if supersample > 1 else image


def _luma(rgb: tuple[int, int, int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]  # PIL's RGB -> L weights


def visible_in_grayscale(attrs: Attributes, min_contrast: float = 30.0) -> bool:
    """Whether the objects stand out from the background once the image is gray (red on teal does not)."""
    return abs(_luma(COLORS[attrs.color]) - _luma(BACKGROUNDS[attrs.background])) >= min_contrast


def nearest_color(rgb: tuple[int, int, int]) -> str:
    """The palette colour a colour would be named by."""
    return min(COLORS, key=lambda name: sum((a - b) ** 2 for a, b in zip(COLORS[name], rgb)))


def off_palette_fill(attrs: Attributes, rng: random.Random, min_distance: float = 60.0) -> tuple[int, int, int]:
    """A random object colour for a scene whose question is not about colour.

    Shape, count and size must not be learned as properties of the few colours each comes in, so
    such scenes may show their objects in any colour, except one that would be named as a held-out
    partner of the shape (no red-ish star is ever shown) or one too close to the background to see.
    """
    background = BACKGROUNDS[attrs.background]
    while True:
        rgb = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        if (nearest_color(rgb), attrs.shape) in HELD_OUT_PAIRS:
            continue
        if math.dist(rgb, background) >= min_distance:
            return rgb


# The words by which captions name each attribute.
NAME_WORDS = {"color": ("color", "hue"), "shape": ("shape", "form"), "count": ("number",), "background": ("background", "backdrop"),
              "size": ("size", "scale")}
_NAMED_ATTRIBUTE = {word: attribute for attribute, words in NAME_WORDS.items() for word in words}

# Captions that put a name first and alone ("backdrop: teal", "which scale? large"): the base templates
# never show a name outside a sentence, which is how users type it.
_NAME_FIRST_TEMPLATES = tuple(
    frame.format(name=name, slot="{" + attribute + "}")
    for attribute, names in NAME_WORDS.items() for name in names for frame in ("{name}: {slot}", "which {name}? {slot}")
)
_NAME_FIRST_NAMING = {a: tuple(t for t in _NAME_FIRST_TEMPLATES if "{" + a + "}" in t) for a in ATTRIBUTES}


@functools.cache
def question_frame_templates() -> dict[str | None, tuple[str, ...]]:
    """Captions that ask a training phrasing's question with any attribute name in it, then answer it
    ("which form do the objects have? star", "what backdrop is the object? teal"), by the attribute
    they name (``None``: all of them).

    The sentence templates use a caption-only name ("form") only in statements, so the text tower
    never learns it in the question frames that instructions use. The frames come from the training
    phrasings that hold one name word; a caption that contains a held-out phrasing, synonym or
    question of two words or more as a run of words ("what hue are the shapes?", "which hue?") is
    left out (one word alone, "hue", is what the captions are there to teach).
    """
    frames = dict.fromkeys(
        " ".join("{name}" + w[len(w.rstrip("?")):] if w.rstrip("?") in _NAMED_ATTRIBUTE else w for w in phrasing.split(" "))
        for group in TRAIN_PHRASINGS.values() for phrasing in group
        if len(phrasing.split(" ")) > 1 and sum(w.rstrip("?") in _NAMED_ATTRIBUTE for w in phrasing.split(" ")) == 1
    )
    by_attribute: dict[str | None, list[str]] = {a: [] for a in ATTRIBUTES}
    for frame in frames:
        for attribute, words in NAME_WORDS.items():
            for name in words:
                text = frame.format(name=name) + " {" + attribute + "}"
                if not contains_held_out(_words(text), min_words=2):
                    by_attribute[attribute].append(text)
    by_attribute[None] = [t for a in ATTRIBUTES for t in by_attribute[a]]
    return {a: tuple(t) for a, t in by_attribute.items()}


# Everyday words for the sizes, used in captions as often as the answers' own words.
SIZE_SYNONYMS = {"large": "big", "small": "little"}


def caption(attrs: Attributes, rng: random.Random, mentioning: str | None = None, *, name_first: bool = False,
            size_synonyms: bool = False, question_frames: bool = False) -> str:
    """A caption of the scene in one of several templates and synonyms (one that names ``mentioning``).

    ``name_first`` adds the name-first frames (a third of the captions use one); ``question_frames``
    adds the question-frame captions (``question_frame_templates``: a quarter of the rest);
    ``size_synonyms`` calls the size "big" or "little" in half the captions. All off, only the sentence
    templates are used (and the random stream is the one they always drew); the build turns all on.
    """
    templates = _TEMPLATES_NAMING[mentioning] if mentioning else _CAPTION_TEMPLATES
    if name_first and rng.random() < 1 / 3:
        templates = _NAME_FIRST_NAMING[mentioning] if mentioning else _NAME_FIRST_TEMPLATES
    elif question_frames and rng.random() < 1 / 4:
        templates = question_frame_templates()[mentioning]
    values = asdict(attrs)
    if size_synonyms and rng.random() < 0.5:
        values["size"] = SIZE_SYNONYMS[values["size"]]
    return rng.choice(templates).format(**values)


def name_swapped(text: str, rng: random.Random) -> str:
    """The caption with one attribute name replaced by another attribute's name ('' if it names none):
    a negative that only the name words tell apart from the caption."""
    words = text.split(" ")
    # a name itself ("form") before a plural that may only mean the objects ("two red shapes", "of the shapes")
    spots = ([i for i, w in enumerate(words) if w.rstrip(",.?:") in _NAMED_ATTRIBUTE]
             or [i for i, w in enumerate(words) if w.rstrip("s,.?:") in _NAMED_ATTRIBUTE])
    if not spots:
        return ""
    i = rng.choice(spots)
    stem = words[i].rstrip("s,.?:")
    tail = words[i][len(stem):]
    other = rng.choice([a for a in NAME_WORDS if a != _NAMED_ATTRIBUTE[stem]])
    words[i] = rng.choice(NAME_WORDS[other]) + tail
    return " ".join(words)


def variants(
    rng: random.Random, scenes: list[Attributes], group: int, attribute: str | None = None
) -> tuple[str, list[Attributes]]:
    """A scene and copies of it that differ in one attribute (random unless given): each other's hard negatives."""
    base = rng.choice(scenes)
    attribute = attribute or rng.choice(ATTRIBUTES)
    values = list(VALUES[attribute])
    rng.shuffle(values)
    allowed = set(scenes)
    out = []
    for value in values:
        candidate = base.replace(**{attribute: value})
        if candidate in allowed:
            out.append(candidate)
    return attribute, [out[i % len(out)] for i in range(group)]


def caption_vocabulary() -> set[str]:
    """Every word the captions can use."""
    words = set()
    for template in _CAPTION_TEMPLATES:
        for attrs in (Attributes(c, s, n, b, z) for c, s, n, b, z in zip(*(VALUES[a] * 3 for a in ATTRIBUTES))):
            words.update(_words(template.format(**asdict(attrs))))
    for values in VALUES.values():
        for value in values:
            words.update(_words(value))
            words.update(_words(value + "s"))
    return words


def _words(text: str) -> list[str]:
    return "".join(ch if ch.isalnum() else " " for ch in text.lower()).split()


# Words that name what a question asks about; everything else in a phrasing is filler.
INSTRUCTION_KEYWORDS = frozenset(
    {"color", "shape", "kind", "count", "many", "number", "quantity", "background", "behind", "size", "big"}
)
_SYNONYM_WORDS = frozenset({"hue", "form", "forms", "backdrop", "scale", "large"})


@functools.cache
def _filler_words() -> tuple[str, ...]:
    values = {w for vs in VALUES.values() for v in vs for w in _words(v) + _words(v + "s")}
    return tuple(sorted(caption_vocabulary() - values - INSTRUCTION_KEYWORDS - _SYNONYM_WORDS))


@functools.cache
def _held_out_word_sequences(min_words: int = 1) -> frozenset[tuple[str, ...]]:
    tables = (HELDOUT_PHRASINGS, HELDOUT_SYNONYMS, HELDOUT_QUESTIONS)
    runs = (tuple(_words(p)) for table in tables for group in table.values() for p in group)
    return frozenset(run for run in runs if len(run) >= min_words)


def contains_held_out(words: list[str], min_words: int = 1) -> bool:
    """Whether a held-out phrasing, synonym or question of at least ``min_words`` words occurs anywhere
    in ``words`` as a run of words."""
    runs = _held_out_word_sequences(min_words)
    lengths = {len(r) for r in runs}
    return any(tuple(words[i : i + n]) in runs for n in lengths for i in range(len(words) - n + 1))


def noisy_instruction(text: str, rng: random.Random, drop: float = 0.3, max_inserted: int = 2) -> str:
    """A training phrasing with some filler words dropped and some caption words inserted.

    Teaches that only the words naming the attribute matter, not a phrasing's sentence frame (in
    the training phrasings "do ... have" only ever asks about shape). No held-out phrasing,
    synonym or question ever occurs in the result, not even inside a longer instruction
    ("how number of items objects" would teach "number of items").
    """
    words = _words(text)
    fillers = _filler_words()
    while True:
        kept = [w for w in words if w in INSTRUCTION_KEYWORDS or rng.random() >= drop] or words
        for _ in range(rng.randint(0, max_inserted)):
            kept.insert(rng.randint(0, len(kept)), rng.choice(fillers))
        if not contains_held_out(kept):
            return " ".join(kept) + ("?" if text.endswith("?") else "")


def instruction(attribute: str, rng: random.Random, phrasing: str = "train") -> str:
    """A phrasing of the question about ``attribute`` from the 'train', 'heldout', 'synonyms' or 'questions' set."""
    return rng.choice(PHRASINGS[phrasing][attribute])


@dataclass(frozen=True)
class BenchmarkItem:
    """One retrieval problem: under ``condition``, the positive must outrank every distractor."""

    condition: str
    query: Attributes
    query_seed: int
    positive: Attributes
    positive_seed: int
    distractors: tuple[tuple[Attributes, int], ...]


def benchmark_items(per_condition: int = 100, distractors: int = 4, seed: int = 0) -> list[BenchmarkItem]:
    """The ColorShape retrieval benchmark on the held-out split.

    Queries are held-out compositions; a positive (which must differ from the query in colour and
    shape for most conditions) may be any scene. Every image is a fresh render, never a training one.
    """
    rng = random.Random(seed)
    heldout = split_attributes("heldout")
    scenes = all_attributes()
    items = []
    for condition in ATTRIBUTES:
        for _ in range(per_condition):
            query = rng.choice(heldout)
            # The positive differs from the query in every attribute but the condition.
            candidates = [
                a for a in scenes
                if a.get(condition) == query.get(condition)
                and all(a.get(o) != query.get(o) for o in ATTRIBUTES if o != condition)
            ]
            positive = rng.choice(candidates)
            others = [v for v in VALUES[condition] if v != query.get(condition)]
            chosen = [rng.choice(others) for _ in range(distractors)]
            if distractors <= len(others):
                chosen = rng.sample(others, distractors)
            items.append(
                BenchmarkItem(
                    condition=condition,
                    query=query,
                    query_seed=rng.getrandbits(31),
                    positive=positive,
                    positive_seed=rng.getrandbits(31),
                    distractors=tuple((query.replace(**{condition: value}), rng.getrandbits(31)) for value in chosen),
                )
            )
    return items
