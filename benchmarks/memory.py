"""Peak memory of `focalsearch index` as the collection grows: it must stay flat.

    python benchmarks/memory.py [--sizes 5000,20000] [--model demo] [--json OUT]

For each size it generates that many JPEGs (320x240, distinct content) and runs the command exactly as
a user types it, `focalsearch index FOLDER --instruction color --model M`, in a fresh process, reading
that process's peak resident set size from the kernel (wait4). Goal: the largest size's peak is at
most 1.2 x the smallest's.

What does grow with the collection, by design: one small file record per image while diffing
against the index (path, size, mtime, hash: a few hundred bytes) and the search index itself
(dim x 4 bytes per image and condition), which search needs in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

GOAL_RATIO = 1.2


def make_images(folder: Path, count: int, seed: int = 0) -> None:
    """``count`` distinct small JPEGs in subfolders of 1,000."""
    rng = np.random.default_rng(seed)
    base = np.asarray(Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((320, 240), Image.Resampling.BICUBIC))
    for number in range(count):
        sub = folder / f"{number // 1000:03d}"
        if number % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        pixels = np.roll(base, (number * 7) % 240, axis=0).copy()
        x, y = (number * 13) % 280, (number * 29) % 200
        pixels[y : y + 40, x : x + 40] = ((number * 37) % 256, (number * 91) % 256, (number * 53) % 256)
        Image.fromarray(pixels).save(sub / f"img-{number:06d}.jpg", quality=85)


def _focalsearch_command() -> str:
    """The installed `focalsearch` command of this environment."""
    beside = Path(sys.executable).parent / "focalsearch"
    found = str(beside) if beside.is_file() else shutil.which("focalsearch")
    if not found:
        raise SystemExit("the focalsearch command is not installed; run: pip install -e .")
    return found


def index_peak_rss(folder: Path, index_dir: Path, model: str) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of one `focalsearch index` process."""
    command = [_focalsearch_command(), "index", str(folder), "--instruction", "color",
               "--model", model, "--index", str(index_dir)]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"focalsearch index failed: {process.stderr.read().decode()[-500:]}")
    return usage.ru_maxrss / 1024, seconds  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="5000,20000")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="focalsearch-memory-"))
    try:
        for size in sizes:
            folder = scratch / f"images-{size}"
            started = time.perf_counter()
            make_images(folder, size)
            made = time.perf_counter() - started
            peak, seconds = index_peak_rss(folder, scratch / f"index-{size}", args.model)
            rows.append({"images": size, "peak_rss_mib": peak, "index_s": seconds, "images_per_s": size / seconds})
            print(f"{size:7d} images: peak RSS {peak:7.1f} MiB, indexed in {seconds:6.1f} s "
                  f"({size / seconds:6.1f} img/s; made in {made:.0f} s)", flush=True)
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    ratio = rows[-1]["peak_rss_mib"] / rows[0]["peak_rss_mib"]
    goals = {f"peak RSS {sizes[-1]} / {sizes[0]} images": {"measured": ratio, "target": GOAL_RATIO, "holds": ratio <= GOAL_RATIO}}
    print(f"peak RSS ratio {sizes[-1]} / {sizes[0]}: {ratio:.3f}   goal <= {GOAL_RATIO}: {'holds' if ratio <= GOAL_RATIO else 'MISSES'}")
    if args.json:
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": {"cpus": os.cpu_count(),
                              "platform": platform.platform()}, "model": args.model, "rows": rows, "goals": goals}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
