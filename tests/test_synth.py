"""The ColorShape world: determinism, splits, phrasings and the benchmark protocol."""

from __future__ import annotations

import json

import numpy as np

from focalsearch.synth import colorshape as cs
from focalsearch.synth.export import write_colorshape


def test_rendering_is_deterministic_for_a_seed_and_any_resolution():
    scene = cs.Attributes("red", "star", "three", "white", "large")
    for resolution in (32, 64, 97):
        a, b = cs.render(scene, 5, resolution), cs.render(scene, 5, resolution)
        assert a.size == (resolution, resolution)
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(cs.render(scene, 5)), np.asarray(cs.render(scene, 6)))


def test_rendered_attributes_show_in_the_pixels():
    image = np.asarray(cs.render(cs.Attributes("blue", "square", "one", "white", "small"), 0, 64)).reshape(-1, 3)
    assert (np.abs(image - cs.BACKGROUNDS["white"]).sum(1) < 10).mean() > 0.8
    assert (np.abs(image - cs.COLORS["blue"]).sum(1) < 10).sum() > 10


def test_writer_is_deterministic(tmp_path):
    write_colorshape(tmp_path / "a", 6, seed=3)
    write_colorshape(tmp_path / "b", 6, seed=3)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 8
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    conversations = json.loads((tmp_path / "a" / "instructions.json").read_text())
    assert len(conversations) == 6 and len(conversations[0]["conversations"]) == 2 * len(cs.ATTRIBUTES)


def test_held_out_split_and_phrasings_are_kept_out_of_training():
    train = cs.split_attributes("train")
    heldout = cs.split_attributes("heldout")
    assert len(train) + len(heldout) == len(cs.all_attributes())
    assert all((a.color, a.shape) not in cs.HELD_OUT_PAIRS for a in train)
    assert all((a.color, a.shape) in cs.HELD_OUT_PAIRS for a in heldout)
    trained = {p for group in cs.TRAIN_PHRASINGS.values() for p in group}
    vocabulary = cs.caption_vocabulary()
    for held_out in (cs.HELDOUT_PHRASINGS, cs.HELDOUT_SYNONYMS):
        assert set(held_out) == set(cs.ATTRIBUTES)
        for phrasings in held_out.values():
            for phrase in phrasings:
                assert phrase not in trained
                assert set(cs._words(phrase)) <= vocabulary, phrase
    for attribute, synonyms in cs.HELDOUT_SYNONYMS.items():
        own_words = {w for p in cs.TRAIN_PHRASINGS[attribute] for w in cs._words(p)}
        assert cs._words(synonyms[0])[-1] not in own_words  # hue, form, items, backdrop, scale


def test_held_out_questions_use_caption_words_and_frames_only():
    trained_words = {w for group in cs.TRAIN_PHRASINGS.values() for p in group for w in cs._words(p)}
    caption_only = cs.caption_vocabulary() - trained_words
    known = {p for table in (cs.TRAIN_PHRASINGS, cs.HELDOUT_PHRASINGS, cs.HELDOUT_SYNONYMS) for g in table.values() for p in g}
    templates = [" ".join(cs._words(t.replace("{", " ").replace("}", " "))) for t in cs._CAPTION_TEMPLATES]
    assert set(cs.HELDOUT_QUESTIONS) == set(cs.ATTRIBUTES)
    for attribute, questions in cs.HELDOUT_QUESTIONS.items():
        for question in questions:
            words = cs._words(question)
            assert set(words) <= cs.caption_vocabulary() and question not in known, question
            assert set(words) & caption_only, f"{question!r} names its attribute by a word the instructions never use"
            frame = [w for w in words if w != "which"]  # the slot, asked for
            assert any(_is_subsequence(frame, t.split()) for t in templates), f"{question!r} is no caption frame"


def _is_subsequence(needle: list[str], hay: list[str]) -> bool:
    it = iter(hay)
    return all(any(w == h for h in it) for w in needle)


def test_benchmark_items_obey_the_protocol():
    items = cs.benchmark_items(per_condition=40, distractors=4, seed=1)
    assert len(items) == 40 * len(cs.ATTRIBUTES)
    for item in items:
        assert cs.is_held_out(item.query)
        others = [a for a in cs.ATTRIBUTES if a != item.condition]
        assert item.positive.get(item.condition) == item.query.get(item.condition)
        assert all(item.positive.get(a) != item.query.get(a) for a in others)
        assert len(item.distractors) == 4
        for distractor, _ in item.distractors:
            assert distractor.get(item.condition) != item.query.get(item.condition)
            assert all(distractor.get(a) == item.query.get(a) for a in others)
    assert cs.benchmark_items(per_condition=40, distractors=4, seed=1) == items


def test_recall_at_1_bookkeeping_perfect_and_constant_scorers():
    from focalsearch.bench.colorshape import recall_at_1

    items = cs.benchmark_items(per_condition=4, distractors=3, seed=2)
    size = 2 + 3

    def oracle(images, instruction):
        # Images arrive per item as [query, positive, distractors...]: give query and positive one vector.
        vectors = np.zeros((len(images), 2), np.float32)
        for i in range(len(images)):
            vectors[i] = (1, 0) if i % size in (0, 1) else (0, 1)
        return vectors

    assert recall_at_1(items, oracle, resolution=16).mean == 1.0
    constant = recall_at_1(items, lambda images, _: np.ones((len(images), 2), np.float32), resolution=16)
    assert constant.mean == 0.0 and set(constant.per_condition) == set(cs.ATTRIBUTES)


def test_noisy_phrasings_keep_the_attribute_words_and_never_hit_a_held_out_phrasing():
    import random

    rng = random.Random(0)
    held_out = {tuple(cs._words(p)) for table in (cs.HELDOUT_PHRASINGS, cs.HELDOUT_SYNONYMS) for g in table.values() for p in g}
    fillers = set(cs._filler_words())
    assert not fillers & cs.INSTRUCTION_KEYWORDS and "hue" not in fillers and "red" not in fillers
    changed = 0
    for attribute, phrasings in cs.TRAIN_PHRASINGS.items():
        for phrasing in phrasings:
            for _ in range(200):
                noisy = cs.noisy_instruction(phrasing, rng)
                words = cs._words(noisy)
                assert tuple(words) not in held_out
                assert [w for w in words if w in cs.INSTRUCTION_KEYWORDS] == [w for w in cs._words(phrasing) if w in cs.INSTRUCTION_KEYWORDS]
                assert set(words) <= set(cs._words(phrasing)) | fillers
                changed += noisy != phrasing
    assert changed > 2000


def _every_instruction_the_trainer_can_emit() -> set[str]:
    """Each training phrasing, and every way noisy_instruction can drop its filler words and insert
    up to two caption fillers, less those that noisy_instruction refuses."""
    import itertools

    fillers = cs._filler_words()
    out = set()
    for phrasings in cs.TRAIN_PHRASINGS.values():
        for phrasing in phrasings:
            out.add(phrasing)
            words, mark = cs._words(phrasing), "?" if phrasing.endswith("?") else ""
            droppable = [i for i, w in enumerate(words) if w not in cs.INSTRUCTION_KEYWORDS]
            kept_variants = {
                tuple(w for i, w in enumerate(words) if i not in dropped)
                for r in range(len(droppable) + 1) for dropped in itertools.combinations(droppable, r)
            }
            for kept in kept_variants:
                variants = {kept}
                for _ in range(2):
                    variants |= {v[:i] + (f,) + v[i:] for v in variants for i in range(len(v) + 1) for f in fillers}
                out.update(" ".join(v) + mark for v in variants if not cs.contains_held_out(list(v)))
    return out


def test_no_held_out_phrasing_synonym_or_question_occurs_in_any_instruction_the_trainer_can_emit():
    import random

    from focalsearch.train.data import ColorShapeSource

    emittable = _every_instruction_the_trainer_can_emit()
    assert len(emittable) > 1_000_000
    # The enumeration covers what the trainer really draws (all of its instruction batches' texts).
    source = ColorShapeSource("instruction", resolution=8, seed=3, phrasing_noise=0.5)
    rng = random.Random(1)
    drawn = {cs.noisy_instruction(cs.instruction(a, rng, "train"), rng) for _ in range(4000) for a in cs.ATTRIBUTES}
    drawn |= {text for step in range(3) for text in source.batch(step, 64).instructions}
    assert drawn <= emittable

    # Checked as padded text, apart from how noisy_instruction checks it.
    held_out = [p for tier in ("heldout", "synonyms", "questions") for group in cs.PHRASINGS[tier].values() for p in group]
    held_out_runs = [" " + " ".join(cs._words(p)) + " " for p in held_out]
    synonym_words = {"hue", "form", "forms", "backdrop", "scale", "large"}  # "number of items" is one of the runs
    for text in emittable:
        padded = " " + " ".join(cs._words(text)) + " "
        assert not any(run in padded for run in held_out_runs), text
        assert not synonym_words & set(padded.split()), text


def test_held_out_phrases_are_found_inside_longer_instructions():
    assert cs.contains_held_out(cs._words("how number of items objects"))
    assert cs.contains_held_out(cs._words("what is the color of the items ?"))
    assert not cs.contains_held_out(cs._words("number of objects"))
