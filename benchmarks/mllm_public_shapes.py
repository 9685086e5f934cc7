"""What an MLLM encoder costs per image on this machine, for public checkpoints' shapes.

No weights can be downloaded here, so each model is built with random weights in the exact shape
of a public checkpoint (the cost of a forward pass does not depend on the weights' values), with
a small tokenizer whose ids fall inside the real vocabulary:

- ``smolvlm-256m``: HuggingFaceTB/SmolVLM-256M-Instruct (Idefics3: SigLIP-B/16 at 512 px, pixel
  shuffle to 64 tokens a tile, SmolLM2-135M); its processor's own tiling, so a 640x480 photo is
  12 tiles and a global view;
- ``smolvlm-256m-1tile``: the same with tiling off (one 512 px view, 64 tokens);
- ``llava-interleave-0.5b``: llava-hf/llava-interleave-qwen-0.5b-hf (LLaVA: SigLIP-so400m/14 at
  384 px, 729 tokens, Qwen2-0.5B).

Prints seconds per image under 1 and under 4 instructions (prefix reuse on), best of ``--repeats``.

    python benchmarks/mllm_public_shapes.py [--shapes smolvlm-256m-1tile,llava-interleave-0.5b] [--images 8] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

INSTRUCTIONS = ["color", "background", "how many objects are there?", "what is the main object?"]


def smolvlm(tokenizer, tiling: bool):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil, Idefics3Processor

    from focalsearch.models.tiny_mllm import CHAT_TEMPLATE, IDEFICS3_TOKENS, IMAGE_TOKEN

    tokenizer.add_special_tokens({"additional_special_tokens": list(IDEFICS3_TOKENS)})
    config = Idefics3Config(
        vision_config={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                       "image_size": 512, "patch_size": 16},
        text_config={"model_type": "llama", "vocab_size": 49280, "hidden_size": 576, "intermediate_size": 1536,
                     "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                     "max_position_embeddings": 8192, "tie_word_embeddings": True},
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), scale_factor=4, tie_word_embeddings=True,
    )
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessorPil(size={"longest_edge": 2048 if tiling else 512},
                                                  max_image_size={"longest_edge": 512}, do_image_splitting=tiling),
        tokenizer=tokenizer, image_seq_len=64, chat_template=CHAT_TEMPLATE)
    return Idefics3ForConditionalGeneration(config), processor


def llava_interleave(tokenizer):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, SiglipImageProcessorPil

    from focalsearch.models.tiny_mllm import CHAT_TEMPLATE, IMAGE_TOKEN

    config = LlavaConfig(
        vision_config={"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                       "num_hidden_layers": 26, "num_attention_heads": 16, "image_size": 384, "patch_size": 14},
        text_config={"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
                     "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                     "max_position_embeddings": 32768, "tie_word_embeddings": True},
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), image_seq_length=729,
        vision_feature_select_strategy="full", vision_feature_layer=-1, tie_word_embeddings=True,
    )
    processor = LlavaProcessor(image_processor=SiglipImageProcessorPil(size={"height": 384, "width": 384}),
                               tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="full",
                               chat_template=CHAT_TEMPLATE)
    return LlavaForConditionalGeneration(config), processor


def tiny(tokenizer):
    from focalsearch.models.tiny_mllm import tiny_llava

    return tiny_llava(tokenizer)


SHAPES = {
    "tiny-llava": tiny,  # the tests' random miniature: a smoke run of this script
    "smolvlm-256m": lambda t: smolvlm(t, tiling=True),
    "smolvlm-256m-1tile": lambda t: smolvlm(t, tiling=False),
    "llava-interleave-0.5b": llava_interleave,
}


def photo(seed: int) -> Image.Image:
    from focalsearch.synth import colorshape as cs

    scene = cs.all_attributes()[seed % len(cs.all_attributes())]
    return cs.render(scene, seed, 480).resize((640, 480))


def measure(shape: str, count: int, repeats: int, folder: Path) -> dict:
    import torch

    from focalsearch.models import create_encoder
    from focalsearch.models.tiny_mllm import build_mllm_tokenizer
    from focalsearch.synth import colorshape as cs

    torch.manual_seed(0)
    tokenizer = build_mllm_tokenizer([*cs.caption_vocabulary(), *INSTRUCTIONS, "answer in one word describe summarize"], 600)
    model, processor = SHAPES[shape](tokenizer)
    out = folder / shape
    model.save_pretrained(out)
    processor.save_pretrained(out)
    del model
    encoder = create_encoder(str(out), device="cpu", batch_size=count, precision="float32")
    images = [photo(i) for i in range(count)]
    tokens = encoder.prompts.prefix_inputs(images[:1])["input_ids"].shape[1]
    encoder.encode_images_under(images[:2], INSTRUCTIONS)  # warm-up
    seconds = {}
    for label, instructions in (("1 instruction", INSTRUCTIONS[:1]), ("4 instructions", INSTRUCTIONS)):
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            encoder.encode_images_under(images, instructions)
            best = min(best, time.perf_counter() - started)
        seconds[label] = best / count
    parameters = sum(p.numel() for p in encoder.model.parameters())
    return {"shape": shape, "parameters": parameters, "prefix_tokens": tokens, "seconds_per_image": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="smolvlm-256m,smolvlm-256m-1tile,llava-interleave-0.5b")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        sys.exit(f"error: unknown shape {unknown[0]!r}; use one of: {', '.join(SHAPES)}")
    from focalsearch.threads import configure_threads

    configure_threads(None)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for shape in shapes:
            result = measure(shape, args.images, args.repeats, Path(folder))
            results.append(result)
            per = result["seconds_per_image"]
            print(f"{shape:<24} {result['parameters'] / 1e6:>7.0f}M params  {result['prefix_tokens']:>5} prefix tokens  "
                  f"{per['1 instruction']:.3f} s/img (1 instruction)  {per['4 instructions']:.3f} s/img (4 instructions)",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "images": args.images, "repeats": args.repeats}, indent=2))


if __name__ == "__main__":
    main()
