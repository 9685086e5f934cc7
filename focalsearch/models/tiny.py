"""Small CLIP checkpoints built offline: a BPE tokenizer trained on given texts plus a random CLIP.

Tests and the bundled demo models start here, since no weights can be downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def build_clip_tokenizer(texts: Iterable[str], vocab_size: int = 1000) -> CLIPTokenizer:
    """Train a byte-level BPE with CLIP's normalisation and word splitting, as a CLIPTokenizer.

    Not bit-reproducible yet: the `tokenizers` trainer orders equally frequent merges differently
    from run to run (token ids are renumbered deterministically from the merges, see below).
    """
    bpe = Tokenizer(models.BPE(unk_token=EOS, end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    return CLIPTokenizer(vocab=_deterministic_ids(state["vocab"], merges), merges=merges)


def _deterministic_ids(vocab: dict[str, int], merges: list[tuple[str, str]]) -> dict[str, int]:
    """Renumber the trained vocabulary from its merges, instead of the trainer's run-dependent ids.

    Special tokens keep ids 0 and 1, then the single symbols in sorted order, then merge results in
    merge order; BPE's behaviour depends only on the merges, so this changes nothing but the ids.
    """
    merged = list(dict.fromkeys(a + b for a, b in merges))
    merged_set = set(merged)
    initial = sorted(t for t in vocab if t not in merged_set and t not in (BOS, EOS))
    return {token: index for index, token in enumerate([BOS, EOS, *initial, *merged])}


def tiny_clip_config(
    vocab_size: int,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    width: int = 64,
    layers: int = 2,
    heads: int = 4,
    projection_dim: int = 64,
    context_length: int = 32,
) -> CLIPConfig:
    """A small CLIPConfig whose special-token ids match build_clip_tokenizer's vocabulary."""
    return CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=context_length,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            image_size=image_size,
            patch_size=patch_size,
        ),
        projection_dim=projection_dim,
    )


def save_tiny_clip(out: str | Path, texts: Iterable[str], *, seed: int = 0, vocab_size: int = 1000, **config) -> Path:
    """Save a randomly initialised small CLIP with tokenizer and image processor to ``out``."""
    out = Path(out)
    tokenizer = build_clip_tokenizer(texts, vocab_size=vocab_size)
    clip_config = tiny_clip_config(len(tokenizer), **config)
    torch.manual_seed(seed)
    model = CLIPModel(clip_config)
    size = clip_config.vision_config.image_size
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    return out
