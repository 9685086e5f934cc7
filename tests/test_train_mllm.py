"""FocalLens-MLLM training on tiny random vision-language checkpoints of both families (llava, idefics3)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from typer.testing import CliRunner

from focalsearch.cli import app
from focalsearch.errors import UserError
from focalsearch.models import create_encoder
from focalsearch.models.loading import MLLM_HEAD_FILE, resolve_model
from focalsearch.synth import colorshape as cs
from focalsearch.train.data import ColorShapeSource
from focalsearch.train.loop import RESUME_DIR, TrainOptions, train
from focalsearch.train.mllm import TRAINABLE_FILE, MllmTrainer

FAMILIES = ("llava", "idefics3")
INSTRUCTIONS = ["what color is the object?", "", "what shape is the object?", "background"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    from focalsearch.models.tiny_mllm import save_tiny_mllm

    source = ColorShapeSource("instruction", resolution=32, seed=0)
    texts = source.texts()[:400] + [v for values in cs.VALUES.values() for v in values]
    folder = tmp_path_factory.mktemp("mllm")
    return {family: save_tiny_mllm(folder / family, texts, family) for family in FAMILIES}


@pytest.fixture()
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # identical arithmetic in the runs compared
    yield
    torch.set_num_threads(before)


class _Fixed:
    """The same batch at every step: a few steps must fit it."""

    def __init__(self, source):
        self.source = source

    def batch(self, step, size):
        return self.source.batch(0, size)

    def texts(self):
        return []


class _Interrupting:
    """A data source that stops the run at a given step, as Ctrl-C would."""

    def __init__(self, source, stop_at: int):
        self.source, self.stop_at = source, stop_at

    def batch(self, step, size):
        if step == self.stop_at:
            raise KeyboardInterrupt
        return self.source.batch(step, size)

    def texts(self):
        return self.source.texts()


def _images(count: int):
    # Different shapes: idefics3 splits each into its own number of tiles (left-padded prefixes).
    return [cs.render(scene, i, 24 + 9 * i) for i, scene in enumerate(cs.all_attributes()[:count])]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_trainer_reads_prompts_as_the_encoder_does_and_starts_from_the_prompted_embedding(bases, family):
    trainer = MllmTrainer(resolve_model(str(bases[family])), TrainOptions(device="cpu"))
    encoder = create_encoder(str(bases[family]), device="cpu", precision="float32")
    images = _images(len(INSTRUCTIONS))
    expected = encoder.encode_batch(images, INSTRUCTIONS)  # the identity head: the prompted-only embedding
    batch = type("Batch", (), {"images": images, "instructions": INSTRUCTIONS, "captions": None})()
    inputs = trainer.prepare(batch)
    with torch.no_grad():
        vectors = trainer.model.image_vectors(inputs["prefix"], inputs["suffix"]).numpy()
        texts = trainer._texts(["red", "a blue square on black"]).numpy()
    for row, instruction in enumerate(INSTRUCTIONS):  # row i: image i under instruction i
        np.testing.assert_allclose(vectors[row], expected[row][row], atol=1e-5, err_msg=instruction)
    np.testing.assert_allclose(texts, encoder.encode_texts(["red", "a blue square on black"]), atol=1e-5)


@pytest.mark.parametrize("family,head_dim", [("llava", None), ("idefics3", 32)])
def test_a_few_steps_lower_the_loss_and_the_output_loads_and_encodes(bases, family, head_dim, tmp_path):
    source = ColorShapeSource("instruction", resolution=32, seed=0)
    options = TrainOptions(steps=8, batch_size=16, lr=1e-3, warmup=1, device="cpu", head_dim=head_dim, image_weight=0.5)
    result = train(str(bases[family]), tmp_path / "out", _Fixed(source), options, progress=False)
    assert sum(result.losses[-2:]) / 2 < result.losses[0] - 0.3, result.losses
    assert not (tmp_path / "out" / RESUME_DIR).exists()
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["focallens_prompts"]["image"] == "{instruction}\nAnswer in one word."
    head = load_file(str(tmp_path / "out" / MLLM_HEAD_FILE))
    assert head["weight"].shape == (head_dim or 64, 64)
    images = _images(3)
    before = create_encoder(str(bases[family]), device="cpu", precision="float32")
    after = create_encoder(str(tmp_path / "out"), device="cpu", precision="float32")
    assert after.info.encoder == "mllm" and after.info.dim == (head_dim or 64)
    vectors = after.encode_images(images, "what color is the object?")
    assert vectors.shape == (3, head_dim or 64)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    if head_dim is None:
        assert (vectors * before.encode_images(images, "what color is the object?")).sum(1).max() < 0.999
    # The vision tower is frozen by default; the language model trained.
    base_weights, trained = load_file(str(bases[family] / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(trained) == sorted(base_weights)
    vision = [k for k in base_weights if "vision" in k]
    language = [k for k in base_weights if "layers.0.mlp" in k and "vision" not in k]
    assert vision and all(torch.equal(trained[k], base_weights[k]) for k in vision)
    assert language and all(not torch.equal(trained[k], base_weights[k]) for k in language)


def test_an_interrupted_lora_run_resumes_to_the_same_weights(bases, tmp_path, one_thread):
    options = TrainOptions(steps=6, batch_size=8, lr=2e-3, warmup=2, save_every=2, device="cpu", lora_rank=4,
                           image_weight=0.5, caption_weight=0.5)
    source = ColorShapeSource("instruction", resolution=32, seed=0, with_captions=True)
    base = str(bases["llava"])
    whole_run = train(base, tmp_path / "whole", source, options, progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(base, tmp_path / "split", _Interrupting(source, 5), options, progress=False)
    saved = tmp_path / "split" / RESUME_DIR
    assert sorted(p.name for p in saved.iterdir()) == ["optimizer.safetensors", TRAINABLE_FILE, "training_state.json"]
    trainable = load_file(str(saved / TRAINABLE_FILE))
    assert any("lora_A" in k for k in trainable) and "head.weight" in trainable and "logit_scale" in trainable
    assert not any("vision" in k for k in trainable) and not any(k.endswith("q_proj.base_layer.weight") for k in trainable)
    with pytest.raises(UserError, match="saved while training"):
        train(str(bases["idefics3"]), tmp_path / "split", source, options, progress=False)
    resumed = train(base, tmp_path / "split", source, options, progress=False)
    assert resumed.resumed_from == 4
    assert resumed.losses == pytest.approx(whole_run.losses, abs=1e-5)
    whole, split = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(tmp_path / "split" / "model.safetensors"))
    assert max(float((whole[k] - split[k]).abs().max()) for k in whole) < 1e-5
    torch.testing.assert_close(load_file(str(tmp_path / "split" / MLLM_HEAD_FILE)), load_file(str(tmp_path / "whole" / MLLM_HEAD_FILE)))


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_trains_adapters_and_saves_them_merged(bases, family, tmp_path):
    base = bases[family]
    trainer = MllmTrainer(resolve_model(str(base)), TrainOptions(steps=4, batch_size=8, lr=5e-3, warmup=1, device="cpu", lora_rank=4))
    assert trainer.trainable_names and all("lora_" in n or n.startswith(("head.", "logit_scale")) or "projector" in n
                                           or "connector" in n for n in trainer.trainable_names)
    source = ColorShapeSource("instruction", resolution=32, seed=1)
    for step in range(4):
        batch = source.batch(step, 8)
        trainer.step(step, batch, trainer.prepare(batch))
    images = _images(3)
    probe = trainer.prepare(type("Batch", (), {"images": images, "instructions": ["what shape is the object?"] * 3, "captions": None})())
    with torch.no_grad():
        trainer.model.eval()
        before_merge = trainer.model.image_vectors(probe["prefix"], probe["suffix"]).numpy()
    trainer.save(tmp_path / "merged", lambda folder: None, final=True)
    weights, base_weights = load_file(str(tmp_path / "merged" / "model.safetensors")), load_file(str(base / "model.safetensors"))
    assert sorted(weights) == sorted(base_weights)  # a plain transformers checkpoint: no adapter keys
    assert not any(name.endswith("adapter_config.json") for name in os.listdir(tmp_path / "merged"))
    q_proj = [k for k in base_weights if k.endswith("layers.0.self_attn.q_proj.weight") and "vision" not in k]
    assert q_proj and not torch.equal(weights[q_proj[0]], base_weights[q_proj[0]])
    assert all(torch.equal(weights[k], base_weights[k]) for k in base_weights if "vision" in k)
    merged = create_encoder(str(tmp_path / "merged"), device="cpu", precision="float32")
    np.testing.assert_allclose(merged.encode_images(images, "what shape is the object?"), before_merge, atol=1e-5)


def _rank(rank: int, port: int, base: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train(base, out, ColorShapeSource("instruction", resolution=32, seed=0, with_captions=True), _DDP_OPTIONS, progress=False)


_DDP_OPTIONS = TrainOptions(steps=4, batch_size=8, lr=1e-3, warmup=1, device="cpu", image_weight=0.5, caption_weight=0.5)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_gloo_processes_train_as_one_process_does(bases, tmp_path, one_thread):
    """Same seed and global batch: gathered vectors (and the answers read on every rank) give the 1-process loss."""
    base = str(bases["llava"])
    one = train(base, tmp_path / "one", ColorShapeSource("instruction", resolution=32, seed=0, with_captions=True), _DDP_OPTIONS,
                progress=False)
    mp.start_processes(_rank, args=(_free_port(), base, str(tmp_path / "two")), nprocs=2, join=True, start_method="spawn")
    log = json.loads((tmp_path / "two" / "training_log.json").read_text())
    assert log["processes"] == 2
    assert log["losses"] == pytest.approx(one.losses, abs=1e-4)
    weights_one, weights_two = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    assert max(float((weights_one[k] - weights_two[k]).abs().max()) for k in weights_one) < 1e-4


def test_train_an_mllm_from_the_command_line(bases, tiny_clip, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, [
        "train", "--base", str(bases["llava"]), "--out", str(tmp_path / "model"), "--data", "colorshape", "--resolution", "32",
        "--steps", "3", "--batch-size", "8", "--warmup", "1", "--device", "cpu", "--lora-rank", "2", "--image-weight", "0.5",
    ])
    assert result.exit_code == 0, result.output
    assert "trained 3 steps" in result.stdout
    assert (tmp_path / "model" / "model.safetensors").is_file() and (tmp_path / "model" / MLLM_HEAD_FILE).is_file()
    log = json.loads((tmp_path / "model" / "training_log.json").read_text())
    assert log["options"]["lora_rank"] == 2 and len(log["losses"]) == 3
    assert create_encoder(str(tmp_path / "model"), device="cpu").encode_texts(["red"]).shape == (1, 64)
    for base, wrong, message in (
        (bases["llava"], ["--train-text"], "error: --train-text applies to the CLIP family"),
        (tiny_clip, ["--lora-rank", "2"], "error: --lora-rank applies to vision-language (MLLM-family) checkpoints"),
    ):
        refused = runner.invoke(app, ["train", "--base", str(base), "--out", str(tmp_path / "refused"), "--data", "colorshape",
                                      "--steps", "1", "--device", "cpu", *wrong])
        assert refused.exit_code == 2 and refused.stderr.startswith(message), refused.output
        assert len(refused.stderr.strip().splitlines()) == 1


def test_gradient_checkpointing_gives_the_same_steps(bases, one_thread):
    source = ColorShapeSource("instruction", resolution=32, seed=2)
    losses = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same LoRA initialisation
        trainer = MllmTrainer(resolve_model(str(bases["idefics3"])),
                              TrainOptions(batch_size=8, lr=2e-3, warmup=1, device="cpu", lora_rank=2, gradient_checkpointing=checkpointing))
        losses[checkpointing] = [trainer.step(step, source.batch(step, 8), trainer.prepare(source.batch(step, 8))) for step in range(3)]
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
