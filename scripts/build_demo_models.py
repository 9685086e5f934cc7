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

    python scripts/build_demo_models.py --mllm     # writes focalsearch/checkpoints/demo-mllm only

`demo-mllm`, a public LLaVA in miniature (FocalLens-MLLM's starting point): demo-clip's vision tower,
LLaVA's two-layer MLP projector and a small Llama trained from scratch, generatively (next-token
cross-entropy on the answers only) on ColorShape chats of the training split (ColorShapeChats:
one-word answers to training questions, captions, and text-only chats answered by a value word).
It is built from the demo-clip already in --out; its prompted-only R@1 per tier is measured through
the MLLM encoder and written to its training_log.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a machine shared with other jobs, spinning threads
# make a two-thread run several times slower than one thread. The arithmetic is the same.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from focalsearch.models.tiny import save_tiny_clip  # noqa: E402
from focalsearch.train.colorshape_chats import ChatMix  # noqa: E402
from focalsearch.train.data import ColorShapeSource  # noqa: E402
from focalsearch.train.generative import GenerativeOptions  # noqa: E402
from focalsearch.train.loop import TrainOptions, train  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "focalsearch" / "checkpoints"
ARCHITECTURE = dict(image_size=64, patch_size=8, width=128, layers=4, heads=4, projection_dim=128, context_length=32)
# demo-mllm: the language model and how the projector reads demo-clip's vision tower.
MLLM_ARCHITECTURE = dict(width=256, layers=4, heads=4, intermediate=1024, vision_feature_layer=-1,
                         vision_feature_select_strategy="full")
MLLM_VOCAB = 1000
MLLM_MIX = ChatMix(caption=0.2, text=0.2, phrasing_noise=0.5, recolor=0.5)
MLLM_TRAINING = GenerativeOptions(steps=500, batch_size=64, lr=2e-3, warmup=100, train_vision_from=100, vision_lr=3e-4,
                                  per_chat=True)


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
    parser.add_argument("--mllm", action="store_true", help="build demo-mllm (from the demo-clip in --out) instead of the two above")
    parser.add_argument("--mllm-steps", type=int, default=MLLM_TRAINING.steps)
    parser.add_argument("--mllm-batch-size", type=int, default=MLLM_TRAINING.batch_size)
    parser.add_argument("--mllm-lr", type=float, default=MLLM_TRAINING.lr)
    parser.add_argument("--mllm-vision-from", type=int, default=MLLM_TRAINING.train_vision_from,
                        help="step from which demo-mllm's vision tower trains too (-1: frozen throughout)")
    parser.add_argument("--mllm-per-condition", type=int, default=200, help="benchmark queries per condition for its training log")
    args = parser.parse_args()
    torch.set_num_threads(2)  # the same arithmetic on every machine, for reproducible weights
    if args.mllm:
        build_mllm(args)
        return
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


def build_mllm(args: argparse.Namespace) -> None:
    """demo-mllm: build, train generatively, save in float16, then measure prompted-only R@1 through the MLLM encoder."""
    from focalsearch.bench.colorshape import recall_at_1
    from focalsearch.models import create_encoder
    from focalsearch.models.saving import write_checkpoint
    from focalsearch.models.tiny_mllm import build_mllm_tokenizer, tiny_llava
    from focalsearch.synth import colorshape as cs
    from focalsearch.train.colorshape_chats import ColorShapeChats
    from focalsearch.train.generative import train_generative

    started = time.perf_counter()
    clip = args.out / "demo-clip"
    if not (clip / "config.json").is_file():
        raise SystemExit(f"{clip} is missing; build it first (python scripts/build_demo_models.py)")
    chats = ColorShapeChats(ARCHITECTURE["image_size"], seed=args.seed + 4, mix=MLLM_MIX)
    tokenizer = build_mllm_tokenizer(chats.texts(), MLLM_VOCAB)
    model, processor = tiny_llava(tokenizer, vision_from=clip, seed=args.seed, **MLLM_ARCHITECTURE)
    options = MLLM_TRAINING.__class__(**{
        **asdict(MLLM_TRAINING), "steps": args.mllm_steps, "batch_size": args.mllm_batch_size, "lr": args.mllm_lr,
        "train_vision_from": None if args.mllm_vision_from < 0 else args.mllm_vision_from, "seed": args.seed})
    trained = train_generative(model, processor, chats, options)
    out = args.out / "demo-mllm"
    write_checkpoint(out, model.half(), tokenizer, processor)  # float16 on disk; encoders compute in float32
    for path in out.iterdir():
        path.chmod(0o644)
    measuring = time.perf_counter()
    encoder = create_encoder(str(out), encoder="mllm", device="cpu", batch_size=256, precision="float32")
    items = cs.benchmark_items(args.mllm_per_condition, 4, 0)
    recall = {tier: recall_at_1(items, encoder.encode_images, tier, encoder.min_decode_side).to_dict()
              for tier in cs.PHRASINGS}
    log = {"options": {"architecture": MLLM_ARCHITECTURE, "vocab_size": len(tokenizer), "chats": asdict(MLLM_MIX),
                       "chat_seed": args.seed + 4, "training": asdict(options), "stored_dtype": "float16"},
           "losses": trained.losses,
           "seconds": {"training": round(trained.seconds), "measuring": round(time.perf_counter() - measuring)},
           "recall_at_1": {"benchmark": f"benchmark_items({args.mllm_per_condition}, 4, 0), prompted only, "
                                        "through create_encoder(encoder='mllm')", **recall}}
    (out / "training_log.json").write_text(json.dumps(log, indent=1))
    (out / "training_log.json").chmod(0o644)
    for tier, result in recall.items():
        print(f"{tier:<10} R@1 {result['mean']:.3f} {result['per_condition']}")
    print(f"wrote {out} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
