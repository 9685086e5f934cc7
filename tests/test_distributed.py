"""Data-parallel training: 2 gloo processes on the CPU, started by torchrun as a user would."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from safetensors.torch import load_file

from focalsearch.train.data import ColorShapeSource
from focalsearch.train.loop import RESUME_DIR, TrainOptions, train

COMMON = ["--data", "colorshape", "--steps", "20", "--batch-size", "32", "--warmup", "3", "--resolution", "32", "--device", "cpu"]


def run_train(*args: object) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "focalsearch.cli", "train", *map(str, args)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result


def losses(folder: Path) -> tuple[list[float], int]:
    log = json.loads((folder / "training_log.json").read_text())
    return log["losses"], log["processes"]


def test_two_processes_follow_one_process_step_for_step(tiny_clip, tmp_path):
    """Same seed and global batch: the gathered negatives make the 2-process loss the 1-process loss."""
    terms = ["--lr", "2e-3", "--image-weight", "0.5", "--caption-weight", "0.5"]  # every gathered term
    run_train("--base", tiny_clip, *COMMON, *terms, "--out", tmp_path / "one")
    run_train("--base", tiny_clip, *COMMON, *terms, "--out", tmp_path / "two", "--nproc", "2")
    one, processes_one = losses(tmp_path / "one")
    two, processes_two = losses(tmp_path / "two")
    assert (processes_one, processes_two) == (1, 2)
    assert two[0] == pytest.approx(one[0], abs=1e-4)  # the first step: same batch, same weights
    assert two == pytest.approx(one, abs=2e-3)  # and the same updates after it
    weights_one, weights_two = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    assert max(float((weights_one[k] - weights_two[k]).abs().max()) for k in weights_one) < 1e-3


def test_two_processes_lower_the_loss_through_torchrun(tiny_clip, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "focalsearch.train",
         "--base", str(tiny_clip), *COMMON, "--objective", "caption", "--lr", "2e-3", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("trained 20 steps") == 1  # rank 0 reports for both
    curve, processes = losses(tmp_path / "out")
    assert processes == 2 and len(curve) == 20
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.1


def test_a_batch_that_does_not_divide_among_processes_is_one_line(tiny_clip, tmp_path):
    result = subprocess.run([sys.executable, "-m", "focalsearch.cli", "train", "--base", str(tiny_clip), "--data", "colorshape",
                             "--batch-size", "15", "--nproc", "2", "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: --batch-size 15 (the global batch) must divide among 2 processes"]


class _StopAt:
    """A source that fails at one step, as a killed run would stop."""

    def __init__(self, source, step: int):
        self.source, self.step = source, step

    def batch(self, step: int, size: int):
        if step == self.step:
            raise KeyboardInterrupt
        return self.source.batch(step, size)


def _rank(rank: int, port: int, base: str, out: str, stop_at: int | None) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)
    options = TrainOptions(steps=8, batch_size=8, lr=1e-3, warmup=2, save_every=3, device="cpu", caption_weight=0.5)
    source = ColorShapeSource("instruction", resolution=32, seed=0, with_captions=True)
    try:
        train(base, out, source if stop_at is None else _StopAt(source, stop_at), options, progress=False)
    except KeyboardInterrupt:
        pass


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _two_ranks(base: Path, out: Path, stop_at: int | None = None) -> None:
    mp.start_processes(_rank, args=(_free_port(), str(base), str(out), stop_at), nprocs=2, join=True, start_method="spawn")


def test_rank_0_saves_and_an_interrupted_two_process_run_resumes_to_the_same_weights(tiny_clip, tmp_path):
    _two_ranks(tiny_clip, tmp_path / "whole")
    _two_ranks(tiny_clip, tmp_path / "split", stop_at=7)
    saved = json.loads((tmp_path / "split" / RESUME_DIR / "training_state.json").read_text())
    assert saved["step"] == 6 and not (tmp_path / "split" / "model.safetensors").exists()
    _two_ranks(tiny_clip, tmp_path / "split")
    whole, split = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(tmp_path / "split" / "model.safetensors"))
    assert max(float((whole[k] - split[k]).abs().max()) for k in whole) < 1e-5
    assert losses(tmp_path / "whole")[0] == pytest.approx(losses(tmp_path / "split")[0], abs=1e-5)
