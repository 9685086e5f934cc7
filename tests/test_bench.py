"""The paper benchmarks: scoring rules by hand, official-format fixtures end to end, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from bench_fixtures import CELEBA_ATTRIBUTES, NAMES, PALETTE, write_celeba, write_genecis, write_mmvp, write_sugarcrepe
from focalsearch.bench import mmvp
from focalsearch.bench.common import (
    BenchDataError,
    average_precision,
    l2_normalize,
    pessimistic_rank,
    recall_at_k,
    stable_rank,
    strictly_prefers,
)
from focalsearch.bench.genecis import TASKS, crop_instance
from focalsearch.bench.registry import run_benchmark
from focalsearch.cli import app
from focalsearch.models.encoders import EncoderInfo

runner = CliRunner()
WRITERS = {"genecis": write_genecis, "mmvp-vlm": write_mmvp, "sugarcrepe": write_sugarcrepe, "celeba-attribute": write_celeba}


# -- scoring rules, by hand ------------------------------------------------------------------------------
def test_rank_breaks_ties_against_the_target():
    assert pessimistic_rank(np.array([0.9, 0.1, 0.2]), 0) == 1
    assert pessimistic_rank(np.array([0.5, 0.5, 0.1]), 0) == 2
    assert pessimistic_rank(np.array([0.3, 0.3, 0.3, 0.3]), 0) == 4  # a constant scorer ranks the target last
    assert pessimistic_rank(np.array([0.1, 0.7, 0.3, 0.1]), 2) == 2


def test_official_rank_keeps_list_order_among_ties():
    # GeneCIS's official order: target listed first, a stable descending sort.
    assert stable_rank(np.array([0.5, 0.5, 0.1]), 0) == 1
    assert stable_rank(np.array([0.3, 0.3, 0.3, 0.3]), 0) == 1
    assert stable_rank(np.array([0.3, 0.9, 0.3]), 0) == 2
    assert stable_rank(np.array([0.3, 0.9, 0.3]), 2) == 3  # an equal score listed earlier ranks above


def test_mmvp_official_choice_gives_a_tie_to_image_2():
    assert mmvp.chosen_image(0.6, 0.5) == 1
    assert mmvp.chosen_image(0.5, 0.5) == 2
    assert mmvp.pair_is_right((0.6, 0.5), (0.5, 0.5), "official")  # statement 2 wins its tie
    assert not mmvp.pair_is_right((0.5, 0.5), (0.4, 0.6), "official")  # statement 1 loses its tie
    assert not mmvp.pair_is_right((0.6, 0.5), (0.5, 0.5), "pessimistic")


def test_recall_at_k_counts_ranks_up_to_k():
    assert recall_at_k([1, 1, 1], 1) == 100.0
    assert recall_at_k([1, 2, 3, 4], 2) == 50.0
    assert recall_at_k([15] * 10, 3) == 0.0


def test_average_precision_by_hand():
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision(np.array([0.9, 0.8, 0.7]), np.array([1, 1, 0])) == 1.0
    # Ties put the relevant item after the irrelevant ones: a constant scorer earns only the worst order.
    assert average_precision(np.zeros(3), np.array([1, 0, 0])) == pytest.approx(1 / 3)
    assert average_precision(np.zeros(4), np.array([0, 1, 0, 1])) == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert average_precision(np.zeros(3), np.zeros(3)) == 0.0


def test_pairwise_choice_needs_a_strictly_higher_score():
    assert strictly_prefers(0.6, 0.5)
    assert not strictly_prefers(0.5, 0.5)
    assert not strictly_prefers(0.4, 0.5)


def test_genecis_attribute_crop_follows_the_official_arithmetic():
    image = Image.new("RGB", (100, 80), (200, 200, 200))
    crop = crop_instance(image, [20, 10, 30, 20])
    # left = max(0, 20 - 21) = 0, top = max(0, 10 - 14) = 0, right = 0 + 1.7 * 30 = 51, bottom = 0 + 1.7 * 20 = 34
    assert crop.size == (51, 51)
    pixels = np.asarray(crop)
    assert (pixels[:8] == 0).all() and (pixels[8 + 34 :] == 0).all()  # black padding above and below
    assert (pixels[8 : 8 + 34] == 200).all()
    far = crop_instance(Image.new("RGB", (100, 80), (9, 9, 9)), [60, 50, 20, 10])
    assert far.size == (34, 34)  # left 46, top 43, right 80, bottom 60: a 34 x 17 crop


# -- fake scorers: perfect and constant ---------------------------------------------------------------------
class _FakeEncoder:
    """Implements the ConditionalEncoder interface the benchmarks use, on flat-colour images."""

    batch_size = 3
    encoder = "focallens"

    def __init__(self):
        self.info = EncoderInfo(encoder=self.encoder, model="fake", dim=len(PALETTE) + 2)

    @property
    def reads_instruction(self):
        return self.encoder != "clip"

    def preprocess(self, images):
        def colour(image):  # mean of the non-black pixels (attribute crops are padded with black)
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 3)
            bright = pixels[pixels.sum(1) > 60]
            return bright.mean(0) if len(bright) else pixels.mean(0)

        return np.stack([colour(im) for im in images])

    def encode_images(self, images, instruction=""):
        return self.encode_pixels(self.preprocess(images), instruction)

    def select(self, batch, rows):
        return batch[list(rows)]

    def encode_batch(self, batch, instructions):
        return [self.encode_pixels(batch, instruction) for instruction in instructions]


class PerfectEncoder(_FakeEncoder):
    def encode_pixels(self, pixels, instruction=""):
        out = np.zeros((len(pixels), self.info.dim), np.float32)
        for row, rgb in enumerate(pixels):
            channel = [k for k, name in enumerate(("red", "green", "blue")) if f"{name} channel" in instruction]
            if channel:  # CelebA fixture: the attribute is whether that channel is bright
                out[row, len(PALETTE) + int(rgb[channel[0]] > 128)] = 1
            else:
                out[row, int(np.argmin([np.abs(rgb - c).sum() for c in PALETTE.values()]))] = 1
        return out

    def encode_texts(self, texts):
        out = np.zeros((len(texts), self.info.dim), np.float32)
        for row, text in enumerate(texts):
            out[row, [n in text for n in NAMES].index(True)] = 1
        return out


class ConstantEncoder(_FakeEncoder):
    def encode_pixels(self, pixels, instruction=""):
        return np.full((len(pixels), self.info.dim), 1 / np.sqrt(self.info.dim), np.float32)

    def encode_texts(self, texts):
        return np.full((len(texts), self.info.dim), 1 / np.sqrt(self.info.dim), np.float32)


@pytest.mark.parametrize("name", list(WRITERS))
def test_perfect_scorer_gets_100_and_constant_scorer_gets_no_credit(name, tmp_path):
    data = WRITERS[name](tmp_path / name)
    ties = {"ties": "pessimistic"} if name in ("genecis", "mmvp-vlm") else {}
    perfect = run_benchmark(name, PerfectEncoder(), data, **ties)
    constant = run_benchmark(name, ConstantEncoder(), data, **ties)
    if name == "celeba-attribute":
        assert perfect.metrics["mean"] == 100.0
        assert set(perfect.metrics) == {*CELEBA_ATTRIBUTES, "mean", "chance mean"}
        # Pessimistic ties put every relevant face last: AP is far below the positive share.
        assert constant.metrics["mean"] < constant.metrics["chance mean"]
        assert perfect.details["gallery"] == 12  # the test split only
        return
    assert perfect.metrics and all(v == 100.0 for v in perfect.metrics.values()), perfect.metrics
    assert all(v == 0.0 for v in constant.metrics.values()), constant.metrics


def test_genecis_reports_every_task_and_the_paper_references(tmp_path):
    report = run_benchmark("genecis", PerfectEncoder(), write_genecis(tmp_path))
    for task in ("focus_attribute", "change_attribute", "focus_object", "change_object", "mean"):
        assert {f"{task}/R@{k}" for k in (1, 2, 3)} <= set(report.metrics)
    assert report.reference["focus_object/R@3"] == 43.72
    assert "43.72" in report.table()


def test_sugarcrepe_groups_average_their_subsets(tmp_path):
    data = write_sugarcrepe(tmp_path)
    record = json.loads((data / "swap_att.json").read_text())
    record["0"]["caption"], record["0"]["negative_caption"] = record["0"]["negative_caption"], record["0"]["caption"]
    (data / "swap_att.json").write_text(json.dumps(record))
    metrics = run_benchmark("sugarcrepe", PerfectEncoder(), data).metrics
    assert metrics["swap_att"] == 50.0
    assert metrics["swap"] == 75.0
    assert metrics["mean"] == pytest.approx((6 * 100 + 50) / 7)


def test_mmvp_pair_counts_only_when_both_statements_are_right(tmp_path):
    data = write_mmvp(tmp_path)
    lines = (data / "Questions.csv").read_text().splitlines()
    lines[2] = lines[2].replace(lines[2].split(",")[2], "a " + NAMES[0] + " picture")  # statement 2 of pair 1 now wrong
    (data / "Questions.csv").write_text("\n".join(lines) + "\n")
    metrics = run_benchmark("mmvp-vlm", PerfectEncoder(), data).metrics
    assert metrics["Color"] == 50.0
    assert metrics["Quantity"] == 100.0
    assert metrics["mean"] == 75.0


# -- data errors -----------------------------------------------------------------------------------------------
def test_missing_and_malformed_files_name_themselves(tmp_path):
    data = write_genecis(tmp_path / "g")
    (data / "genecis" / "change_object.json").write_text(json.dumps([{"condition": "colour"}]))
    with pytest.raises(BenchDataError, match="change_object.json record 0"):
        run_benchmark("genecis", PerfectEncoder(), data)
    data = write_sugarcrepe(tmp_path / "s")
    (data / "add_att.json").write_text(json.dumps({"0": {"filename": "x.jpg", "caption": "a"}}))
    with pytest.raises(BenchDataError, match=r"add_att.json record '0'.*negative_caption"):
        run_benchmark("sugarcrepe", PerfectEncoder(), data)
    data = write_celeba(tmp_path / "c")
    text = (data / "list_attr_celeba.txt").read_text().splitlines()
    text[5] = text[5] + " 1"
    (data / "list_attr_celeba.txt").write_text("\n".join(text))
    with pytest.raises(BenchDataError, match="line 6"):
        run_benchmark("celeba-attribute", PerfectEncoder(), data)
    data = write_mmvp(tmp_path / "m")
    next((data / "MLLM_VLM Images").rglob("3.jpg")).unlink()
    with pytest.raises(BenchDataError, match="3.jpg"):
        run_benchmark("mmvp-vlm", PerfectEncoder(), data)


def test_limit_takes_the_first_records(tmp_path):
    report = run_benchmark("sugarcrepe", PerfectEncoder(), write_sugarcrepe(tmp_path, items_per_subset=4), limit=1)
    assert set(report.details["items"].values()) == {1}


# -- the command line, with a real (tiny) model ---------------------------------------------------------------
@pytest.mark.parametrize("name", list(WRITERS))
def test_bench_command_runs_end_to_end_on_official_format(name, tmp_path, tiny_focal):
    data = WRITERS[name](tmp_path / "data")
    out = tmp_path / "report.json"
    result = runner.invoke(app, ["bench", name, "--data", str(data), "--model", str(tiny_focal), "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "paper" in result.stdout
    report = json.loads(out.read_text())
    assert report["benchmark"] == name and report["encoder"] == "focallens" and report["model"] == str(tiny_focal)
    assert report["metrics"] and all(0.0 <= v <= 100.0 for v in report["metrics"].values())
    assert report["reference"]


@pytest.mark.parametrize("encoder", ["clip", "clip+text"])
@pytest.mark.parametrize("name", ["genecis", "mmvp-vlm"])
def test_bench_command_with_plain_clip_baselines(name, encoder, tmp_path, tiny_clip):
    data = WRITERS[name](tmp_path / "data")
    args = ["bench", name, "--data", str(data), "--model", str(tiny_clip), "--encoder", encoder, "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"({encoder}, float32)" in result.stdout and "mean" in result.stdout


def test_clip_encodes_each_image_once_whatever_the_instructions(tmp_path):
    class CountingClip(PerfectEncoder):
        encoder = "clip"
        calls = 0

        def encode_pixels(self, pixels, instruction=""):
            assert instruction == ""
            CountingClip.calls += len(pixels)
            return super().encode_pixels(pixels, instruction)

    data = write_genecis(tmp_path)
    report = run_benchmark("genecis", CountingClip(), data, instruction="what is the {condition}?")
    assert CountingClip.calls == len({p.name for p in data.rglob("*.jpg")})
    assert report.metrics["mean/R@1"] == 100.0


def test_bench_colorshape_needs_no_data(tiny_focal):
    result = runner.invoke(app, ["bench", "colorshape", "--model", str(tiny_focal), "--device", "cpu", "--limit", "3"])
    assert result.exit_code == 0, result.output
    assert "mean/R@1" in result.stdout and "held-out phrasings" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["bench", "imagenet"], "unknown benchmark 'imagenet'"),
        (["bench", "genecis"], "genecis needs --data DIR"),
        (["bench", "sugarcrepe", "--data", "/nonexistent"], "is not a folder"),
    ],
)
def test_bench_command_errors_are_one_line(args, message, tiny_focal):
    result = runner.invoke(app, [*args, "--model", str(tiny_focal), "--device", "cpu"])
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_bench_command_missing_annotation_is_one_line(tmp_path, tiny_focal):
    data = write_genecis(tmp_path / "data")
    (data / "genecis" / "focus_attribute.json").write_text("[{]")
    result = runner.invoke(app, ["bench", "genecis", "--data", str(data), "--model", str(tiny_focal), "--device", "cpu"])
    assert result.exit_code == 2
    assert "focus_attribute.json is not valid JSON" in result.stderr


# -- GeneCIS: report, official image+text baseline, ties, task subsets ---------------------------------------
def test_genecis_json_holds_item_counts_per_task_and_names_the_paper_model(tmp_path):
    report = run_benchmark("genecis", PerfectEncoder(), write_genecis(tmp_path / "data", items_per_task=2), limit=None)
    report.write_json(tmp_path / "report.json")
    written = json.loads((tmp_path / "report.json").read_text())
    assert written["items"] == {task: 2 for task in TASKS}
    assert written["reference_model"] == "FocalLens-CLIP" and written["ties"] == "official"
    assert "(paper: FocalLens-CLIP)" in report.table()


class ImagePlusTextFake(PerfectEncoder):
    """A clip+text encoder whose raw text embedding is 10x longer than its raw image embedding and
    leans towards yellow: averaging raw features lets the text dominate, the normalised sum does not."""

    encoder = "clip+text"
    TEXT = 10 * (0.8 * np.eye(len(PALETTE) + 2)[NAMES.index("yellow")] + 0.6 * np.eye(len(PALETTE) + 2)[-1])

    def raw_image_features(self, pixels):
        return super().encode_pixels(pixels, "")

    def raw_text_features(self, texts):
        return np.stack([self.TEXT] * len(texts)).astype(np.float32)

    def encode_pixels(self, pixels, instruction=""):  # our general clip+text: normalised sum of normalised parts
        image = super().encode_pixels(pixels, "")
        return l2_normalize(image + l2_normalize(self.TEXT)) if instruction else image


def test_genecis_clip_text_averages_raw_features_as_the_official_baseline(tmp_path):
    # References are red, green and blue; yellow is in every gallery. normalise(0.5 * raw image +
    # 0.5 * raw text) = normalise(e_ref + 8 e_yellow + 6 e_extra): yellow (8) beats the target (1).
    # The normalised sum would give e_ref + 0.8 e_yellow + 0.6 e_extra: the target (1) wins.
    report = run_benchmark("genecis", ImagePlusTextFake(), write_genecis(tmp_path))
    for task in TASKS:
        assert report.metrics[f"{task}/R@1"] == 0.0 and report.metrics[f"{task}/R@2"] == 100.0
    assert "raw" in report.details["query"]


def test_raw_features_are_the_encoder_vectors_before_normalisation(tiny_clip):
    from focalsearch.models import create_encoder

    encoder = create_encoder(str(tiny_clip), encoder="clip+text", device="cpu")
    pixels = encoder.preprocess([Image.new("RGB", (40, 30), c) for c in PALETTE.values()])
    raw = encoder.raw_image_features(pixels)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    np.testing.assert_allclose(l2_normalize(raw), encoder.encode_pixels(pixels, ""), atol=1e-5)
    texts = ["color", "a red circle on a blue background"]
    np.testing.assert_allclose(l2_normalize(encoder.raw_text_features(texts)), encoder.encode_texts(texts), atol=1e-5)


def test_genecis_official_ties_credit_the_target_listed_first(tmp_path):
    data = write_genecis(tmp_path)
    official = run_benchmark("genecis", ConstantEncoder(), data)
    pessimistic = run_benchmark("genecis", ConstantEncoder(), data, ties="pessimistic")
    assert all(v == 100.0 for v in official.metrics.values()) and official.details["ties"] == "official"
    assert all(v == 0.0 for v in pessimistic.metrics.values()) and pessimistic.details["ties"] == "pessimistic"
    # As in change_object.json record 19: the target listed again in the gallery ties with itself.
    path = data / "genecis" / "change_object.json"
    records = json.loads(path.read_text())
    records[0]["gallery"][-1] = records[0]["target"]  # the gallery keeps its length: the record is kept
    path.write_text(json.dumps(records))
    assert run_benchmark("genecis", PerfectEncoder(), data).metrics["change_object/R@1"] == 100.0
    tied = run_benchmark("genecis", PerfectEncoder(), data, ties="pessimistic").metrics
    assert tied["change_object/R@1"] == pytest.approx(200 / 3) and tied["change_object/R@2"] == 100.0


def test_genecis_runs_the_tasks_it_has_data_for_and_says_which_it_left_out(tmp_path):
    data = write_genecis(tmp_path)
    for image in (data / "vg" / "VG_100K_all").iterdir():  # COCO only: the attribute tasks cannot run
        image.unlink()
    (data / "vg" / "VG_100K_all").rmdir()
    (data / "genecis" / "change_object.json").unlink()
    report = run_benchmark("genecis", PerfectEncoder(), data)
    assert {m.split("/")[0] for m in report.metrics} == {"focus_object", "mean over 1 of 4 tasks"}
    assert report.details["items"] == {"focus_object": 3}
    assert report.details["tasks_left_out"] == {
        "focus_attribute": "no image folder vg/VG_100K_all",
        "change_attribute": "no image folder vg/VG_100K_all",
        "change_object": "no annotations genecis/change_object.json",
    }
    table = report.table()
    assert "note: left out focus_attribute: no image folder vg/VG_100K_all" in table
    assert "note: left out change_object: no annotations genecis/change_object.json" in table


def test_genecis_leaves_out_a_task_with_missing_images(tmp_path):
    data = write_genecis(tmp_path)
    (data / "coco" / "val2017" / "000000000031.jpg").unlink()  # focus_object's first reference
    report = run_benchmark("genecis", PerfectEncoder(), data)
    assert report.details["tasks_left_out"] == {"focus_object": "1 of 15 images missing, e.g. coco/val2017/000000000031.jpg"}
    assert "mean over 3 of 4 tasks/R@1" in report.metrics and "mean/R@1" not in report.metrics


def test_genecis_task_option_picks_tasks_and_a_picked_task_must_run(tmp_path):
    data = write_genecis(tmp_path)
    report = run_benchmark("genecis", PerfectEncoder(), data, tasks=["change_object", "focus_object"])
    assert set(report.details["items"]) == {"change_object", "focus_object"}
    assert report.details["tasks_left_out"] == {} and not report.notes
    (data / "genecis" / "focus_object.json").unlink()
    with pytest.raises(BenchDataError, match="cannot run focus_object: no annotations genecis/focus_object.json"):
        run_benchmark("genecis", PerfectEncoder(), data, tasks=["focus_object"])
    with pytest.raises(BenchDataError, match="unknown task 'colour'"):
        run_benchmark("genecis", PerfectEncoder(), data, tasks=["colour"])


def test_bench_genecis_with_no_task_to_run_is_one_line(tmp_path, tiny_focal):
    data = tmp_path / "data"
    (data / "genecis").mkdir(parents=True)
    result = runner.invoke(app, ["bench", "genecis", "--data", str(data), "--model", str(tiny_focal), "--device", "cpu"])
    assert result.exit_code == 2
    assert "no task can run" in result.stderr and "focus_object: no annotations" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bench_command_passes_ties_and_tasks_and_records_them(tmp_path, tiny_focal):
    data = write_genecis(tmp_path / "data")
    out = tmp_path / "report.json"
    args = ["bench", "genecis", "--data", str(data), "--model", str(tiny_focal), "--device", "cpu", "--json", str(out)]
    result = runner.invoke(app, [*args, "--ties", "pessimistic", "--task", "focus_object", "--task", "change_object"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["ties"] == "pessimistic" and set(report["items"]) == {"focus_object", "change_object"}
    assert report["tasks_left_out"] == {} and report["notes"] == []


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("genecis", ["--ties", "random"], "unknown tie rule 'random'; use one of: official, pessimistic"),
        ("sugarcrepe", ["--ties", "official"], "--ties applies only to genecis and mmvp-vlm, not to sugarcrepe"),
        ("mmvp-vlm", ["--task", "focus_object"], "--task applies only to genecis, not to mmvp-vlm"),
        ("genecis", ["--task", "focus_colour"], "unknown task 'focus_colour'"),
        ("mmvp-vlm", ["--encoder", "text-only"], "--encoder text-only applies only to genecis, not to mmvp-vlm"),
    ],
)
def test_bench_option_errors_are_one_line_before_loading_a_model(name, options, message, tmp_path):
    args = ["bench", name, "--data", str(tmp_path), "--model", str(tmp_path / "no-such-model"), "--device", "cpu", *options]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


# -- MMVP-VLM: the official tie rule, the CSV read by position, the default instruction -------------------------
def test_mmvp_official_tie_goes_to_image_2(tmp_path):
    data = write_mmvp(tmp_path)
    lines = (data / "Questions.csv").read_text().splitlines()
    lines[2] = lines[2].replace(lines[2].split(",")[2], "a yellow picture")  # pair 1 shows red and green: a tie
    (data / "Questions.csv").write_text("\n".join(lines) + "\n")
    official = run_benchmark("mmvp-vlm", PerfectEncoder(), data)
    pessimistic = run_benchmark("mmvp-vlm", PerfectEncoder(), data, ties="pessimistic")
    assert official.metrics["Color"] == 100.0 and official.details["ties"] == "official"
    assert pessimistic.metrics["Color"] == 50.0 and pessimistic.details["ties"] == "pessimistic"
    # The same tie on the first statement of a pair goes to image 2, so it is wrong either way.
    lines = (data / "Questions.csv").read_text().splitlines()
    lines[1] = lines[1].replace(lines[1].split(",")[2], "a yellow picture")
    (data / "Questions.csv").write_text("\n".join(lines) + "\n")
    assert run_benchmark("mmvp-vlm", PerfectEncoder(), data).metrics["Color"] == 50.0


def test_mmvp_reads_columns_by_position_after_any_header(tmp_path):
    data = write_mmvp(tmp_path)
    lines = (data / "Questions.csv").read_text().splitlines()
    lines[0] = "qid,category,text"  # the official script skips line 1 whatever it says
    (data / "Questions.csv").write_text("\n".join(lines) + "\n\n")
    assert run_benchmark("mmvp-vlm", PerfectEncoder(), data).metrics["mean"] == 100.0
    lines[3] += ",extra"
    (data / "Questions.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(BenchDataError, match="line 4: expected 3 columns"):
        run_benchmark("mmvp-vlm", PerfectEncoder(), data)


def test_mmvp_default_instruction_is_the_type_in_lower_case_as_documented(tmp_path):
    class Recording(PerfectEncoder):
        seen: set = set()

        def encode_pixels(self, pixels, instruction=""):
            Recording.seen.add(instruction)
            return super().encode_pixels(pixels, instruction)

    run_benchmark("mmvp-vlm", Recording(), write_mmvp(tmp_path, patterns=("Color", "Camera Perspective")))
    assert Recording.seen == {"color", "camera perspective"}
    assert mmvp.instruction_for("Camera Perspective") == "camera perspective"
    assert '"Camera Perspective" -> "camera perspective"' in mmvp.__doc__
    assert mmvp.instruction_for("Color", "what is the {pattern}?") == "what is the color?"


# -- CelebA-Attribute: a partial mean says so --------------------------------------------------------------------
def test_celeba_mean_over_fewer_attributes_says_over_how_many(tmp_path):
    # With the first 2 test images (bits 001 and 101) only Blue_Channel has two positives.
    report = run_benchmark("celeba-attribute", PerfectEncoder(), write_celeba(tmp_path), limit=2)
    assert set(report.metrics) == {"Blue_Channel", "mean over 1 of 3 attributes", "chance mean over 1 of 3 attributes"}
    assert report.details["attributes_in_mean"] == 1 and report.details["attributes_left_out"] == ["Red_Channel", "Green_Channel"]
    table = report.table()
    mean_line = next(line for line in table.splitlines() if line.startswith("mean over 1 of 3 attributes"))
    assert "21.32" not in mean_line and "13.59" not in mean_line  # no paper figure beside a partial mean
    assert "note: mean over 1 of 3 attributes: Red_Channel, Green_Channel left out" in table
    full = run_benchmark("celeba-attribute", PerfectEncoder(), write_celeba(tmp_path / "full"))
    assert "mean" in full.metrics and full.details["attributes_left_out"] == [] and not full.notes


# -- SugarCrepe: unweighted group means and the item-weighted mean -------------------------------------------------
def test_sugarcrepe_reports_the_item_weighted_mean_beside_the_unweighted_one(tmp_path):
    data = write_sugarcrepe(tmp_path)
    records = json.loads((data / "swap_att.json").read_text())
    for n in ("2", "3"):  # two more swap_att items, both wrong: swap_att is 2 of 4 right
        records[n] = {**records["0"], "caption": records["0"]["negative_caption"], "negative_caption": records["0"]["caption"]}
    (data / "swap_att.json").write_text(json.dumps(records))
    metrics = run_benchmark("sugarcrepe", PerfectEncoder(), data).metrics
    assert metrics["swap_att"] == 50.0 and metrics["swap"] == 75.0
    assert metrics["mean"] == pytest.approx((6 * 100 + 50) / 7)  # every subset counts once
    assert metrics["item-weighted mean"] == pytest.approx((12 + 2) / 16 * 100)  # every item counts once


def test_bench_report_takes_everything_after_the_metrics_by_name():
    from focalsearch.bench.common import BenchReport

    with pytest.raises(TypeError):
        BenchReport("b", "m", "e", {}, {}, {"items": 1})  # once, a details dict landed in reference_model


# -- issue 23 item 10: the official baselines, exactly ---------------------------------------------------------
def _exif_rotated_jpeg(path, outer, inner):
    """A 100 x 80 stored JPEG in colour ``outer`` with ``inner`` where x >= 40 and y >= 40, and EXIF
    Orientation 6 (shown turned 90 degrees clockwise: 80 x 100, ``inner`` then at the lower left)."""
    image = Image.new("RGB", (100, 80), PALETTE[outer])
    image.paste(Image.new("RGB", (60, 40), PALETTE[inner]), (40, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "JPEG", quality=95, exif=exif.tobytes())
    return path


def _share(pixels, colour):
    """Share of the non-black pixels nearest to ``colour`` in PALETTE."""
    pixels = np.asarray(pixels, dtype=np.float32).reshape(-1, 3)
    pixels = pixels[pixels.sum(1) > 60]
    nearest = np.argmin([np.abs(pixels - c).sum(1) for c in PALETTE.values()], axis=0)
    return float(np.mean(nearest == NAMES.index(colour)))


def test_benchmark_images_keep_their_stored_pixels_as_the_official_loaders_do(tmp_path):
    from focalsearch.bench.common import load_rgb
    from focalsearch.bench.genecis import _loader
    from focalsearch.images import load_image

    path = _exif_rotated_jpeg(tmp_path / "vg" / "VG_100K_all" / "7.jpg", "red", "blue")
    assert load_image(path).image.size == (80, 100)  # indexing applies the EXIF orientation
    assert load_rgb(path, "test").size == (100, 80)  # benchmarks do not, as Image.open(p).convert('RGB')
    crop = _loader(tmp_path)(("vg", 7, (60.0, 50.0, 20.0, 10.0)))
    # The official VAW loader: Image.open, crop (46, 43, 80, 60) from the stored pixels, pad to a black square.
    with Image.open(path) as raw:
        official = raw.crop((46, 43, 80, 60))
    expected = Image.new("RGB", (34, 34), (0, 0, 0))
    expected.paste(official, (0, 8))
    assert crop.size == (34, 34)
    np.testing.assert_array_equal(np.asarray(crop), np.asarray(expected.convert("RGB")))
    assert _share(crop, "blue") > 0.95
    # Cropped after the EXIF turn, the same box lands on red: the test tells the two readings apart.
    assert _share(crop_instance(load_image(path).image, [60, 50, 20, 10]), "red") > 0.95


def test_genecis_attribute_crops_come_from_the_unrotated_pixels(tmp_path):
    data = write_genecis(tmp_path)
    path = data / "genecis" / "focus_attribute.json"
    records = json.loads(path.read_text())
    for record in records:  # each reference: its own colour (the target's) only in the stored pixels' box
        colour = NAMES[records.index(record) % len(NAMES)]
        decoy = "yellow" if colour != "yellow" else "green"
        _exif_rotated_jpeg(data / "vg" / "VG_100K_all" / f"{record['reference']['image_id']}.jpg", decoy, colour)
        record["reference"]["instance_bbox"] = [60, 50, 20, 10]
    path.write_text(json.dumps(records))
    report = run_benchmark("genecis", PerfectEncoder(), data, tasks=["focus_attribute"])
    assert report.metrics["focus_attribute/R@1"] == 100.0  # rotated first, every reference would read yellow


@pytest.mark.parametrize("name", ["mmvp-vlm", "sugarcrepe"])
def test_mmvp_and_sugarcrepe_read_images_without_exif_orientation(name, tmp_path):
    class Sizes(PerfectEncoder):
        seen: list = []

        def preprocess(self, images):
            Sizes.seen.extend(image.size for image in images)
            return super().preprocess(images)

    data = WRITERS[name](tmp_path)
    first = next(iter(sorted(data.rglob("1.jpg")) or sorted(data.rglob("000000000001.jpg"))))
    _exif_rotated_jpeg(first, "red", "red")
    run_benchmark(name, Sizes(), data)
    assert (100, 80) in Sizes.seen and (80, 100) not in Sizes.seen


class TextOnlyFake(PerfectEncoder):
    encoder = "clip"

    def encode_pixels(self, pixels, instruction=""):
        assert instruction == ""  # the text-only baseline scores plain image features
        return super().encode_pixels(pixels, instruction)


def test_genecis_text_only_baseline_ranks_candidates_by_the_condition_text_alone(tmp_path):
    data = write_genecis(tmp_path)
    for task in TASKS:  # record n's reference and target are NAMES[n]; every gallery holds the other three
        path = data / "genecis" / f"{task}.json"
        records = json.loads(path.read_text())
        records[0]["condition"] = "red"  # names the target: rank 1
        records[1]["condition"] = "blue"  # names a gallery image; the target ties with two others, listed first: rank 2
        records[2]["condition"] = "yellow"  # names a gallery image: rank 2
        path.write_text(json.dumps(records))
    report = run_benchmark("genecis", TextOnlyFake(), data, baseline="text-only")
    assert report.encoder == "text-only" and "text-only" in report.details["query"]
    for task in TASKS:
        assert report.metrics[f"{task}/R@1"] == pytest.approx(100 / 3) and report.metrics[f"{task}/R@2"] == 100.0
    image_only = run_benchmark("genecis", TextOnlyFake(), data)  # the same encoder as clip: the reference image
    assert image_only.metrics["mean/R@1"] == 100.0


def test_genecis_text_only_scores_exactly_as_the_official_formula(tmp_path, tiny_clip):
    from focalsearch.bench.genecis import _loader, read_task
    from focalsearch.models import create_encoder

    data = write_genecis(tmp_path, items_per_task=4)
    words = ["colour", "a red thing", "shape", "the blue one"]
    for task in TASKS:
        path = data / "genecis" / f"{task}.json"
        records = json.loads(path.read_text())
        for record, word in zip(records, words):
            record["condition"] = word
        path.write_text(json.dumps(records))
    encoder = create_encoder(str(tiny_clip), encoder="clip", device="cpu", precision="float32")
    report = run_benchmark("genecis", encoder, data, baseline="text-only")
    load, every = _loader(data), []
    for task in TASKS:
        ranks = []
        for item in read_task(data, task)[0]:
            # FeatureComb("text_only"): query = normalise(text feature of the condition); gallery: normalised image features.
            query = l2_normalize(encoder.raw_text_features([item["condition"]]))[0]
            gallery = l2_normalize(encoder.raw_image_features(encoder.preprocess([load(k) for k in item["candidates"]])))
            order = np.argsort(-(gallery @ query), kind="stable")  # descending, ties in list order
            ranks.append(int(np.flatnonzero(order == 0)[0]) + 1)
        for k in (1, 2, 3):
            assert report.metrics[f"{task}/R@{k}"] == pytest.approx(recall_at_k(ranks, k), abs=1e-9), (task, k, ranks)
        every.extend(ranks)
    assert len(set(every)) > 1  # the targets do not all rank alike: the comparison has something to check


def test_bench_genecis_text_only_from_the_command_line(tmp_path, tiny_clip):
    data = write_genecis(tmp_path / "data")
    out = tmp_path / "report.json"
    args = ["bench", "genecis", "--data", str(data), "--model", str(tiny_clip), "--encoder", "text-only", "--device", "cpu"]
    result = runner.invoke(app, [*args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "(text-only, float32)" in result.stdout
    report = json.loads(out.read_text())
    assert report["encoder"] == "text-only" and report["query"].startswith("the instruction's text feature alone")


@pytest.mark.parametrize("name", ["mmvp-vlm", "sugarcrepe"])
def test_bench_on_a_plain_clip_checkpoint_defaults_to_plain_clip_for_mmvp_and_sugarcrepe(name, tmp_path, tiny_clip):
    data = WRITERS[name](tmp_path / "data")
    reports = {}
    for encoder in ("auto", "clip", "clip+text"):
        out = tmp_path / f"{encoder}.json"
        args = ["bench", name, "--data", str(data), "--model", str(tiny_clip), "--device", "cpu", "--json", str(out)]
        result = runner.invoke(app, [*args, "--encoder", encoder])
        assert result.exit_code == 0, result.output
        reports[encoder] = json.loads(out.read_text())
    assert reports["auto"]["encoder"] == "clip"
    assert reports["auto"]["metrics"] == reports["clip"]["metrics"]
    assert reports["clip+text"]["encoder"] == "clip+text"  # still there when asked for


def test_bench_genecis_on_a_plain_clip_checkpoint_keeps_the_image_plus_text_default(tmp_path, tiny_clip):
    out = tmp_path / "report.json"
    args = ["bench", "genecis", "--data", str(write_genecis(tmp_path / "data")), "--model", str(tiny_clip), "--device", "cpu"]
    result = runner.invoke(app, [*args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["encoder"] == "clip+text"


def test_bench_scores_in_float32_by_default_and_records_the_precision(tmp_path, tiny_focal):
    import torch

    from focalsearch.models.encoders import compute_dtypes

    data = write_mmvp(tmp_path / "data")
    precisions = {}
    for option in ([], ["--precision", "bfloat16"]):
        out = tmp_path / "report.json"
        args = ["bench", "mmvp-vlm", "--data", str(data), "--model", str(tiny_focal), "--device", "cpu", "--json", str(out)]
        result = runner.invoke(app, [*args, *option], env={"FOCALSEARCH_PRECISION": "bfloat16"})
        assert result.exit_code == 0, result.output
        precisions[tuple(option)] = json.loads(out.read_text())["precision"]
    assert precisions == {(): "float32", ("--precision", "bfloat16"): "bfloat16"}
    # On a GPU float32 is float32 too (the search commands' "auto" would be bf16 there).
    assert compute_dtypes(torch.device("cuda"), "float32") == (torch.float32, None)


def test_bench_corrupt_image_is_a_one_line_error(tmp_path, tiny_clip):
    data = write_mmvp(tmp_path / "data")
    (data / "MLLM_VLM Images" / "Color" / "2.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    result = runner.invoke(app, ["bench", "mmvp-vlm", "--data", str(data), "--model", str(tiny_clip), "--device", "cpu"])
    assert result.exit_code == 2
    assert "cannot use image" in result.stderr and "2.jpg" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_genecis_drops_records_whose_gallery_length_is_not_the_most_common_as_the_official_loaders(tmp_path):
    data = write_genecis(tmp_path, items_per_task=4)
    path = data / "genecis" / "focus_object.json"
    records = json.loads(path.read_text())
    records[1]["gallery"] = records[1]["gallery"][:2]  # 2 instead of 3: dropped, though its target would rank first
    path.write_text(json.dumps(records))
    report = run_benchmark("genecis", PerfectEncoder(), data, limit=2)
    assert report.details["records_dropped"] == {"focus_attribute": 0, "change_attribute": 0, "focus_object": 1, "change_object": 0}
    assert report.details["items"]["focus_object"] == 2  # --limit 2 takes records 0 and 2, the first two kept
    assert "focus_object: dropped 1 records whose gallery length is not the most common" in report.table()
    from focalsearch.bench.genecis import modal_gallery_length

    assert modal_gallery_length([{"gallery": [1, 2]}, {"gallery": [1]}, {"gallery": [3]}, {"gallery": [4, 5]}]) == 1  # a tie: the shorter


# -- the MLLM family through the same interface ---------------------------------------------------------------
@pytest.mark.parametrize("name", list(WRITERS))
def test_bench_command_runs_each_benchmark_with_a_tiny_mllm(name, tmp_path, tiny_llava):
    data = WRITERS[name](tmp_path / "data")
    out = tmp_path / "report.json"
    result = runner.invoke(app, ["bench", name, "--data", str(data), "--model", str(tiny_llava), "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["encoder"] == "mllm"  # auto: not plain clip, even where a plain CLIP checkpoint would get it
    assert report["metrics"] and all(0.0 <= v <= 100.0 for v in report["metrics"].values())
    assert report["reference"] and report["precision"] == "float32"
    if name == "celeba-attribute":
        assert report["reference_model"] == "FocalLens-MLLM" and report["reference"]["mean"] == 22.67


def _recording(encoder):
    """Wrap ``encoder.encode_batch`` so that it records the instructions of every call."""
    asked, original = [], encoder.encode_batch

    def encode_batch(batch, instructions, **kwargs):
        asked.extend(instructions)
        return original(batch, instructions, **kwargs)

    encoder.encode_batch = encode_batch
    return asked


def test_genecis_with_an_mllm_encodes_reference_and_candidates_under_the_instruction(tmp_path, tiny_llava):
    from focalsearch.bench.genecis import _loader, read_task
    from focalsearch.models import create_encoder

    data = write_genecis(tmp_path, items_per_task=3)
    for task in TASKS:  # the target no longer repeats the reference's image, so that the ranks follow the model
        path = data / "genecis" / f"{task}.json"
        records = json.loads(path.read_text())
        for record in records:
            record["target"], record["gallery"][0] = record["gallery"][0], record["target"]
        path.write_text(json.dumps(records))
    encoder = create_encoder(str(tiny_llava), device="cpu", precision="float32")
    asked = _recording(encoder)
    report = run_benchmark("genecis", encoder, data, instruction="what is the {condition}?")
    assert set(asked) == {"what is the colour?"}  # the gallery too: no plain ("") encoding
    assert report.encoder == "mllm" and report.details["query"] == "reference and candidates encoded under the instruction"
    # The same ranks by hand, each item's images encoded under the instruction through encode_images.
    load, every = _loader(data), []
    for task in TASKS:
        ranks = []
        for item in read_task(data, task)[0]:
            query = encoder.encode_images([load(item["reference"])], "what is the colour?")[0]
            gallery = encoder.encode_images([load(k) for k in item["candidates"]], "what is the colour?")
            ranks.append(stable_rank(gallery @ query, 0))
        every.extend(ranks)
        for k in (1, 2, 3):
            assert report.metrics[f"{task}/R@{k}"] == pytest.approx(recall_at_k(ranks, k)), (task, k, ranks)
    assert len(set(every)) > 1  # the targets do not all rank alike: the comparison has something to check


def test_genecis_text_only_baseline_on_an_mllm_reads_its_text_and_unconditional_vectors(tmp_path, tiny_llava):
    out = tmp_path / "report.json"
    args = ["bench", "genecis", "--data", str(write_genecis(tmp_path / "data")), "--model", str(tiny_llava), "--encoder",
            "text-only", "--device", "cpu", "--json", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["encoder"] == "text-only" and report["query"].startswith("the instruction's text feature alone")


def test_celeba_with_an_mllm_encodes_every_attribute_in_one_call_per_batch(tmp_path, tiny_llava):
    from focalsearch.models import create_encoder

    encoder = create_encoder(str(tiny_llava), device="cpu", batch_size=8, precision="float32")
    asked = _recording(encoder)
    report = run_benchmark("celeba-attribute", encoder, write_celeba(tmp_path))
    words = ["red channel", "green channel", "blue channel"]
    assert asked == words * 2  # 12 test images in batches of 8: each batch under all three attributes at once
    assert set(CELEBA_ATTRIBUTES) <= set(report.metrics)


def test_bench_colorshape_prints_every_tier_for_an_mllm(tiny_llava):
    result = runner.invoke(app, ["bench", "colorshape", "--model", str(tiny_llava), "--device", "cpu", "--limit", "2"])
    assert result.exit_code == 0, result.output
    assert "(mllm, float32)" in result.stdout
    for tier in ("held-out phrasings", "held-out synonyms", "held-out questions"):
        assert f"mean/R@1, {tier}" in result.stdout


def test_colorshape_runs_mllm_setups_beside_clip_on_the_same_items(tiny_llava, tiny_clip, tmp_path):
    from focalsearch.bench.colorshape import ALL_SETUPS, MLLM_SETUPS, run, setup_parts, unavailable

    assert set(MLLM_SETUPS) == {f"{m}{t}" for m in ("mllm", "mllm_focal")
                                for t in ("", "_heldout_phrasing", "_heldout_synonyms", "_heldout_questions")}
    assert set(ALL_SETUPS) > set(MLLM_SETUPS) and setup_parts("mllm_focal_heldout_synonyms") == ("mllm_focal", "synonyms")
    setups = ("clip", "mllm", "mllm_heldout_questions", "mllm_focal")
    results = run(str(tiny_clip), per_condition=1, device="cpu", setups=setups, mllm_model=str(tiny_llava),
                  mllm_focal_model=str(tiny_llava))
    assert list(results) == list(setups)
    assert results["mllm"].to_dict() == results["mllm_focal"].to_dict()  # the same model on the same items
    assert all(set(r.per_condition) == {"color", "shape", "count", "background", "size"} for r in results.values())
    assert unavailable(str(tiny_llava)) is None
    assert "does not exist" in unavailable(str(tmp_path / "no-such-model"))
