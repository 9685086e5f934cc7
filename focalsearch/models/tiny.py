"""Small CLIP checkpoints built offline: a BPE tokenizer trained on given texts plus a random CLIP.

Tests and the bundled demo models start here, since no weights can be downloaded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
# The PIL processor by name: `CLIPImageProcessor` is the torchvision one, and without torchvision
# transformers swaps in this class with a warning. The saved config names CLIPImageProcessor either way.
from transformers import CLIPImageProcessorPil

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _clip_pre_tokenizer() -> Tokenizer:
    """CLIP's normalisation and word splitting, byte-level, as a `tokenizers` pipeline."""
    tokenizer = Tokenizer(models.BPE(unk_token=EOS, end_of_word_suffix="</w>"))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    return tokenizer


def learn_bpe_merges(texts: Iterable[str], vocab_size: int) -> list[tuple[str, str]]:
    """BPE merges learned from ``texts``, bit-for-bit the same on every run.

    The `tokenizers` trainer breaks ties between equally frequent pairs in a run-dependent order,
    which changes token ids and so a seeded model's initial weights; here ties go to the
    lexicographically smallest pair. Word splitting is the `tokenizers` pipeline's.
    """
    pipeline = _clip_pre_tokenizer()
    words: Counter[tuple[str, ...]] = Counter()
    for text in texts:
        for word, _ in pipeline.pre_tokenizer.pre_tokenize_str(pipeline.normalizer.normalize_str(text)):
            words[(*word[:-1], word[-1] + "</w>")] += 1
    budget = vocab_size - 2 - 2 * len(pre_tokenizers.ByteLevel.alphabet())  # specials, symbols with and without </w>
    merges: list[tuple[str, str]] = []
    while len(merges) < budget:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        words = Counter({_merge(word, best): count for word, count in words.items()})
    return merges


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def build_clip_tokenizer(texts: Iterable[str], vocab_size: int = 1000) -> CLIPTokenizer:
    """A CLIPTokenizer with a byte-level BPE learned from ``texts`` (deterministic, see learn_bpe_merges)."""
    merges = learn_bpe_merges(texts, vocab_size)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    symbols = alphabet + [a + "</w>" for a in alphabet]
    merged = list(dict.fromkeys(a + b for a, b in merges))
    vocab = {token: index for index, token in enumerate(dict.fromkeys([BOS, EOS, *symbols, *merged]))}
    return CLIPTokenizer(vocab=vocab, merges=merges)


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
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    return out
