"""`focalsearch index --engine ray` on a local Ray instance with 2 CPUs, against the local engine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lancedb
import numpy as np
import pytest

from conftest import make_broken_files, make_image_folder
from focalsearch import FocalSearch

ray = pytest.importorskip("ray") if not os.environ.get("CI") else __import__("ray")  # under CI a missing Ray fails


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def table_rows(index: Path) -> dict[str, dict[str, tuple[str, np.ndarray]]]:
    """{instruction: {id: (path, vector)}} read straight from the tables."""
    engine = FocalSearch(index)
    db = lancedb.connect(str(index / "lancedb"))
    out = {}
    for condition in engine.conditions():
        data = db.open_table(condition.table).to_arrow()
        vectors = np.stack(data["vector"].to_numpy(zero_copy_only=False))
        assert len(set(data["id"].to_pylist())) == len(data), "one row per file"
        out[condition.instruction] = dict(zip(data["id"].to_pylist(), zip(data["path"].to_pylist(), vectors)))
    return out


def test_ray_and_local_engines_index_the_same_rows(local_ray, tmp_path, tiny_focal):
    photos = tmp_path / "photos"
    make_image_folder(photos, 300)
    make_broken_files(photos / "broken")
    reports = {}
    for engine in ("local", "ray"):
        searcher = FocalSearch(tmp_path / engine, model=str(tiny_focal), batch_size=32)
        reports[engine] = searcher.index([photos], ["background", "how many objects?"], engine=engine).to_dict()
    local, remote = reports["local"], reports["ray"]
    assert set(local) == set(remote)
    assert (remote["encoded"], remote["conditions"]) == (local["encoded"], local["conditions"]) == (300, {"background": 300, "how many objects?": 300})
    assert sorted(map(tuple, (s.values() for s in remote["skipped"]))) == sorted(map(tuple, (s.values() for s in local["skipped"])))
    rows_local, rows_ray = table_rows(tmp_path / "local"), table_rows(tmp_path / "ray")
    for instruction, rows in rows_local.items():
        assert set(rows) == set(rows_ray[instruction])
        for row_id, (path, vector) in rows.items():
            assert rows_ray[instruction][row_id][0] == path
            np.testing.assert_allclose(rows_ray[instruction][row_id][1], vector, atol=1e-4)


def test_a_ray_rerun_encodes_only_new_and_changed_files(local_ray, tmp_path, tiny_focal, monkeypatch):
    from PIL import Image

    from focalsearch.store import Store

    def driver_write(*args, **kwargs):
        raise AssertionError("the Ray engine's rows are written by its actors, not by the driver")

    monkeypatch.setattr(Store, "add", driver_write)
    monkeypatch.setattr(Store, "upsert", driver_write)
    photos = tmp_path / "photos"
    paths = make_image_folder(photos, 40)
    searcher = FocalSearch(tmp_path / "index", model=str(tiny_focal))
    assert searcher.index([photos], ["color"], engine="ray").encoded == 40
    before = table_rows(tmp_path / "index")["color"]
    make_image_folder(photos, 20, start=40)
    for path in paths[:10]:
        path.unlink()
    changed = paths[10:15]
    for path in changed:  # new content under the same name
        Image.new("RGB", (48, 40), (250, 250, 0)).save(path)
    report = searcher.index([photos], ["color"], engine="ray")
    assert (report.encoded, report.removed, report.unchanged, report.conditions) == (25, 10, 25, {"color": 50})
    after = table_rows(tmp_path / "index")["color"]
    assert len(after) == 50  # one row per file: the changed files' old rows are gone
    ids = {str(p): i for i, (p, _) in after.items()}
    for path in changed:
        row = ids[str(path)]
        assert not np.allclose(after[row][1], before[row][1], atol=1e-4), "a changed file gets its new vector"
    assert searcher.check().ok


def test_a_killed_ray_job_keeps_its_commits_and_the_rerun_is_exact(tmp_path, tiny_focal):
    photos = tmp_path / "photos"
    make_image_folder(photos, 400)
    index = tmp_path / "index"
    command = [sys.executable, "-m", "focalsearch.cli", "index", str(photos), "-i", "color", "-i", "shape", "--model", str(tiny_focal),
               "--index", str(index), "--engine", "ray", "--commit-every", "0.1", "--batch-size", "8", "--fragment-rows", "16"]
    job = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    committed, deadline = 0, time.monotonic() + 240
    try:
        while time.monotonic() < deadline and job.poll() is None and committed == 0:
            time.sleep(0.3)
            try:
                committed = min(len(rows) for rows in table_rows(index).values()) if (index / "lancedb").exists() else 0
            except Exception:
                committed = 0
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the driver and the Ray processes it started
        job.wait(timeout=60)
    assert 0 < committed < 400, f"the job was not caught part-way ({committed} rows)"
    rerun = subprocess.run(command[:-6] + ["--json"], capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads(rerun.stdout)
    assert report["conditions"] == {"color": 400, "shape": 400} and report["encoded"] < 400
    for rows in table_rows(index).values():
        assert len(rows) == 400 and len({path for path, _ in rows.values()}) == 400  # none lost, none twice
