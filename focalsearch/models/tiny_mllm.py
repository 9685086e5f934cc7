"""Small LLaVA-style checkpoints built offline: a BPE tokenizer with a chat template, a CLIP or
SigLIP-like vision tower, and a small Llama language model.

Tests build random ones per supported family; the bundled ``demo-mllm`` starts from one whose vision
tower is ``demo-clip``'s (scripts/build_demo_models.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from focalsearch.models.tiny import _clip_pre_tokenizer, learn_bpe_merges

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
BOS, EOS, PAD = "<s>", "<|end|>", "<pad>"
ROLE_TOKENS = ("<|user|>", "<|assistant|>", "<|system|>")
SPECIAL_TOKENS = (BOS, EOS, PAD, IMAGE_TOKEN, VIDEO_TOKEN, *ROLE_TOKENS)

# A chat template in the usual shape: each turn opens with its role token and ends with EOS; an
# image part is the image token; the generation prompt opens the assistant's turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}<|{{ message['role'] }}|>"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_mllm_tokenizer(texts: Iterable[str], vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """A fast BPE tokenizer learned from ``texts`` (CLIP's word splitting, deterministic merges) with
    the special tokens and chat template a LLaVA-style processor needs."""
    texts = list(texts)
    merges = learn_bpe_merges(texts, vocab_size - len(SPECIAL_TOKENS))
    tokenizer = _clip_pre_tokenizer()
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    symbols = alphabet + [a + "</w>" for a in alphabet]
    merged = list(dict.fromkeys(a + b for a, b in merges))
    vocab = {token: index for index, token in enumerate(dict.fromkeys([*SPECIAL_TOKENS, *symbols, *merged]))}
    bpe = models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", unk_token=EOS)
    tokenizer.model = bpe
    tokenizer.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.BPEDecoder(suffix="</w>")])
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer.to_str()),
        bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=EOS,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        chat_template=CHAT_TEMPLATE,
    )
    fast.padding_side = "right"
    return fast


def _clip_image_processor(size: int):
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def tiny_llava(
    tokenizer: PreTrainedTokenizerFast,
    *,
    vision: dict | None = None,
    width: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int | None = None,
    vision_feature_layer: int = -2,
    vision_feature_select_strategy: str = "default",
    vision_from: str | Path | None = None,
    seed: int = 0,
):
    """A random LlavaForConditionalGeneration (CLIP vision tower, Llama language model) and its processor.

    ``vision_from``: a CLIP checkpoint folder whose vision tower (config and weights) replaces the
    random one. ``vision_feature_select_strategy`` "full" also hands the class token to the projector.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    clip_vision = None
    if vision_from is not None:
        from transformers import CLIPModel

        clip_vision = CLIPModel.from_pretrained(vision_from).vision_model
        keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                "patch_size", "hidden_act", "layer_norm_eps", "num_channels")
        vision = {key: getattr(clip_vision.config, key) for key in keep}
    vision = vision or dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            image_size=32, patch_size=8)
    vision = {**vision, "model_type": "clip_vision_model"}
    patches = (vision["image_size"] // vision["patch_size"]) ** 2 + (vision_feature_select_strategy == "full")
    config = LlavaConfig(
        vision_config=vision,
        text_config=dict(
            model_type="llama", vocab_size=len(tokenizer), hidden_size=width, intermediate_size=intermediate or 4 * width,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
            max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=patches,
        vision_feature_select_strategy=vision_feature_select_strategy,
        vision_feature_layer=vision_feature_layer,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    if clip_vision is not None:
        model.model.vision_tower.load_state_dict(clip_vision.state_dict())
    processor = LlavaProcessor(
        image_processor=_clip_image_processor(vision["image_size"]), tokenizer=tokenizer,
        patch_size=vision["patch_size"], vision_feature_select_strategy=vision_feature_select_strategy,
        chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1,
    )
    return model, processor


IDEFICS3_TOKENS = ("<fake_token_around_image>", "<global-img>", "<end_of_utterance>",
                   *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)))


def tiny_idefics3(tokenizer: PreTrainedTokenizerFast, *, width: int = 64, layers: int = 2, heads: int = 4, seed: int = 0):
    """A random Idefics3ForConditionalGeneration (SmolVLM's family: a SigLIP-like vision tower, pixel
    shuffle, a Llama language model) and its processor. Images are split into tiles plus a global
    view, so the number of image tokens follows each image's shape."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil, Idefics3Processor

    tile, patch, scale = 32, 8, 2
    tokenizer.add_special_tokens({"additional_special_tokens": list(IDEFICS3_TOKENS)})
    config = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=tile, patch_size=patch),
        text_config=dict(
            model_type="llama", vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
            max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        scale_factor=scale,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 2 * tile}, max_image_size={"longest_edge": tile}, do_image_splitting=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                  image_seq_len=(tile // patch) ** 2 // scale**2, chat_template=CHAT_TEMPLATE)
    return model, processor


FAMILIES = {"llava": tiny_llava, "idefics3": tiny_idefics3}


def save_tiny_mllm(out: str | Path, texts: Iterable[str], family: str = "llava", *, seed: int = 0, vocab_size: int = 600,
                   **dims) -> Path:
    """Save a random small checkpoint of ``family`` with tokenizer, processor and chat template to ``out``."""
    out = Path(out)
    tokenizer = build_mllm_tokenizer(texts, vocab_size)
    model, processor = FAMILIES[family](tokenizer, seed=seed, **dims)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
