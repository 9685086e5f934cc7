"""Why held-out synonyms fail on the demo: what the text towers make of attribute words, and what the
instruction data contains (issue 14's diagnosis; measures, changes nothing).

    python benchmarks/colorshape_words.py [--clip demo-clip] [--focallens demo] [--samples 400000] [--json OUT]

(a) For the caption-pretrained CLIP and the instruction-tuned FocalLens-CLIP: the cosine between each
    held-out synonym ("hue", "form", "number of items", "backdrop", "scale") and the training word of
    its attribute, and which training word is nearest, both on the text tower's token states (mean
    over the word tokens: what the instruction projection reads) and on the text embedding.
(b) For both: pairwise cosines of each attribute's value words ("circle", "square", ...), to see
    whether caption pretraining collapses them.
(c) The instruction generator as the trainer calls it (a training phrasing, then
    `noisy_instruction`): how many of `--samples` instructions contain a held-out phrasing or synonym
    as a run of words, or a synonym word.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from focalsearch.synth import colorshape as cs

PAIRS = {"color": ("color", "hue"), "shape": ("shape", "form"), "count": ("number of objects", "number of items"),
         "background": ("background", "backdrop"), "size": ("size", "scale")}
SYNONYM_WORDS = frozenset({"hue", "form", "forms", "backdrop", "scale", "large"})


def token_states(encoder, text: str) -> np.ndarray:
    tokens = encoder.tokenizer([text], return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = encoder.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state[0]
    hidden = hidden[1:-1].mean(0) if hidden.shape[0] > 2 else hidden.mean(0)  # the word tokens, without BOS/EOS
    return (hidden / hidden.norm()).numpy()


def text_embedding(encoder, text: str) -> np.ndarray:
    return encoder.encode_texts([text])[0]


def word_report(encoder) -> dict:
    out = {}
    for kind, embed in (("token_states", token_states), ("text_embedding", text_embedding)):
        trained = {a: embed(encoder, words[0]) for a, words in PAIRS.items()}
        rows = {}
        for attribute, (_, synonym) in PAIRS.items():
            vector = embed(encoder, synonym)
            cosines = {a: float(vector @ t) for a, t in trained.items()}
            nearest = max(cosines, key=cosines.get)
            rows[synonym] = {"to_its_attribute": round(cosines[attribute], 3), "nearest": nearest, "nearest_cosine": round(cosines[nearest], 3)}
        out[kind] = rows
    values = {}
    for attribute, names in cs.VALUES.items():
        vectors = np.stack([text_embedding(encoder, name) for name in names])
        off = (vectors @ vectors.T)[~np.eye(len(names), dtype=bool)]
        values[attribute] = {"min": round(float(off.min()), 3), "mean": round(float(off.mean()), 3), "max": round(float(off.max()), 3)}
    out["value_words_pairwise_cosine"] = values
    return out


def leak_report(samples: int, seed: int = 0) -> dict:
    held_out = [tuple(cs._words(p)) for table in (cs.HELDOUT_PHRASINGS, cs.HELDOUT_SYNONYMS) for group in table.values() for p in group]
    phrasings = [p for group in cs.TRAIN_PHRASINGS.values() for p in group]
    rng = random.Random(seed)
    runs, examples, synonym_words = Counter(), {}, 0
    for _ in range(samples):
        text = cs.noisy_instruction(rng.choice(phrasings), rng)
        words = tuple(cs._words(text))
        for phrase in held_out:
            if any(words[i:i + len(phrase)] == phrase for i in range(len(words) - len(phrase) + 1)):
                runs[" ".join(phrase)] += 1
                examples.setdefault(" ".join(phrase), text)
        synonym_words += bool(SYNONYM_WORDS & set(words))
    return {"samples": samples, "containing_a_held_out_phrase": dict(runs), "examples": examples,
            "containing_a_synonym_word": synonym_words}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", default="demo-clip")
    parser.add_argument("--focallens", default="demo")
    parser.add_argument("--samples", type=int, default=400_000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from focalsearch.models import create_encoder

    report = {}
    for label, model, encoder in (("caption-pretrained", args.clip, "clip"), ("instruction-tuned", args.focallens, "focallens")):
        report[label] = word_report(create_encoder(model, encoder=encoder, device="cpu"))
        for kind in ("token_states", "text_embedding"):
            rows = "; ".join(f"{s!r}: {r['to_its_attribute']:.2f} (nearest {r['nearest']} {r['nearest_cosine']:.2f})"
                             for s, r in report[label][kind].items())
            print(f"{label:18} {kind:14} {rows}")
        for attribute, c in report[label]["value_words_pairwise_cosine"].items():
            print(f"{label:18} {attribute} value words, pairwise cosine: min {c['min']:.2f} mean {c['mean']:.2f} max {c['max']:.2f}")
    report["instruction_data"] = leak_report(args.samples)
    leaks = report["instruction_data"]
    print(f"instruction generator, {leaks['samples']:,} samples: held-out phrases inside {leaks['containing_a_held_out_phrase']}, "
          f"synonym words in {leaks['containing_a_synonym_word']}; e.g. {leaks['examples']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
