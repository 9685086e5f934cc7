"""Every script under benchmarks/ runs at its smallest size, as a user types it (issue 23, item 9).

No timing is asserted: each run must exit 0 and write its --json with the keys that its printout
and the README read. A script that is not smoke-run here must be named in COVERED_ELSEWHERE with
the test file that runs it, so that no benchmark can rot unnoticed (scale.py once failed on an
import of a renamed helper, and nothing ran it). The runs go two at a time, the machine's cores.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from bench_fixtures import write_celeba, write_genecis, write_mmvp, write_sugarcrepe

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
EXAMPLE_IMAGES = ROOT / "examples" / "colorshape" / "images"

# script -> its smallest run; {data} is a folder of tiny official-format fixtures, {four} 4 example PNGs.
SMOKE: dict[str, list[str]] = {
    "ann.py": ["--n", "2000", "--dim", "16", "--clusters", "10", "--queries", "20"],
    "celeba_attribute.py": ["--data", "{data}/celeba", "--model", "demo"],
    "colorshape.py": ["--per-condition", "2"],
    "colorshape_words.py": ["--samples", "200"],
    "combined_conditions.py": ["--queries", "2", "--k", "3"],
    "genecis.py": ["--data", "{data}/genecis", "--model", "demo"],
    "memory.py": ["--sizes", "6"],
    "mllm_public_shapes.py": ["--shapes", "tiny-llava", "--images", "2", "--repeats", "1"],
    "mllm_gpu.py": ["--shape", "tiny", "--device", "cpu", "--images", "4", "--repeats", "1"],  # the 7B shape needs CUDA
    "mmvp_vlm.py": ["--data", "{data}/mmvp", "--model", "demo"],
    "query_latency.py": ["--repeats", "1", "--kinds", "image", "--images", "4"],
    # The Ray half starts Ray (about 2 minutes here at 2 images); tests/test_ray.py runs the engine, and
    # the helpers it imports from throughput.py are imported at the top, so a rename still fails here.
    "scale.py": ["--skip-ray", "--sizes", "1000", "--dim", "8"],
    "serve_latency.py": ["--images", "12", "--requests", "2", "--warmup", "1", "--concurrency", "1", "--uploads", "1",
                         "--cold-repeats", "1", "--precisions", "auto"],
    "sugarcrepe.py": ["--data", "{data}/sugarcrepe", "--model", "demo"],
    "throughput.py": ["--models", "demo,vit-tiny,mllm", "--mllm-model", "tiny", "--images", "3", "--vit-images", "2", "--conditions", "2", "--repeats", "1",
                      "--encode-repeats", "2", "--encode-seconds", "0", "--precision", "float32",
                      "--contention", "--contention-folder", "{four}", "--contention-policies", "default",
                      "--contention-busy", "0"],
}
# script -> the test file that runs it end to end
COVERED_ELSEWHERE = {"gpu_search.py": "tests/test_ann.py", "colorshape_phrases.py": "tests/test_demo.py"}
# The slowest first, so that two at a time finish together.
ORDER = ("serve_latency.py", "query_latency.py", "throughput.py", "colorshape_words.py", "genecis.py", "colorshape.py")
TIMEOUT_S = 300


def _run(script: str, args: list[str], out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / script), *args, "--json", str(out)], cwd=out.parent,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def smoke_runs(request, tmp_path_factory) -> dict[str, Future]:
    """Start the smoke run of every script selected in this session, two at a time."""
    selected = {item.callspec.params["script"] for item in request.session.items
                if item.originalname == "test_benchmark_smoke_run" and hasattr(item, "callspec")}
    data = tmp_path_factory.mktemp("bench-data")
    write_genecis(data / "genecis")
    write_mmvp(data / "mmvp")
    write_sugarcrepe(data / "sugarcrepe")
    write_celeba(data / "celeba")
    four = tmp_path_factory.mktemp("four")
    for path in sorted(EXAMPLE_IMAGES.glob("*.png"))[:4]:
        (four / path.name).write_bytes(path.read_bytes())
    pool = ThreadPoolExecutor(2)
    runs = {}
    for script in sorted(selected, key=lambda s: (ORDER.index(s) if s in ORDER else len(ORDER), s)):
        args = [a.format(data=data, four=four) for a in SMOKE[script]]
        folder = tmp_path_factory.mktemp(script.removesuffix(".py"))
        runs[script] = pool.submit(_run, script, args, folder / "out.json")
    yield runs
    pool.shutdown(wait=True, cancel_futures=True)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _goals(report: dict) -> None:
    for name, goal in report["goals"].items():
        assert set(goal) >= {"measured", "target", "holds"}, name
        assert _finite(goal["measured"]) and isinstance(goal["holds"], bool), name


def check_ann(r: dict) -> None:
    assert r["n"] == 2000 and r["dim"] == 16
    indexes = {row["index"] for row in r["rows"]}
    assert {"faiss flat", "faiss hnsw", "faiss ivf"} <= indexes, indexes
    assert all(0.0 <= row["recall@10"] <= 1.0 and row["p50_ms"] > 0 for row in r["rows"])
    _goals(r)


def check_paper_benchmark(name: str, keys: set[str]):
    def check(r: dict) -> None:
        assert r["benchmark"] == name and r["model"] == "demo"
        assert keys <= set(r["metrics"]), r["metrics"]
        assert all(0.0 <= v <= 100.0 for v in r["metrics"].values())
        assert r["reference"]
    return check


def check_colorshape(r: dict) -> None:
    assert {"clip", "clip+text", "focallens", "focallens_heldout_synonyms"} <= set(r["results"])
    assert r["items"]["per_condition"] == 2
    for role in ("mllm", "mllm_focal"):  # every tier of each MLLM, or a note that its checkpoint is not installed
        tiers = {f"{role}{t}" for t in ("", "_heldout_phrasing", "_heldout_synonyms", "_heldout_questions")}
        assert (role in r["skipped"]) != (tiers <= set(r["results"])), (role, r["skipped"], list(r["results"]))


def check_words(r: dict) -> None:
    for tower in ("caption-pretrained", "instruction-tuned"):
        assert {"token_states", "text_embedding", "value_words_pairwise_cosine"} <= set(r[tower])
    assert r["instruction_data"]["samples"] == 200


def check_combined(r: dict) -> None:
    assert r["k"] == 3 and r["queries"] == 2
    assert r["rates"] and r["goals"]


def check_memory(r: dict) -> None:
    (row,) = r["rows"]
    assert row["images"] == 6 and row["peak_rss_mib"] > 0
    _goals(r)


def check_mllm_shapes(r: dict) -> None:
    (row,) = r["results"]
    assert row["shape"] == "tiny-llava" and row["prefix_tokens"] > 16  # the image's 16 tokens and the chat's own
    assert all(seconds > 0 for seconds in row["seconds_per_image"].values())


def check_query_latency(r: dict) -> None:
    (stages,) = r["seconds"].values()
    assert {"import cli", "load model", "encode query", "load FAISS + search", "focalsearch query, wall"} <= set(stages)


def check_scale(r: dict) -> None:
    assert "ray" not in r  # --skip-ray
    (row,) = r["faiss"]["sizes"]
    assert row["n"] == 1000 and row["single_node"]["commits"] >= 1
    for mode in ("streamed", "whole"):
        assert row[mode]["peak_rss_mib"] > 0 and 0.0 <= row[mode]["recall_at_10"] <= 1.0
    assert isinstance(r["faiss"]["goal_met"], bool)


def check_serve_latency(r: dict) -> None:
    assert r["images"] == 12 and r["index"]["rows"] == 12
    _goals(r)


def check_throughput(r: dict) -> None:
    assert set(r["results"]) == {"demo", "vit-tiny", "mllm"}
    mllm = r["results"].pop("mllm")
    assert mllm["images"] == 3 and mllm["encode_img_s"] > 0 and mllm["ratio_4_vs_1_reuse"] > 0
    assert set(mllm["seconds"]) == {"reuse, 1", "reuse, 4", "whole, 1", "whole, 4", "processor", "vision tower + projector"}
    assert 0.0 <= mllm["lm_share"] <= 1.0 and mllm["bound"] >= 1.0 and mllm["prefix_tokens"] > max(mllm["own_tokens"].values())
    assert "mllm: prefix reuse, 4 instructions / 1" in r["goals"]
    for model, result in r["results"].items():
        per = result["encode_per_instruction"]
        assert set(per) == {"(plain)", "background", "how many objects are there?"}, model
        assert all(f["img_s"] > 0 and f["passes"] == 2 and f["sequence_tokens"] > result["image_tokens"] for k, f in per.items()
                   if k != "(plain)")
        assert result["index_2"]["max_decodes_per_image"] == 1  # each image decoded once for both instructions
        stages = result["breakdown_2"]["stages_s"]
        assert {"encode (every instruction)", "waiting for decoded images", "commits (write)", "scan"} <= set(stages), stages
        # The steps are timed without overlap, so they cannot add up to more than the run took.
        assert stages["other (the indexer's loop)"] >= -1e-3, stages
        assert result["breakdown_2"]["encode_interleaved_s"] > 0
    assert r["contention"]["policies"]["default"]["quiet_img_s"] > 0
    _goals(r)


def check_mllm_gpu(r: dict) -> None:
    (result,) = r["results"].values()
    assert result["card"] == "cpu" and result["images"] == 4 and result["encode_img_s"] > 0
    assert result["prefix_tokens"] == 2 + 16  # BOS, the user's role token, and the tiny shape's 16 image tokens
    _goals(r)


CHECKS = {
    "ann.py": check_ann,
    "celeba_attribute.py": check_paper_benchmark("celeba-attribute", {"mean", "Red_Channel"}),
    "colorshape.py": check_colorshape,
    "colorshape_words.py": check_words,
    "combined_conditions.py": check_combined,
    "genecis.py": check_paper_benchmark("genecis", {"mean/R@1", "focus_attribute/R@1", "change_object/R@1"}),
    "memory.py": check_memory,
    "mllm_public_shapes.py": check_mllm_shapes,
    "mllm_gpu.py": check_mllm_gpu,
    "mmvp_vlm.py": check_paper_benchmark("mmvp-vlm", {"mean", "Color", "Quantity"}),
    "query_latency.py": check_query_latency,
    "scale.py": check_scale,
    "serve_latency.py": check_serve_latency,
    "sugarcrepe.py": check_paper_benchmark("sugarcrepe", {"mean", "swap_att"}),
    "throughput.py": check_throughput,
}


def test_every_benchmark_script_has_a_smoke_run():
    scripts = {path.name for path in BENCHMARKS.glob("*.py")}
    assert scripts == set(SMOKE) | set(COVERED_ELSEWHERE), "give every script under benchmarks/ a smoke run"
    assert set(CHECKS) == set(SMOKE)
    for script, test_file in COVERED_ELSEWHERE.items():
        assert f"benchmarks/{script}" in (ROOT / test_file).read_text() or f'"{script}"' in (ROOT / test_file).read_text()


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_smoke_run(script: str, smoke_runs: dict[str, Future]):
    done = smoke_runs[script].result()
    assert done.returncode == 0, f"{script} exited {done.returncode}:\n{done.stderr[-3000:]}"
    out = Path(done.args[done.args.index("--json") + 1])
    CHECKS[script](json.loads(out.read_text()))


def test_stage_clock_times_nested_steps_apart_and_restores_them():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from throughput import StageClock
    finally:
        sys.path.remove(str(BENCHMARKS))

    class Steps:
        def run(self):
            self.outer()
            return sum(self.items())

        def outer(self):
            time.sleep(0.05)
            self.inner()

        def inner(self):
            time.sleep(0.3)

        def items(self):
            for n in range(3):
                time.sleep(0.02)
                yield n

    steps, original = Steps(), Steps.outer
    steps.outer()  # outside the clock: nothing is counted
    with StageClock() as clock:
        clock.scope(Steps, "run")
        clock.time_method(Steps, "outer", "outer")
        clock.time_method(Steps, "inner", "inner")
        clock.time_generator(Steps, "items", "waiting")
        steps.outer()  # outside run(): not counted either
        assert steps.run() == 3
    assert Steps.outer is original and Steps.inner.__name__ == "inner"
    assert set(clock.seconds) == {"outer", "inner", "waiting"}
    assert 0.05 <= clock.seconds["outer"] < 0.25  # its own sleep, not inner's 0.3 s
    assert 0.3 <= clock.seconds["inner"] < 0.6  # once: the call outside run() is not counted
    assert 0.06 <= clock.seconds["waiting"] < 0.3


def test_mllm_gpu_refuses_in_one_line_without_cuda(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a machine that has one
    done = subprocess.run([sys.executable, str(BENCHMARKS / "mllm_gpu.py"), "--json", str(tmp_path / "out.json")], env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 2
    assert done.stderr.strip() == ("benchmarks/mllm_gpu.py needs a CUDA GPU (a 7B-shaped model in bf16); use --shape tiny "
                                   "--device cpu for a dry run: no CUDA GPU is available here")
    assert not (tmp_path / "out.json").exists()
