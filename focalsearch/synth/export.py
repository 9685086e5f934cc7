"""Write a ColorShape collection to disk: images, metadata, and LLaVA-style instruction data."""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path

from focalsearch.errors import UserError
from focalsearch.synth import colorshape as cs


def write_colorshape(out: str | Path, n: int, *, seed: int = 0, resolution: int = 64, split: str = "train") -> Path:
    """Write ``n`` scenes of a split as PNGs plus ``metadata.jsonl`` and ``instructions.json``.

    ``instructions.json`` is in the LLaVA conversation format that ``focalsearch train`` reads,
    with one question per attribute per image (training phrasings for the train split, held-out
    phrasings for the held-out split).
    """
    if n < 1:
        raise UserError("--n must be at least 1")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    scenes = cs.split_attributes(split)
    phrasing = "train" if split == "train" else "heldout"
    metadata, conversations = [], []
    for number in range(n):
        scene = rng.choice(scenes)
        name = f"images/{number:05d}-{scene.color}-{scene.shape}-on-{scene.background}.png"
        cs.render(scene, rng.getrandbits(31), resolution).save(out / name)
        metadata.append({"image": name, **asdict(scene), "caption": cs.caption(scene, rng)})
        turns = []
        for attribute in cs.ATTRIBUTES:
            question = cs.instruction(attribute, rng, phrasing)
            turns.append({"from": "human", "value": ("<image>\n" if not turns else "") + question})
            turns.append({"from": "gpt", "value": scene.get(attribute)})
        conversations.append({"id": f"{number:05d}", "image": name, "conversations": turns})
    (out / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metadata))
    (out / "instructions.json").write_text(json.dumps(conversations, indent=1))
    return out
