"""The paper benchmarks: scoring rules by hand, official-format fixtures end to end, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from bench_fixtures import CELEBA_ATTRIBUTES, NAMES, PALETTE, write_celeba, write_genecis, write_mmvp, write_sugarcrepe
from focalsearch.bench.common import BenchDataError, average_precision, pessimistic_rank, recall_at_k, strictly_prefers
from focalsearch.bench.genecis import crop_instance
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

    def preprocess(self, images):
        def colour(image):  # mean of the non-black pixels (attribute crops are padded with black)
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 3)
            bright = pixels[pixels.sum(1) > 60]
            return bright.mean(0) if len(bright) else pixels.mean(0)

        return np.stack([colour(im) for im in images])

    def encode_images(self, images, instruction=""):
        return self.encode_pixels(self.preprocess(images), instruction)


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
    perfect = run_benchmark(name, PerfectEncoder(), data)
    constant = run_benchmark(name, ConstantEncoder(), data)
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
    assert metrics["Color and Appearance"] == 50.0
    assert metrics["Quantity and Count"] == 100.0
    assert metrics["mean"] == 75.0


# -- data errors -----------------------------------------------------------------------------------------------
def test_missing_and_malformed_files_name_themselves(tmp_path):
    data = write_genecis(tmp_path / "g")
    (data / "genecis" / "change_object.json").unlink()
    with pytest.raises(BenchDataError, match="change_object"):
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
    assert f"({encoder})" in result.stdout and "mean" in result.stdout


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
