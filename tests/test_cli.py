"""The command line as a user types it, on generated folders and tiny checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import draw_image, make_broken_files, make_image_folder
from focalsearch.cli import app

runner = CliRunner()


def cli(*args: str) -> "Result":
    result = runner.invoke(app, [str(a) for a in args])
    return result


def cli_json(*args: str) -> dict:
    result = cli(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_one_line_error(result, code: int, *needles: str) -> None:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def collection(tmp_path_factory, tiny_clip):
    """The acceptance scenario: 200 images in subfolders plus 5 broken files, indexed under two instructions."""
    root = tmp_path_factory.mktemp("acceptance")
    photos = root / "photos"
    make_image_folder(photos, 200)
    broken = make_broken_files(photos / "broken")
    focal = root / "focal"
    init = cli("model", "init", tiny_clip, focal)
    assert init.exit_code == 0, init.output
    assert "untrained" in init.stdout
    index = root / "index"
    first = cli_json("index", photos, "-i", "background", "--instruction", "How many objects?", "--model", focal,
                     "--index", index, "--batch-size", "16")
    return {"photos": photos, "broken": broken, "focal": focal, "index": index, "first": first}


def good(collection, pattern: str) -> list[Path]:
    return sorted(p for p in collection["photos"].rglob(pattern) if p.parent.name != "broken")


def test_index_reports_rows_and_broken_files(collection):
    report = collection["first"]
    assert report["encoded"] == 200
    assert report["conditions"] == {"background": 200, "how many objects?": 200}
    skipped = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {p.name for p in collection["broken"]}
    assert skipped["empty.jpg"] == "empty file"
    assert "truncated" in skipped["truncated.jpg"] and "truncated" in skipped["truncated.png"]
    assert "not an image" in skipped["notes.png"] and "not an image" in skipped["random.webp"]
    assert report["encoder"] == "focallens" and report["model"] == str(collection["focal"].resolve())
    assert report["images_per_second"] > 0


def test_immediate_rerun_encodes_nothing(collection):
    again = cli_json("index", collection["photos"], "-i", "background", "-i", "how many objects?",
                     "--index", collection["index"])
    assert again["encoded"] == 0 and again["unchanged"] == 200 and again["removed"] == 0
    assert again["conditions"] == {"background": 200, "how many objects?": 200}


def test_query_by_image_returns_k_existing_paths_without_itself(collection):
    query = good(collection, "*.png")[0]
    out = cli_json("query", query, "--instruction", "background", "-k", "7", "--index", collection["index"])
    assert set(out) == {"query", "instruction", "conditions", "model", "encoder", "k", "offset", "results"}
    assert out["conditions"] == [{"instruction": "background", "weight": 1.0}]
    assert set(out["results"][0]) == {"rank", "path", "name", "score", "image_id", "scores"}
    assert out["instruction"] == "background" and out["model"] == str(collection["focal"].resolve())
    assert [r["rank"] for r in out["results"]] == list(range(1, 8))
    assert all(Path(r["path"]).is_file() for r in out["results"])
    assert str(query.resolve()) not in {r["path"] for r in out["results"]}
    scores = [r["score"] for r in out["results"]]
    assert scores == sorted(scores, reverse=True)


def test_conditions_give_different_neighbours(collection):
    query = good(collection, "*.jpg")[3]
    by = {i: [r["path"] for r in cli_json("query", query, "-i", i, "-k", "10", "--index", collection["index"])["results"]]
          for i in ("background", "how many objects?")}
    assert by["background"] != by["how many objects?"]


def test_query_by_text_and_paths_only(collection):
    out = cli_json("query", "--text", "three apples", "-i", "background", "-k", "4", "--index", collection["index"])
    assert out["query"] == "three apples" and len(out["results"]) == 4
    plain = cli("query", "--text", "three apples", "-i", "background", "-k", "4", "--index", collection["index"], "--paths-only")
    assert plain.exit_code == 0
    assert plain.stdout.splitlines() == [r["path"] for r in out["results"]]
    for precision in ("float32", "bfloat16"):
        forced = cli_json("query", "--text", "three apples", "-i", "background", "-k", "4", "--index", collection["index"],
                          "--precision", precision)
        assert len(forced["results"]) == 4
        assert abs(forced["results"][0]["score"] - out["results"][0]["score"]) < 0.01  # the best score moves by at most the rounding


def test_conditions_command(collection):
    out = cli_json("conditions", "--index", collection["index"])
    rows = {c["instruction"]: c for c in out["conditions"]}
    assert set(rows) == {"background", "how many objects?"}
    for c in rows.values():
        assert c["rows"] == 200 and c["encoder"] == "focallens" and c["model"] == str(collection["focal"].resolve())
        assert c["updated_at"] >= c["created_at"]
    table = cli("conditions", "--index", collection["index"])
    assert table.exit_code == 0 and "200 rows" in table.stdout and "focallens" in table.stdout


def test_unknown_instruction_is_a_one_line_user_error(collection):
    query = good(collection, "*.png")[0]
    result = cli("query", query, "-i", "quantity", "--index", collection["index"])
    assert_one_line_error(result, 2, '"quantity"', '"background"', '"how many objects?"', "focalsearch index")


def test_other_user_errors(collection, tiny_clip, tmp_path):
    index = collection["index"]
    query = good(collection, "*.png")[0]
    assert_one_line_error(cli("query", query, "-i", "background", "--index", index, "--model", tiny_clip), 2, "built with model")
    assert_one_line_error(cli("query", collection["broken"][4], "-i", "background", "--index", index), 2, "cannot read query image")
    assert_one_line_error(cli("query", query, "--index", tmp_path / "none"), 2, "no index")
    assert_one_line_error(cli("query", "-i", "background", "--index", index), 2, "give one query: an image, --text, or --image-id")
    assert_one_line_error(cli("index", tmp_path / "missing", "--index", tmp_path / "i2", "--model", tiny_clip), 2, "path not found")
    assert_one_line_error(cli("query", "--text", "x", "--index", index, "--precision", "half"), 2, "unknown precision 'half'")
    assert_one_line_error(cli("index", collection["photos"], "--index", index, "--encoder", "siglip"), 2, "unknown encoder 'siglip'")
    assert_one_line_error(
        cli("index", collection["photos"], "--index", tmp_path / "i3", "--model", tmp_path / "no-model"), 2, "--model PATH", "Offline quick start"
    )
    assert not (tmp_path / "i3" / "lancedb").exists() or not list((tmp_path / "i3" / "lancedb").iterdir())


def test_faiss_top_k_equals_lancedb_exact_top_k(collection):
    from focalsearch.api import FocalSearch
    from focalsearch.search import load_condition_index, search_index
    from focalsearch.store import Store

    store = Store(collection["index"])
    condition = store.find("background")
    index = load_condition_index(store, condition)
    assert index.ann.kind == "flat"
    engine = FocalSearch(collection["index"])
    encoder = engine._load_encoder((condition.model, condition.encoder, condition.prompts))
    for seed in range(5):
        vector = encoder.encode_images([draw_image(1000 + seed)], "background")[0]
        faiss_hits = search_index(index, vector, 10)
        exact = store.exact_search(condition, vector, 10)
        assert [h.path for h in faiss_hits] == [p for p, _ in exact]
        np.testing.assert_allclose([h.score for h in faiss_hits], [s for _, s in exact], atol=1e-5)


def test_incremental_reindex(tmp_path, tiny_focal):
    photos = tmp_path / "photos"
    paths = make_image_folder(photos, 12)
    index = tmp_path / "index"
    args = ("index", photos, "-i", "color", "--index", index, "--model", tiny_focal)
    assert cli_json(*args)["encoded"] == 12

    touched, changed, deleted = paths[0], paths[1], paths[2]
    os.utime(touched, ns=(time.time_ns(), time.time_ns() + 5_000_000_000))
    draw_image(500).save(changed, "PNG" if changed.suffix == ".png" else changed.suffix[1:].upper().replace("JPG", "JPEG"))
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 7_000_000_000))
    deleted.unlink()
    report = cli_json(*args)
    assert (report["encoded"], report["unchanged"], report["removed"]) == (1, 10, 1)
    assert report["conditions"] == {"color": 11}

    from focalsearch.store import Store

    store = Store(index)
    records = store.file_records(store.find("color"))
    assert records[str(touched.resolve())].mtime_ns == touched.stat().st_mtime_ns
    assert str(deleted.resolve()) not in records
    assert cli_json(*args)["encoded"] == 0

    # A new instruction encodes every image for that condition only.
    both = cli_json("index", photos, "-i", "color", "-i", "shape", "--index", index)
    assert both["encoded"] == 11 and both["conditions"] == {"color": 11, "shape": 11}


def test_indexing_a_second_folder_keeps_the_first(tmp_path, tiny_focal):
    first, second = tmp_path / "a", tmp_path / "b"
    make_image_folder(first, 5)
    make_image_folder(second, 4, start=100)
    index = tmp_path / "index"
    cli_json("index", first, "--index", index, "--model", tiny_focal)
    report = cli_json("index", second, "--index", index)
    assert report["removed"] == 0 and report["conditions"] == {"": 9}


def test_a_file_that_turns_corrupt_leaves_the_index(tmp_path, tiny_focal):
    photos = tmp_path / "photos"
    paths = make_image_folder(photos, 4)
    index = tmp_path / "index"
    cli_json("index", photos, "--index", index, "--model", tiny_focal)
    paths[0].write_bytes(b"oops")
    report = cli_json("index", photos, "--index", index)
    assert report["conditions"] == {"": 3} and [s["path"] for s in report["skipped"]] == [str(paths[0].resolve())]


def _index_subprocess(photos: Path, index: Path, model: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "focalsearch.cli", "index", str(photos), "-i", "background", "-i", "quantity",
               "--index", str(index), "--model", str(model), "--batch-size", "1", "--workers", "1", "--commit-every", "0.2", "--json"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rows(index: Path) -> int:
    from focalsearch.store import Store

    try:
        store = Store(index)
        return sum(store.count(c) for c in store.conditions())
    except Exception:
        return 0


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_run_resumes_with_exact_rows(tmp_path, tiny_focal, sig):
    photos = tmp_path / "photos"
    make_image_folder(photos, 400, size=(160, 120))
    index = tmp_path / "index"
    process = _index_subprocess(photos, index, tiny_focal)
    deadline = time.time() + 120
    # Stop it as soon as rows are on disk: one encoder call per batch serves both instructions, so a
    # run of a few hundred images can finish while a slow look at the table waits for more.
    while _rows(index) < 2 and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    committed = _rows(index)
    assert 0 < committed < 800, "the run must be stopped part-way for this test to mean anything"
    if sig == signal.SIGINT:
        assert process.returncode == 130, stderr
        assert stderr.strip().splitlines()[-1].startswith("error: interrupted")

    report = cli_json("index", photos, "-i", "background", "-i", "quantity", "--index", index)
    assert report["conditions"] == {"background": 400, "quantity": 400}
    assert report["encoded"] + report["unchanged"] == 400 and report["unchanged"] > 0

    from focalsearch.store import Store

    store = Store(index)
    for condition in store.conditions():
        paths = [r.path for r in store.file_records(condition).values()]
        assert len(paths) == len(set(paths)) == 400


def test_max_pixels_skips_oversized_images(tmp_path, tiny_focal):
    photos = tmp_path / "photos"
    make_image_folder(photos, 3, size=(48, 40))
    draw_image(7, (20, 20)).save(photos / "small.png")
    report = cli_json("index", photos, "--index", tmp_path / "index", "--model", tiny_focal, "--max-pixels", "1000")
    assert report["conditions"] == {"": 1}
    reasons = [s["reason"] for s in report["skipped"]]
    assert len(reasons) == 3 and all(r.startswith("too large: 48x40") for r in reasons)
