"""The MLLM family's encode rate on a GPU at a real model's shape: a LLaVA with CLIP ViT-L/14-336's vision
tower (24x1024, 14 px patches: 576 image tokens) and Llama-2-7B's language model (32x4096, 32 heads,
11008 MLP, 32000 words), random weights built on the GPU in bf16 (the weights do not change the
arithmetic; nothing is downloaded).

    python benchmarks/mllm_gpu.py [--images 96] [--batch-size 16] [--repeats 3] [--json OUT]
    python benchmarks/mllm_gpu.py --shape tiny --device cpu --images 4     # the same path at a tiny shape

Prints, as benchmarks/throughput.py's mllm case does: the encode rate (img/s, 1 instruction, prefix
reuse), the time of 4 instructions against 1 with and without prefix reuse, and the bound that token
counts set beside them (goal: <= 1.3, or within 10 % of the bound where that is above 1.3). Without a
CUDA GPU it refuses in one line (exit 2), unless a tiny shape is asked for.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import INSTRUCTIONS, report_mllm  # noqa: E402  (benchmarks/throughput.py, beside this file)

# name: (vision tower, language model); the LLaVA-1.5 layout (penultimate vision layer, class token dropped)
SHAPES = {
    "llava-7b-336": (
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
             patch_size=14, hidden_act="quick_gelu"),
        dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
             vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5),
    ),
    "tiny": (  # no real model: lets a test take this path on a CPU
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8),
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
             vocab_size=1000, max_position_embeddings=512),
    ),
}
NEEDS_CUDA = "benchmarks/mllm_gpu.py needs a CUDA GPU (a 7B-shaped model in bf16); use --shape tiny --device cpu for a dry run"


def random_llava(shape: str, device, dtype):
    """(model, processor) of a randomly initialised LLaVA of ``shape``, built on ``device`` in ``dtype``."""
    import torch
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from focalsearch.models.tiny_mllm import CHAT_TEMPLATE, IMAGE_TOKEN, build_mllm_tokenizer

    vision, text = SHAPES[shape]
    words = " ".join(INSTRUCTIONS) + " answer in one word. describe the image in one word. summarize the above in one word."
    tokenizer = build_mllm_tokenizer([words] * 10, vocab_size=600)
    config = LlavaConfig(
        vision_config={**vision, "model_type": "clip_vision_model"},
        text_config={**text, "model_type": "llama", "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype).eval()
    size = vision["image_size"]
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tokenizer, patch_size=vision["patch_size"], vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1,
    )
    return model, processor


def photos(count: int, seed: int = 0):
    """Photo-sized RGB images (640x480: shading and blocks), in memory: the decode is not what is measured here."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((640, 480), Image.Resampling.BICUBIC)
        images.append(coarse)
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llava-7b-336", choices=list(SHAPES))
    parser.add_argument("--device", default="cuda", help="cuda; cpu only for --shape tiny")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many rounds, the cases in rotated order")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import torch

    refusal = ("no CUDA GPU is available here" if args.device == "cuda" and not torch.cuda.is_available()
               else f"--device {args.device} was asked for" if args.device != "cuda" and args.shape != "tiny" else None)
    if refusal:
        print(f"{NEEDS_CUDA}: {refusal}", file=sys.stderr)
        sys.exit(2)

    from focalsearch.models.encoders import compute_dtypes
    from focalsearch.models.loading import ModelRef, quiet_transformers
    from focalsearch.models.mllm_family import MllmEncoder

    quiet_transformers()
    device = torch.device(args.device)
    precision = "auto" if device.type == "cuda" else "float32"  # bf16 weights on CUDA (fp16 where unsupported)
    dtype = compute_dtypes(device, precision)[0]
    started = time.perf_counter()
    model, processor = random_llava(args.shape, device, dtype)
    parameters = sum(p.numel() for p in model.parameters())
    ref = ModelRef(model_id=f"random {args.shape} LLaVA", location="", is_local=True)
    encoder = MllmEncoder(ref, device=args.device, batch_size=args.batch_size, precision=precision,
                          loaded=(model, processor, None))
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"built {ref.model_id} ({parameters / 1e9:.2f} B parameters, {str(dtype).removeprefix('torch.')}) on {card} "
          f"in {time.perf_counter() - started:.0f} s", flush=True)
    result = report_mllm(args.shape, encoder, photos(args.images), args.batch_size, args.repeats, "640x480, in memory")
    result.update(card=card, parameters=parameters)
    if device.type == "cuda":
        result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        print(f"peak GPU memory: {result['peak_gpu_memory_gib']:.1f} GiB", flush=True)
    goals = result.pop("goals")
    print("\ngoals:")
    for name, goal in goals.items():
        print(f"  {'holds ' if goal['holds'] else 'MISSES'} {name}: {goal['measured']:.3f} ({goal['rule']})")
    if args.json:
        payload = {"date": time.strftime("%Y-%m-%d"), "results": {args.shape: result}, "goals": goals}
        args.json.write_text(json.dumps(payload, indent=2, default=float))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
