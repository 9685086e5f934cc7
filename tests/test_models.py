"""The model layer: FocalLens-CLIP, the baselines, model init and loading errors."""

from __future__ import annotations

import time

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


# --- query arithmetic: float32 or bf16 autocast, per pass and per query kind --------------------


def test_a_pass_runs_in_the_precision_it_asks_for(tiny_focal, images):
    exact = create_encoder(str(tiny_focal), precision="float32")
    bf16 = create_encoder(str(tiny_focal), precision="bfloat16")
    texts = ["three apples", "a red circle"]
    # a bf16 pass first, so that a float32 pass must not reuse the bf16 instruction tokens
    assert np.array_equal(bf16.encode_images(images, "color", precision="bfloat16"), bf16.encode_images(images, "color"))
    assert np.array_equal(bf16.encode_images(images, "color", precision="float32"), exact.encode_images(images, "color"))
    assert np.array_equal(bf16.encode_texts(texts, precision="float32"), exact.encode_texts(texts))
    assert np.array_equal(exact.encode_texts(texts, precision="bfloat16"), bf16.encode_texts(texts))
    assert not np.array_equal(exact.encode_texts(texts), bf16.encode_texts(texts))


class TimedEncoder:
    """An encoder that takes a set time per pass in each arithmetic (the trial's logic, not the model's)."""

    def __init__(self, seconds: dict[tuple[str, str], float], device: str = "cpu"):
        self.seconds, self.passes = seconds, []
        self.device, self.dtype, self.autocast_dtype = torch.device(device), torch.float32, torch.bfloat16
        self.towers, self.min_decode_side = "both", 8

    def _pass(self, kind: str, precision: str) -> np.ndarray:
        self.passes.append((kind, precision))
        time.sleep(self.seconds[(kind, precision)])
        return np.zeros((1, 4), np.float32)

    def encode_texts(self, texts, *, precision=None):
        return self._pass("text", precision)

    def encode_images(self, images, instruction="", *, precision=None):
        return self._pass("image", precision)


def test_auto_keeps_bf16_only_for_the_query_kind_where_it_is_clearly_faster():
    from focalsearch.models.arithmetic import MAX_ROUNDS, choose_query_arithmetic

    # bf16 loses on a few words and wins on an image's many tokens (a ViT-B/16 on an AMX CPU may)
    encoder = TimedEncoder({("text", "float32"): 0.004, ("text", "bfloat16"): 0.02,
                            ("image", "float32"): 0.03, ("image", "bfloat16"): 0.006})
    chosen = choose_query_arithmetic(encoder)
    assert chosen.settled and (chosen.precision("text"), chosen.precision("image")) == ("float32", "bfloat16")
    assert chosen.kinds["image"].bfloat16_ms < chosen.kinds["image"].float32_ms
    # both arithmetics were timed, and nothing ran in the encoder's own (unnamed) arithmetic
    assert {p for _, p in encoder.passes} == {"float32", "bfloat16"}
    # cheap passes get more rounds (up to MAX_ROUNDS), so that their best is not one lucky or unlucky pass
    assert encoder.passes.count(("image", "bfloat16")) == 1 + MAX_ROUNDS and f"{MAX_ROUNDS} alternated" in chosen.kinds["image"].note
    # a bf16 win inside the margin is noise: float32 (exact, no kernels to build) stays
    close = TimedEncoder({("text", "float32"): 0.01, ("text", "bfloat16"): 0.0095,
                          ("image", "float32"): 0.01, ("image", "bfloat16"): 0.0095})
    assert {t["chosen"] for t in choose_query_arithmetic(close).as_dict()["kinds"].values()} == {"float32"}


def test_no_trial_where_there_is_no_choice_or_a_pass_is_too_long(monkeypatch):
    from focalsearch.models import arithmetic

    slow = {("text", "float32"): 0.05, ("text", "bfloat16"): 0.01, ("image", "float32"): 0.05, ("image", "bfloat16"): 0.01}
    for precision in ("float32", "bfloat16"):
        untimed = TimedEncoder(slow)
        kept = arithmetic.choose_query_arithmetic(untimed, precision)
        assert untimed.passes == [] and kept.precision("text") == kept.precision("image") == "bfloat16"  # the encoder's own
    gpu = TimedEncoder(slow, device="cuda")
    assert arithmetic.choose_query_arithmetic(gpu).precision("image") == "bfloat16" and gpu.passes == []
    # a query arriving during a trial pass waits for it: passes longer than MAX_PASS_S are not tried
    monkeypatch.setattr(arithmetic, "MAX_PASS_S", 0.03)
    long_passes = TimedEncoder(slow)
    chosen = arithmetic.choose_query_arithmetic(long_passes)
    assert chosen.precision("text") == chosen.precision("image") == "float32" and "too long" in chosen.kinds["image"].note
    assert not [p for p in long_passes.passes if p[1] == "bfloat16"]


def test_the_batcher_answers_in_float32_during_the_trial_and_runs_it_while_idle():
    from focalsearch.batching import DynamicBatcher
    from focalsearch.models.arithmetic import ArithmeticTrial

    encoder = TimedEncoder({("text", "float32"): 0.05, ("text", "bfloat16"): 0.005,
                            ("image", "float32"): 0.05, ("image", "bfloat16"): 0.005})
    trial = ArithmeticTrial(encoder)
    assert not trial.arithmetic.settled and trial.arithmetic.precision("text") == "float32"
    batcher = DynamicBatcher(encoder, trial=trial)
    try:
        time.sleep(0.2)
        assert encoder.passes == []  # no trial before the first query: start-up stays float32's
        batcher.encode_text("a first query")
        assert encoder.passes[0] == ("text", "float32")
        batcher.encode_text("a query during the trial")  # waits for one trial pass at most
        assert not batcher.arithmetic.settled, "the trial (about 0.6 s of passes) outlasts two queries"
        assert all(precision is not None for _, precision in encoder.passes)  # the queries ran in float32, by name
        deadline = time.monotonic() + 30
        while not batcher.arithmetic.settled and time.monotonic() < deadline:
            time.sleep(0.01)
        assert batcher.arithmetic.precision("text") == batcher.arithmetic.precision("image") == "bfloat16"
        passes = len(encoder.passes)
        batcher.encode_image(None, "color")
        assert encoder.passes[passes:] == [("image", "bfloat16")]  # the chosen arithmetic, and no more trial
    finally:
        batcher.close()


def test_the_batcher_encodes_each_kind_in_the_arithmetic_chosen_for_it(tiny_focal, images, monkeypatch):
    from focalsearch.batching import DynamicBatcher
    from focalsearch.models import encoders
    from focalsearch.models.arithmetic import ArithmeticTrial, choose_query_arithmetic

    monkeypatch.setattr(encoders, "cpu_has_native_bf16", lambda: True)
    encoder = create_encoder(str(tiny_focal))  # auto: bf16 autocast on a CPU with bf16
    chosen = choose_query_arithmetic(encoder)
    for kind in ("text", "image"):
        trial = chosen.kinds[kind]
        assert trial.float32_ms > 0 and trial.bfloat16_ms > 0
        assert trial.chosen == ("bfloat16" if trial.bfloat16_ms <= 0.9 * trial.float32_ms else "float32")
    trial = ArithmeticTrial(encoder)
    trial.run()
    # force one kind each way, and check the batcher's vectors are exactly that arithmetic's
    trial.arithmetic.kinds["text"].chosen, trial.arithmetic.kinds["image"].chosen = "float32", "bfloat16"
    batcher = DynamicBatcher(encoder, trial=trial)
    try:
        text = batcher.encode_text("a red circle")
        image = batcher.encode_image(images[0], "color")
    finally:
        batcher.close()
    assert np.array_equal(text, encoder.encode_texts(["a red circle"], precision="float32")[0])
    assert not np.array_equal(text, encoder.encode_texts(["a red circle"], precision="bfloat16")[0])
    assert np.array_equal(image, encoder.encode_images(images[:1], "color", precision="bfloat16")[0])
    assert not np.array_equal(image, encoder.encode_images(images[:1], "color", precision="float32")[0])


# --- no transformers notices on a user's terminal ----------------------------------------------

NOTICES = ("CLIPImageProcessorPil", "torchvision", "[transformers]")


def test_building_a_small_checkpoint_prints_no_transformers_notice(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from focalsearch.models.tiny import save_tiny_clip; "
            "save_tiny_clip(sys.argv[1], ['a red circle', 'color'] * 8, vocab_size=300, width=32, projection_dim=32)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not [n for n in NOTICES if n in done.stderr], done.stderr
    config = (tmp_path / "m" / "preprocessor_config.json").read_text()
    assert '"image_processor_type": "CLIPImageProcessor"' in config  # what any transformers reads, with or without torchvision


@pytest.mark.parametrize("workers", [1, 2])
def test_the_server_prints_no_transformers_notice(tmp_path, tiny_focal, workers):
    """`focalsearch index` and `focalsearch serve` (one process, or several) on a real port: stderr holds no library notice."""
    import io
    import socket
    import subprocess
    import sys
    import time

    import httpx

    from conftest import make_image_folder

    make_image_folder(tmp_path / "photos", 6)
    index = tmp_path / "index"
    cli = [sys.executable, "-m", "focalsearch.cli"]
    done = subprocess.run([*cli, "index", str(tmp_path / "photos"), "-i", "color", "--model", str(tiny_focal), "--index", str(index)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not [n for n in NOTICES if n in done.stderr], done.stderr
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url, token = f"http://127.0.0.1:{port}", "t0ken"
    server = subprocess.Popen([*cli, "serve", "--index", str(index), "--port", str(port), "--workers", str(workers), "--token", token],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {token}"}) as http:
            deadline = time.monotonic() + 120
            while True:
                assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
                try:
                    health = http.get("/healthz")
                    if health.status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            assert http.post("/api/search", json={"text": "a red circle", "instruction": "color", "k": 3}).json()["results"]
            png = io.BytesIO()
            draw_image(7).save(png, "PNG")
            upload = http.post("/api/search", files={"image": ("q.png", png.getvalue(), "image/png")}, data={"instruction": "color", "k": "3"})
            assert upload.status_code == 200 and upload.json()["results"], upload.text
            arithmetic = http.get("/healthz").json()["query_arithmetic"]["kinds"]
            assert set(arithmetic) == {"text", "image"} and {k["chosen"] for k in arithmetic.values()} <= {"float32", "bfloat16"}
    finally:
        server.terminate()
        stderr = server.communicate(timeout=30)[1]
    assert "serving" in stderr
    assert not [n for n in NOTICES if n in stderr], stderr
