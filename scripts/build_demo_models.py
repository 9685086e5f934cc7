"""Rebuild the bundled demo checkpoints from nothing, deterministically for a seed.

    python scripts/build_demo_models.py            # writes focalsearch/checkpoints/{demo-clip,demo}

1. a byte-level BPE tokenizer (deterministic) learned from ColorShape captions and training phrasings, and a random small CLIP;
2. `demo-clip`: that CLIP trained on (image, caption) pairs of the ColorShape training split. Each caption
   has a negative that differs only in an attribute's name; a third of the captions put a name first and
   alone ("backdrop: teal", "which scale? large"), a sixth ask a training question with any name in it and
   answer it ("which form do the objects have? star"), and half call the size "big" or "little", so that
   the text tower places synonyms, bare names and "how large" beside the words that instructions use, in
   statements and in questions alike;
3. `demo`: demo-clip turned into FocalLens-CLIP and instruction-tuned on (image, instruction, answer),
   text tower included for the first 1,000 steps (the small caption-trained text tower does not tell
   shape and count words apart), with a term holding its states for captions where demo-clip put them.
   Half of the questions not about colour show the objects in a random colour (never one named as a
   held-out partner of the shape), so that shape is not learned as a property of the few colours
   each shape comes in; half of the instructions lose and gain filler words, so that the attribute
   word decides the condition, not the sentence frame; images with the same answer are pulled
   together (see ColorShapeSource and same_answer_image_loss); and a further share of the groups ask
   about shape, the attribute that is hardest to see on unseen (colour, shape) pairs;
4. `demo` polished: a short second schedule at a lower learning rate, text tower frozen, with fewer
   extra shape questions, which gives back to count and size what the shape focus took from them.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from focalsearch.models.tiny import save_tiny_clip
from focalsearch.train.data import ColorShapeSource
from focalsearch.train.loop import TrainOptions, train

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "focalsearch" / "checkpoints"
ARCHITECTURE = dict(image_size=64, patch_size=8, width=128, layers=4, heads=4, projection_dim=128, context_length=32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--caption-steps", type=int, default=600)
    parser.add_argument("--instruction-steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--grayscale", type=float, default=0.0, help="share of colour-free questions shown in gray")
    parser.add_argument("--recolor", type=float, default=0.5, help="share of questions not about colour shown in a random colour")
    parser.add_argument("--image-weight", type=float, default=0.5, help="weight of the same-answer image-image term")
    parser.add_argument("--phrasing-noise", type=float, default=0.5, help="share of instructions with filler words dropped/inserted")
    parser.add_argument("--name-negatives", action=argparse.BooleanOptionalAction, default=True,
                        help="give each caption a negative that differs only in an attribute's name")
    parser.add_argument("--name-first-captions", action=argparse.BooleanOptionalAction, default=True,
                        help="add captions that put an attribute's name first and alone ('backdrop: teal', 'which scale? large')")
    parser.add_argument("--size-synonym-captions", action=argparse.BooleanOptionalAction, default=True,
                        help="call the size 'big' or 'little' in half the captions")
    parser.add_argument("--question-frame-captions", action=argparse.BooleanOptionalAction, default=True,
                        help="add captions that ask a training question with any attribute name in it, then answer it "
                             "('which form do the objects have? star')")
    parser.add_argument("--next-token-weight", type=float, default=0.0,
                        help="weight of the caption phase's next-token term (ties words used in the same caption contexts)")
    parser.add_argument("--text-steps", type=int, default=1000, help="instruction steps after which the text tower is frozen")
    parser.add_argument("--text-anchor-weight", type=float, default=5.0,
                        help="weight of the term that holds the tuned text tower's caption states at demo-clip's, "
                             "so that what the captions tied (synonyms) stays tied while the text tower is tuned")
    parser.add_argument("--shape-focus", type=float, default=0.6,
                        help="extra share of instruction groups asked about shape (the hardest attribute)")
    parser.add_argument("--polish-steps", type=int, default=600, help="steps of the second, low learning-rate schedule (0: none)")
    parser.add_argument("--polish-shape-focus", type=float, default=0.3, help="--shape-focus of the polish schedule")
    args = parser.parse_args()
    torch.set_num_threads(2)  # the same arithmetic on every machine, for reproducible weights
    started = time.perf_counter()
    caption_style = dict(name_first_captions=args.name_first_captions, size_synonym_captions=args.size_synonym_captions,
                         question_frame_captions=args.question_frame_captions)
    captions = ColorShapeSource("caption", ARCHITECTURE["image_size"], seed=args.seed + 1, name_negatives=args.name_negatives,
                                **caption_style)

    def instructions(seed: int, shape_focus: float) -> ColorShapeSource:
        return ColorShapeSource("instruction", ARCHITECTURE["image_size"], seed=seed, grayscale=args.grayscale, recolor=args.recolor,
                                phrasing_noise=args.phrasing_noise, focus="shape", focus_share=shape_focus,
                                with_captions=args.text_anchor_weight > 0, **caption_style)

    with tempfile.TemporaryDirectory() as scratch:
        init = save_tiny_clip(Path(scratch) / "init", captions.texts(), seed=args.seed, vocab_size=1000, **ARCHITECTURE)
        for name in ("demo-clip", "demo"):
            shutil.rmtree(args.out / name, ignore_errors=True)
        train(str(init), args.out / "demo-clip", captions,
              TrainOptions(objective="caption", steps=args.caption_steps, batch_size=args.batch_size, lr=5e-4,
                           warmup=200, seed=args.seed, device="cpu", next_token_weight=args.next_token_weight))
        train(str(args.out / "demo-clip"), args.out / "demo", instructions(args.seed + 2, args.shape_focus),
              TrainOptions(objective="instruction", steps=args.instruction_steps, batch_size=args.batch_size, lr=6e-4,
                           warmup=200, seed=args.seed, device="cpu", train_text=True, image_weight=args.image_weight,
                           text_steps=args.text_steps, text_anchor_weight=args.text_anchor_weight))
        if args.polish_steps:
            train(str(args.out / "demo"), Path(scratch) / "polished", instructions(args.seed + 3, args.polish_shape_focus),
                  TrainOptions(objective="instruction", steps=args.polish_steps, batch_size=args.batch_size, lr=2e-4,
                               warmup=50, seed=args.seed, device="cpu", train_text=False, image_weight=args.image_weight))
            shutil.rmtree(args.out / "demo")
            shutil.copytree(Path(scratch) / "polished", args.out / "demo", ignore=shutil.ignore_patterns("checkpoint-last"))
    print(f"wrote {args.out / 'demo-clip'} and {args.out / 'demo'} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
