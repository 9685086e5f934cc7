"""Training: the LLaVA reader, the contrastive loss, a short run, resuming, and the CLI."""

from __future__ import annotations

import json
import random

import numpy as np

import pytest
import torch
from typer.testing import CliRunner

from conftest import draw_image
from focalsearch.cli import app
from focalsearch.errors import UserError
from focalsearch.models import create_encoder
from focalsearch.models.focallens_clip import FocalLensCLIPModel
from focalsearch.train.data import ColorShapeSource, LlavaSource, read_llava_json
from focalsearch.train.loop import TrainOptions, multi_positive_clip_loss, next_token_loss, text_anchor_loss, train

LONG_ANSWER = " ".join(["the picture shows a very detailed scene"] * 30)


@pytest.fixture()
def llava(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(4):
        draw_image(i, (40, 40)).save(tmp_path / "img" / f"{i}.jpg")
    (tmp_path / "img" / "broken.jpg").write_bytes(b"")
    records = [
        {"id": "a", "image": "0.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the   background?"}, {"from": "gpt", "value": "Blue."},
            {"from": "human", "value": "How many shapes?"}, {"from": "gpt", "value": "Two"},
        ]},
        {"id": "b", "image": "1.jpg", "conversations": [
            {"from": "human", "value": "Describe it.\n<image>"}, {"from": "gpt", "value": LONG_ANSWER},
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "dropped: the question is empty"},
        ]},
        {"id": "c", "image": "broken.jpg", "conversations": [
            {"from": "human", "value": "<image> shape?"}, {"from": "gpt", "value": "circle"}]},
        {"id": "d", "image": "2.jpg", "conversations": [
            {"from": "human", "value": "<image> size?"}, {"from": "gpt", "value": "small"}]},
        {"id": "e", "image": "3.jpg", "conversations": [
            {"from": "human", "value": "<image> shape?"}, {"from": "gpt", "value": "square"}]},
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records))
    return path


def test_llava_reader_pairs_turns_and_strips_image_tokens(llava):
    triples = read_llava_json(llava)
    assert [(t.image, t.instruction, t.answer) for t in triples[:3]] == [
        ("0.jpg", "What color is the background?", "Blue."),
        ("0.jpg", "How many shapes?", "Two"),
        ("1.jpg", "Describe it.", LONG_ANSWER),
    ]
    assert len(triples) == 6


def test_llava_reader_rejects_malformed_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="cannot read training data"):
        read_llava_json(bad)
    bad.write_text(json.dumps([{"id": 1, "conversations": []}]))
    with pytest.raises(UserError, match="record 0 lacks 'image'"):
        read_llava_json(bad)


def test_llava_source_skips_unreadable_images_and_is_deterministic(llava):
    source = LlavaSource(read_llava_json(llava), llava.parent / "img", seed=1)
    first = source.batch(0, 4)
    assert len(first.images) == 4 and "circle" not in first.targets
    assert source.batch(0, 4).targets == first.targets


def test_identical_answers_are_one_class():
    image = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    texts = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    right = multi_positive_clip_loss(image, texts, torch.tensor([0, 0, 1]), torch.tensor(50.0))
    wrong = multi_positive_clip_loss(image, texts, torch.tensor([1, 1, 0]), torch.tensor(50.0))
    assert right < 1e-3 < wrong


def test_a_short_instruction_run_lowers_the_loss_and_round_trips(tiny_clip, tmp_path):
    source = ColorShapeSource("instruction", resolution=32, seed=0)
    options = TrainOptions(steps=40, batch_size=32, lr=2e-3, warmup=5, save_every=1000, device="cpu")
    result = train(str(tiny_clip), tmp_path / "out", source, options, progress=False)
    first, last = sum(result.losses[:8]) / 8, sum(result.losses[-8:]) / 8
    assert last < first - 0.1, (first, last)
    model = FocalLensCLIPModel.from_pretrained(tmp_path / "out")
    assert model.instruction_projection.weight.abs().sum() > 0
    vectors = create_encoder(str(tmp_path / "out")).encode_images([draw_image(1)], "what color is the object?")
    assert vectors.shape == (1, 32)
    assert not (tmp_path / "out" / "checkpoint-last").exists()


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


@pytest.fixture()
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # identical arithmetic in both runs
    yield
    torch.set_num_threads(before)


def test_an_interrupted_run_resumes_to_the_same_weights(tiny_clip, tmp_path, one_thread):
    options = TrainOptions(steps=8, batch_size=8, lr=1e-3, warmup=2, save_every=3, device="cpu", caption_weight=0.5)
    source = ColorShapeSource("instruction", resolution=32, seed=0, with_captions=True)
    whole_run = train(str(tiny_clip), tmp_path / "whole", source, options, progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(str(tiny_clip), tmp_path / "split", _Interrupting(source, 7), options, progress=False)
    assert (tmp_path / "split" / "checkpoint-last" / "training_state.json").is_file()
    resumed = train(str(tiny_clip), tmp_path / "split", source, options, progress=False)
    assert resumed.resumed_from == 6
    assert resumed.losses == whole_run.losses
    whole = FocalLensCLIPModel.from_pretrained(tmp_path / "whole").state_dict()
    split = FocalLensCLIPModel.from_pretrained(tmp_path / "split").state_dict()
    for name, tensor in whole.items():
        # Key biases get (mathematically) zero gradients that Adam scales up from round-off.
        torch.testing.assert_close(split[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    with pytest.raises(UserError, match="already holds a trained model"):
        train(str(tiny_clip), tmp_path / "split", source, options, progress=False)


def test_train_and_synth_from_the_command_line(tiny_clip, tmp_path, llava):
    runner = CliRunner()
    synth = runner.invoke(app, ["synth", "colorshape", str(tmp_path / "world"), "--n", "12", "--resolution", "32"])
    assert synth.exit_code == 0, synth.output
    result = runner.invoke(app, [
        "train", "--base", str(tiny_clip), "--out", str(tmp_path / "model"), "--data", str(tmp_path / "world" / "instructions.json"),
        "--steps", "3", "--batch-size", "8", "--warmup", "1", "--device", "cpu",
    ])
    assert result.exit_code == 0, result.output
    assert "trained 3 steps" in result.stdout and (tmp_path / "model" / "model.safetensors").is_file()
    long_answers = runner.invoke(app, [
        "train", "--base", str(tiny_clip), "--out", str(tmp_path / "model2"), "--data", str(llava),
        "--image-root", str(llava.parent / "img"), "--steps", "2", "--batch-size", "4", "--warmup", "1", "--device", "cpu",
    ])
    assert long_answers.exit_code == 0, long_answers.output
    generated = runner.invoke(app, [
        "train", "--base", str(tiny_clip), "--out", str(tmp_path / "model4"), "--data", "colorshape", "--resolution", "32",
        "--steps", "2", "--batch-size", "8", "--warmup", "1", "--device", "cpu",
        "--image-weight", "0.5", "--recolor", "0.5", "--phrasing-noise", "0.5", "--train-text", "--text-steps", "1",
        "--focus", "shape", "--focus-share", "0.6", "--text-anchor-weight", "2",
    ])
    assert generated.exit_code == 0, generated.output
    log = json.loads((tmp_path / "model4" / "training_log.json").read_text())
    assert log["options"]["image_weight"] == 0.5 and log["options"]["text_steps"] == 1 and log["options"]["train_text"]
    assert log["options"]["text_anchor_weight"] == 2.0
    captions = runner.invoke(app, [
        "train", "--base", str(tiny_clip), "--out", str(tmp_path / "model5"), "--data", "colorshape", "--resolution", "32",
        "--objective", "caption", "--name-negatives", "--steps", "2", "--batch-size", "8", "--warmup", "1", "--device", "cpu",
        "--next-token-weight", "1", "--name-first-captions", "--size-synonym-captions", "--question-frame-captions",
    ])
    assert captions.exit_code == 0, captions.output
    assert json.loads((tmp_path / "model5" / "training_log.json").read_text())["options"]["next_token_weight"] == 1.0
    misplaced = runner.invoke(app, ["train", "--base", str(tiny_clip), "--out", str(tmp_path / "m6"), "--data", "colorshape", "--name-negatives"])
    assert misplaced.exit_code == 2 and misplaced.stderr.startswith("error: --name-negatives applies to generated captions only")
    for wrong, message in ((["--data", "colorshape", "--focus", "weight"], "error: unknown --focus 'weight'"),
                           (["--data", str(llava), "--focus", "shape"], "error: --focus applies to generated instructions only"),
                           (["--data", "colorshape", "--text-anchor-weight", "1"], "error: --text-anchor-weight applies to a trained text tower"),
                           (["--data", "colorshape", "--next-token-weight", "1"], "error: --next-token-weight applies to caption training"),
                           (["--data", str(llava), "--size-synonym-captions"], "error: --name-first-captions, --size-synonym-captions and --question-frame-captions apply"),
                           (["--data", str(llava), "--question-frame-captions"], "error: --name-first-captions, --size-synonym-captions and --question-frame-captions apply")):
        refused = runner.invoke(app, ["train", "--base", str(tiny_clip), "--out", str(tmp_path / "m7"), *wrong])
        assert refused.exit_code == 2 and refused.stderr.startswith(message) and len(refused.stderr.strip().splitlines()) == 1
    missing = runner.invoke(app, ["train", "--base", str(tiny_clip), "--out", str(tmp_path / "m3"), "--data", str(tmp_path / "none.json")])
    assert missing.exit_code == 2 and missing.stderr.startswith("error: cannot read training data")


def test_no_weight_decay_on_temperature_gains_and_biases(tiny_clip):
    from focalsearch.models.loading import load_clip_family, resolve_model
    from focalsearch.train.loop import TrainOptions, _Trainer

    model, tokenizer, processor = load_clip_family(resolve_model(str(tiny_clip)))
    trainer = _Trainer(model, tokenizer, processor, TrainOptions(objective="caption", device="cpu", weight_decay=0.1))
    decay = {id(p) for g in trainer.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.logit_scale) not in decay
    assert id(model.vision_model.post_layernorm.weight) not in decay
    assert id(model.visual_projection.weight) in decay
    assert sum(len(g["params"]) for g in trainer.optimizer.param_groups) == len(list(model.parameters()))


def test_grayscale_only_where_the_answer_survives_it():
    from focalsearch.synth import colorshape as cs
    from focalsearch.train.data import ColorShapeSource

    gray_answers, colour_answers = set(), set()
    source = ColorShapeSource("instruction", 32, seed=3, grayscale=1.0)
    for step in range(6):
        batch = source.batch(step, 32)
        for image, target in zip(batch.images, batch.targets):
            pixels = np.asarray(image).astype(int)
            is_gray = bool((pixels.max(axis=2) == pixels.min(axis=2)).all())
            (gray_answers if is_gray else colour_answers).add(target)
    colour_free = {v for a in cs.COLOR_FREE_ATTRIBUTES for v in cs.VALUES[a]}
    assert gray_answers and gray_answers <= colour_free  # never asked about colour or background
    assert set(cs.COLORS) & colour_answers and set(cs.BACKGROUNDS) & colour_answers
    assert not cs.visible_in_grayscale(cs.Attributes("red", "star", "one", "teal", "small"))
    plain = ColorShapeSource("instruction", 32, seed=3).batch(0, 32)
    assert all(not (np.asarray(i).max(axis=2) == np.asarray(i).min(axis=2)).all() for i in plain.images)


def test_same_answer_image_term_pulls_same_answers_together():
    from focalsearch.train.loop import same_answer_image_loss

    labels = torch.tensor([0, 0, 1, 1, 2])  # the lone image of answer 2 has no positive and is left out
    apart = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.05], [0.0, 1.0], [0.05, 1.0], [-1.0, 0.0]]), dim=-1)
    mixed = apart[[0, 2, 1, 3, 4]]
    scale = torch.tensor(20.0)
    assert same_answer_image_loss(apart, labels, scale) < 1e-3 < same_answer_image_loss(mixed, labels, scale)
    assert same_answer_image_loss(apart[[0, 2, 4]], torch.tensor([0, 1, 2]), scale) == 0.0  # no pairs at all


def test_recolored_images_never_show_a_held_out_pair():
    from focalsearch.synth import colorshape as cs

    rng = random.Random(0)
    for scene in cs.all_attributes()[::7]:
        for _ in range(20):
            fill = cs.off_palette_fill(scene, rng)
            assert (cs.nearest_color(fill), scene.shape) not in cs.HELD_OUT_PAIRS
            assert sum((a - b) ** 2 for a, b in zip(fill, cs.BACKGROUNDS[scene.background])) >= 60.0**2
    source = ColorShapeSource("instruction", 32, seed=3, recolor=1.0)
    recolored = asked_colour = 0
    for step in range(4):
        batch = source.batch(step, 32)
        for image, target in zip(batch.images, batch.targets):
            pixels = np.asarray(image).reshape(-1, 1, 3).astype(float)
            distance = np.linalg.norm(pixels - np.array(list(cs.COLORS.values()))[None], axis=2).min(axis=0)
            if target in cs.COLORS:  # questions about colour keep the palette colour they name
                asked_colour += 1
                assert distance[list(cs.COLORS).index(target)] < 12
            elif distance.min() > 12:  # no palette colour anywhere: recoloured
                recolored += 1
    assert recolored > 50 and asked_colour > 0
    for image in ColorShapeSource("instruction", 32, seed=3).batch(0, 32).images:  # recolor 0: palette colours only
        pixels = np.asarray(image).reshape(-1, 1, 3).astype(float)
        assert np.linalg.norm(pixels - np.array(list(cs.COLORS.values()))[None], axis=2).min() < 12


def test_text_steps_freeze_the_text_tower_and_nothing_else(tiny_clip, tmp_path):
    base = FocalLensCLIPModel.from_pretrained(tiny_clip).state_dict()
    source = ColorShapeSource("instruction", resolution=32, seed=0)
    options = TrainOptions(steps=4, text_steps=2, batch_size=8, lr=2e-3, warmup=1, save_every=2, device="cpu", train_text=True)
    with pytest.raises(KeyboardInterrupt):
        train(str(tiny_clip), tmp_path / "run", _Interrupting(source, 3), options, progress=False)
    after_two = FocalLensCLIPModel.from_pretrained(tmp_path / "run" / "checkpoint-last").state_dict()
    train(str(tiny_clip), tmp_path / "run", source, options, progress=False)
    final = FocalLensCLIPModel.from_pretrained(tmp_path / "run").state_dict()
    text = [n for n in final if n.startswith(("text_model.", "text_projection."))]
    assert sum(not torch.equal(after_two[n], base[n]) for n in text) > len(text) // 2  # steps 1-2 trained the text tower
    assert all(torch.equal(final[n], after_two[n]) for n in text)  # steps 3-4 did not
    vision = "vision_model.embeddings.patch_embedding.weight"
    assert not torch.equal(final[vision], after_two[vision]) and not torch.equal(final["instruction_projection.weight"], after_two["instruction_projection.weight"])
    assert json.loads((tmp_path / "run" / "training_log.json").read_text())["options"]["text_steps"] == 2


def test_name_swapped_negatives_differ_from_their_caption_only_in_an_attribute_name():
    from focalsearch.synth import colorshape as cs

    source = ColorShapeSource("caption", resolution=16, seed=0, name_negatives=True)
    batch = source.batch(0, 64)
    names = {w for words in cs.NAME_WORDS.values() for w in words}
    assert len(batch.negatives) == len(batch.targets)
    swapped = 0
    for caption, negative in zip(batch.targets, batch.negatives):
        if not negative:
            assert not names & {w.rstrip("s,.?") for w in caption.split()}
            continue
        changed = [(a, b) for a, b in zip(caption.split(), negative.split()) if a != b]
        assert len(changed) == 1, (caption, negative)
        before, after = (w.rstrip("s,.?") for w in changed[0])
        owner = {w: a for a, ws in cs.NAME_WORDS.items() for w in ws}
        assert owner[before] != owner[after]
        swapped += 1
    assert swapped > 20
    assert ColorShapeSource("caption", resolution=16, seed=0).batch(0, 8).negatives is None


def test_name_first_and_size_synonym_captions_and_their_negatives():
    from focalsearch.synth import colorshape as cs

    names = {w for words in cs.NAME_WORDS.values() for w in words}
    owner = {w: a for a, ws in cs.NAME_WORDS.items() for w in ws}
    source = ColorShapeSource("caption", resolution=16, seed=0, name_negatives=True, name_first_captions=True,
                              size_synonym_captions=True)
    captions, negatives = [], []
    for step in range(6):
        batch = source.batch(step, 64)
        captions += batch.targets
        negatives += batch.negatives
    frames = [(c, n) for c, n in zip(captions, negatives) if c.split()[0].rstrip(":") in names or c.startswith("which ")]
    assert len(frames) > len(captions) // 5
    for caption, negative in frames:  # the bare name is the only word that tells the negative apart
        changed = [(a, b) for a, b in zip(caption.split(), negative.split()) if a != b]
        assert len(changed) == 1 and owner[changed[0][0].rstrip("?:")] != owner[changed[0][1].rstrip("?:")], (caption, negative)
    words = {w for c in captions for w in cs._words(c)}
    assert {"big", "little", "large", "small"} <= words
    # both off, the captions are the shipped demo's; on, the tokenizer texts carry the new words too
    plain = ColorShapeSource("caption", resolution=16, seed=0, name_negatives=True)
    plain_words = {w for step in range(6) for c in plain.batch(step, 64).targets for w in cs._words(c)}
    assert not {"big", "little"} & plain_words and not any(c.split()[0].rstrip(":") in names for c in plain.batch(0, 64).targets)
    assert {"big", "little"} & {w for t in source.texts() for w in cs._words(t)}


def test_question_frame_captions_ask_training_questions_with_every_name_and_no_held_out_run():
    from focalsearch.synth import colorshape as cs

    frames = cs.question_frame_templates()
    owner = {w: a for a, ws in cs.NAME_WORDS.items() for w in ws}
    assert "which form do the objects have? {shape}" in frames["shape"] and "what backdrop is the object? {background}" in frames["background"]
    assert "what hue are the shapes? {color}" not in frames["color"]  # a held-out synonym, word for word
    assert "which hue are the objects? {color}" not in frames["color"]  # holds the held-out question "which hue?"
    for attribute, templates in frames.items():
        for template in templates:
            named = [w.rstrip("?") for w in template.split() if w.rstrip("?") in owner]
            assert len(named) == 1 and (attribute is None or owner[named[0]] == attribute), template
            assert template.endswith("}") and not cs.contains_held_out(cs._words(template.split("{")[0]), min_words=2), template
    assert {w for t in frames[None] for w in cs._words(t)} >= {"hue", "form", "backdrop", "scale"}

    source = ColorShapeSource("caption", resolution=16, seed=0, name_negatives=True, name_first_captions=True,
                              size_synonym_captions=True, question_frame_captions=True)
    pairs = [pair for batch in (source.batch(step, 64) for step in range(6)) for pair in zip(batch.targets, batch.negatives)]
    filled = {t[: t.index("{")] for t in frames[None]}
    asked = [(c, n) for c, n in pairs if c.rsplit(" ", 1)[0] + " " in filled]
    assert 0.08 < len(asked) / len(pairs) < 0.3  # a quarter of the two thirds that are not name-first
    assert {owner[w.rstrip("?")] for c, _ in asked for w in c.split() if w.rstrip("?") in owner} == set(cs.ATTRIBUTES)
    for caption, negative in asked:  # the negative swaps the name, never the plural that means the objects
        changed = [(a, b) for a, b in zip(caption.split(), negative.split()) if a != b]
        assert len(changed) == 1 and owner[changed[0][0].rstrip("?")] != owner[changed[0][1].rstrip("?")], (caption, negative)
    without = ColorShapeSource("caption", resolution=16, seed=0, name_negatives=True, name_first_captions=True, size_synonym_captions=True)
    assert not any(c.rsplit(" ", 1)[0] + " " in filled for step in range(6) for c in without.batch(step, 64).targets)


def test_name_swapped_prefers_a_name_to_a_plural_that_means_the_objects():
    from focalsearch.synth import colorshape as cs

    for seed in range(20):
        negative = cs.name_swapped("two red shapes that have a star form", random.Random(seed))
        assert negative.startswith("two red shapes that have a star ") and not negative.endswith(" form")
    assert cs.name_swapped("three red shapes on gray", random.Random(0)).split()[2] != "shapes"  # no name: the plural it is


def test_frozen_text_instruction_states_match_the_tuned_path(tiny_clip):
    from focalsearch.models.init_checkpoint import focallens_from_clip
    from focalsearch.models.loading import load_clip_family, resolve_model
    from focalsearch.train.loop import _Trainer

    model, tokenizer, processor = load_clip_family(resolve_model(str(tiny_clip)))
    trainer = _Trainer(focallens_from_clip(model, seed=0), tokenizer, processor,
                       TrainOptions(objective="instruction", device="cpu", train_text=True))
    instructions = ["shape", "what color is the background?", "shape", "how many shapes are there?"]
    with torch.no_grad():
        tuned, tuned_mask = trainer._instruction_tokens(instructions)
        trainer._freeze_text_tower()
        frozen, frozen_mask = trainer._instruction_tokens(instructions)  # one padded pass for the three new texts
        again, _ = trainer._instruction_tokens(instructions[::-1])  # from the cache
    assert torch.equal(tuned_mask, frozen_mask) and len(trainer._instruction_cache) == 3
    keep = tuned_mask.bool()
    torch.testing.assert_close(frozen[keep], tuned[keep], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(again[:, : frozen.shape[1]], frozen.flip(0), atol=0, rtol=0)


def test_focus_asks_more_questions_about_one_attribute_and_its_hard_negatives():
    from focalsearch.synth import colorshape as cs

    def asked_shape(source):
        targets = [t for step in range(20) for t in source.batch(step, 32).targets]
        return sum(t in cs.SHAPES for t in targets) / len(targets)

    plain = ColorShapeSource("instruction", 32, seed=5)
    focused = ColorShapeSource("instruction", 32, seed=5, focus="shape", focus_share=0.6)
    assert asked_shape(plain) < 0.3 < 0.55 < asked_shape(focused)
    # Groups asked about the focus keep the varied-attribute structure: some share one shape (the
    # other attribute varies), some hold four different shapes of otherwise the same scene.
    batch = focused.batch(0, 64)
    groups = [batch.targets[i : i + 4] for i in range(0, 64, 4)]
    shape_groups = [g for g in groups if all(t in cs.SHAPES for t in g)]
    assert any(len(set(g)) == 1 for g in shape_groups) and any(len(set(g)) == 4 for g in shape_groups)
    assert ColorShapeSource("caption", 32, seed=5, focus="shape", focus_share=0.6).batch(0, 8).targets == \
        ColorShapeSource("caption", 32, seed=5).batch(0, 8).targets  # captions are not affected
    with pytest.raises(ValueError, match="focus"):
        ColorShapeSource("instruction", 32, focus="weight", focus_share=0.5)


def test_text_anchor_loss_measures_how_far_the_states_moved():
    torch.manual_seed(0)
    start = torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert text_anchor_loss(start, start.clone(), mask).item() == pytest.approx(0.0, abs=1e-6)
    assert text_anchor_loss(-start, start, mask).item() == pytest.approx(2.0)  # opposite states: cosine -1
    moved_padding = start.clone()
    moved_padding[0, 3:] = torch.randn(2, 16)
    assert text_anchor_loss(moved_padding, start, mask).item() == pytest.approx(0.0, abs=1e-6)  # padding does not count


def test_the_text_anchor_holds_caption_states_near_the_starting_tower(tiny_clip, tmp_path, one_thread):
    from focalsearch.models.loading import load_clip_family
    from focalsearch.models import resolve_model

    captions = ["3 small red stars on a blue background", "a teal backdrop with 2 green circles", "items of large scale"]

    def caption_states(folder):
        model, tokenizer, _ = load_clip_family(resolve_model(str(folder)))
        with torch.no_grad():
            return model.eval().text_model(**tokenizer(captions, padding=True, return_tensors="pt")).last_hidden_state

    start = caption_states(tiny_clip)
    source = ColorShapeSource("instruction", resolution=32, seed=0, with_captions=True)
    drift = {}
    for weight in (0.0, 20.0):
        options = TrainOptions(steps=6, batch_size=8, lr=3e-3, warmup=1, device="cpu", train_text=True, text_anchor_weight=weight)
        train(str(tiny_clip), tmp_path / f"w{weight}", source, options, progress=False)
        drift[weight] = (1 - torch.cosine_similarity(caption_states(tmp_path / f"w{weight}"), start, dim=-1)).mean().item()
    assert drift[0.0] > 0.01  # tuning moves the caption states ...
    assert drift[20.0] < drift[0.0] / 2  # ... and the anchor holds most of them in place
    without_captions = TrainOptions(steps=1, batch_size=8, warmup=1, device="cpu", train_text=True, text_anchor_weight=1.0)
    with pytest.raises(UserError, match="needs captions"):
        train(str(tiny_clip), tmp_path / "no-captions", ColorShapeSource("instruction", resolution=32, seed=0), without_captions, progress=False)


def test_next_token_loss_reads_each_next_token_through_the_embeddings():
    embedding = torch.eye(6) * 10  # token i's state is its own row: a state predicts the token it equals
    ids = torch.tensor([[0, 3, 4, 1, 1], [0, 2, 5, 3, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    right = embedding[ids.roll(-1, dims=1)]  # each state equal to the next token's row
    assert next_token_loss(right, ids, mask, embedding).item() < 1e-3
    wrong = embedding[ids]  # each state predicts its own token, never the next
    assert next_token_loss(wrong, ids, mask, embedding).item() > 9
    padded = right.clone()
    padded[0, 3:] = embedding[5]  # padding targets do not count
    assert next_token_loss(padded, ids, mask, embedding).item() < 1e-3


def test_next_token_term_ties_words_that_share_their_caption_contexts(tiny_clip, tmp_path, one_thread):
    from focalsearch.models.loading import load_clip_family
    from focalsearch.models import resolve_model

    def cosine(folder, a, b):
        model, tokenizer, _ = load_clip_family(resolve_model(str(folder)))
        rows = model.text_model.embeddings.token_embedding.weight.detach()
        ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in (a, b)]
        return torch.cosine_similarity(rows[ids[0]].mean(0), rows[ids[1]].mean(0), dim=0).item()

    source = ColorShapeSource("caption", resolution=32, seed=0)
    ties = {}
    for weight in (0.0, 1.0):
        options = TrainOptions(objective="caption", steps=30, batch_size=16, lr=3e-3, warmup=1, device="cpu", next_token_weight=weight)
        train(str(tiny_clip), tmp_path / f"w{weight}", source, options, progress=False)
        ties[weight] = cosine(tmp_path / f"w{weight}", "backdrop", "background")
    # "on a teal backdrop" / "on a teal background": only the next-token term sees the shared context
    assert ties[1.0] > ties[0.0] + 0.1, ties
