"""The model layer: FocalLens-CLIP, the baselines, model init and loading errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import CLIPModel

from conftest import draw_image
from focalsearch.errors import ModelLoadError, UserError
from focalsearch.models import create_encoder, normalize_instruction, resolve_model
from focalsearch.models.focallens_clip import FocalLensCLIPModel
from focalsearch.models.init_checkpoint import init_focallens_checkpoint


@pytest.fixture(scope="module")
def images():
    return [draw_image(i, (40 + i, 36)) for i in range(7)]


def test_empty_instruction_is_exactly_base_clip(tiny_clip, tiny_focal, images):
    focal = create_encoder(str(tiny_focal), precision="float32")
    assert focal.info.encoder == "focallens"
    base = CLIPModel.from_pretrained(tiny_clip).eval()
    with torch.no_grad():
        expected = base.get_image_features(pixel_values=focal.preprocess(images)).pooler_output
    expected = torch.nn.functional.normalize(expected, dim=-1).numpy()
    assert np.array_equal(focal.encode_images(images, ""), expected)


def test_auto_precision_uses_bf16_autocast_only_where_the_cpu_has_bf16(tiny_focal, monkeypatch):
    from focalsearch.models import encoders

    monkeypatch.setattr(encoders, "cpu_has_native_bf16", lambda: True)
    with_bf16 = create_encoder(str(tiny_focal))
    assert (with_bf16.dtype, with_bf16.autocast_dtype) == (torch.float32, torch.bfloat16)
    monkeypatch.setattr(encoders, "cpu_has_native_bf16", lambda: False)
    assert create_encoder(str(tiny_focal)).autocast_dtype is None
    assert create_encoder(str(tiny_focal), precision="bfloat16").autocast_dtype == torch.bfloat16
    assert create_encoder(str(tiny_focal), precision="float32").autocast_dtype is None
    with pytest.raises(UserError, match="unknown precision 'half'"):
        create_encoder(str(tiny_focal), precision="half")


def test_bf16_encodings_stay_close_to_float32(tiny_focal, images):
    exact = create_encoder(str(tiny_focal), precision="float32")
    bf16 = create_encoder(str(tiny_focal), precision="bfloat16")
    for instruction in ("", "color"):
        a, b = exact.encode_images(images, instruction), bf16.encode_images(images, instruction)
        assert b.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
        assert not np.array_equal(a, b), "bf16 autocast must actually change the arithmetic"
        assert (a * b).sum(axis=1).min() > 0.995
    texts = ["three apples", "a red circle"]
    assert (exact.encode_texts(texts) * bf16.encode_texts(texts)).sum(axis=1).min() > 0.995


def test_instruction_changes_the_focallens_embedding(tiny_focal, images):
    focal = create_encoder(str(tiny_focal))
    plain = focal.encode_images(images, "")
    background = focal.encode_images(images, "background")
    quantity = focal.encode_images(images, "quantity")
    assert not np.allclose(plain, background, atol=1e-4)
    assert not np.allclose(background, quantity, atol=1e-4)


def test_outputs_are_normalised_float32_and_batching_does_not_matter(tiny_focal, images):
    whole = create_encoder(str(tiny_focal), batch_size=64).encode_images(images, "color")
    batched = create_encoder(str(tiny_focal), batch_size=2).encode_images(images, "color")
    assert whole.dtype == np.float32 and whole.shape == (len(images), 32)
    np.testing.assert_allclose(np.linalg.norm(whole, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(whole, batched, atol=1e-5)
    texts = create_encoder(str(tiny_focal)).encode_texts(["three apples", "a red circle"])
    assert texts.dtype == np.float32 and texts.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)


def test_one_tower_encoders_match_the_full_model(tiny_focal, images):
    full = create_encoder(str(tiny_focal))
    text_only = create_encoder(str(tiny_focal), towers="text")
    vision_only = create_encoder(str(tiny_focal), towers="vision")
    assert type(text_only.model).__name__ == "CLIPTextModelWithProjection"
    assert type(vision_only.model).__name__ == "CLIPVisionModelWithProjection"
    assert text_only.info == full.info == vision_only.info  # still recorded as the focallens encoder
    texts = ["three apples", "a red circle"]
    np.testing.assert_array_equal(text_only.encode_texts(texts), full.encode_texts(texts))
    np.testing.assert_array_equal(vision_only.encode_images(images, ""), full.encode_images(images, ""))
    with pytest.raises(RuntimeError, match="text tower only"):
        text_only.encode_images(images, "")
    with pytest.raises(RuntimeError, match="vision tower only"):
        vision_only.encode_images(images, "color")  # the instruction needs the text tower
    with pytest.raises(RuntimeError, match="vision tower only"):
        vision_only.encode_texts(texts)


def test_needed_towers():
    from focalsearch.models import needed_towers

    assert needed_towers("focallens", "color", image_query=False) == "text"
    assert needed_towers("focallens", "color", image_query=True) == "both"
    assert needed_towers("clip+text", "color", image_query=True) == "both"
    assert needed_towers("clip", "color", image_query=True) == "vision"
    assert needed_towers("focallens", "  ", image_query=True) == "vision"


def test_clip_baseline_ignores_the_instruction(tiny_clip, images):
    clip = create_encoder(str(tiny_clip), encoder="clip")
    np.testing.assert_array_equal(clip.encode_images(images, "background"), clip.encode_images(images, ""))


def test_clip_text_baseline_is_normalised_mean(tiny_clip, images):
    mixed = create_encoder(str(tiny_clip))
    assert mixed.info.encoder == "clip+text"
    image = mixed.encode_images(images, "")
    text = mixed.encode_texts(["background"])[0]
    expected = image + text
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(mixed.encode_images(images, "  Background "), expected, atol=1e-5)


def test_padded_instruction_batches_match_single_instructions(tiny_focal):
    model = FocalLensCLIPModel.from_pretrained(tiny_focal).eval()
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[0, 5, 6, 7, 1], [0, 9, 1, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        tokens = model.instruction_tokens(ids, mask)
        together = model.conditional_image_features(pixels, tokens, mask)
        first = model.conditional_image_features(pixels[:1], tokens[:1])
        second = model.conditional_image_features(pixels[1:], tokens[1:, :3])
    torch.testing.assert_close(together[0], first[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[1], second[0], atol=1e-5, rtol=1e-5)


def test_checkpoint_round_trips(tiny_focal, tmp_path, images):
    model = FocalLensCLIPModel.from_pretrained(tiny_focal)
    model.save_pretrained(tmp_path / "copy")
    assert (tmp_path / "copy" / "model.safetensors").is_file()
    reloaded = FocalLensCLIPModel.from_pretrained(tmp_path / "copy")
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert reloaded.config.instruction_max_length == model.config.instruction_max_length


def test_model_init_refuses_to_overwrite_and_to_reinit(tiny_clip, tiny_focal, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        init_focallens_checkpoint(str(tiny_clip), tmp_path / "taken")
    with pytest.raises(UserError, match="already a FocalLens-CLIP"):
        init_focallens_checkpoint(str(tiny_focal), tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_focallens_encoder_needs_a_focallens_checkpoint(tiny_clip):
    with pytest.raises(UserError, match="model init"):
        create_encoder(str(tiny_clip), encoder="focallens")


def test_missing_models_name_the_offline_way_out(tmp_path):
    with pytest.raises(ModelLoadError, match="--model PATH.*Offline quick start"):
        create_encoder(str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match="--model PATH"):
        create_encoder("no-such-org/no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_default_model_comes_from_the_environment(monkeypatch, tiny_focal):
    monkeypatch.setenv("FOCALSEARCH_MODEL", str(tiny_focal))
    assert resolve_model(None).model_id == str(tiny_focal)


def test_instruction_normalisation():
    assert normalize_instruction("  How many\tobjects?  ") == "how many objects?"
    assert normalize_instruction(None) == ""



def test_tokenizer_learning_is_reproducible_and_keeps_known_words_whole():
    from focalsearch.models.tiny import build_clip_tokenizer

    corpus = ["how many shapes are there?", "two red stars on a teal backdrop", "background color"] * 3
    first, second = build_clip_tokenizer(corpus, 700), build_clip_tokenizer(corpus, 700)
    assert first.get_vocab() == second.get_vocab()
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    assert first.tokenize("Two red STARS on a teal backdrop") == [
        "two</w>", "red</w>", "stars</w>", "on</w>", "a</w>", "teal</w>", "backdrop</w>"
    ]
    # Unseen text still maps to byte symbols, never to the unknown token.
    ids = first("zebra ünïcode 42")["input_ids"]
    assert first.convert_tokens_to_ids(first.unk_token) not in ids[1:-1]
