"""Warm query latency of `focalsearch serve` over HTTP against the cold `focalsearch query`, in one run.

    python benchmarks/serve_latency.py [--images 10000] [--model demo|vit-b16|PATH] [--index DIR] [--images-dir DIR]
                                       [--requests 200] [--warmup 20] [--concurrency 1,8] [--precisions auto,float32]
                                       [--rounds 1] [--cold-repeats 3] [--port P] [--json OUT]

(1) The collection: `focalsearch synth colorshape --n IMAGES --seed 0` (64 px ColorShape PNGs, deterministic)
    indexed with `focalsearch index IMAGES/images -i color -i shape --model MODEL` (default demo; vit-b16 is a
    FocalLens-CLIP of CLIP ViT-B/16's shape with random weights, benchmarks/throughput.py's, built once into
    --model-dir, beside --index as DIR-vit-b16, or in the temporary folder). With --index DIR, an
    index already there (holding both instructions) is reused as it is; otherwise it is built there and
    kept, its images beside it in DIR-images (or --images-dir). Without --index, both live in a
    temporary folder that is removed at the end.
(2) `focalsearch serve --index DIR --host 127.0.0.1 --port P --precision PRECISION` as a subprocess on a free
    loopback port: its start-up time is from process start until GET /healthz answers 200 (imports, model
    load). With `auto` the server then times float32 against bf16 autocast for each query kind between
    queries; the cells wait until /healthz says that trial is over, and print what it chose.
    Steps (2)-(3) run once per --precisions entry (default: the default, auto, beside float32) and per
    --rounds, the order of the precisions alternating between rounds, after one untimed start that warms
    the file caches; each figure is the best of the rounds (start-up: the shortest; a cell: the round
    with the lowest p50), and the precisions are printed side by side with their ratios. The servers'
    logs are searched for transformers notices.
(3) Over HTTP (httpx, one keep-alive client per client thread), for three query kinds:
      text      POST /api/search {"text": ..., "instruction": ..., "k": 10}
      image_id  POST /api/search {"image_id": ..., "instruction": ..., "k": 10} (ids from a first search)
      upload    POST /api/search multipart: a 64 px PNG of the collection (fetched once from GET /api/images/ID)
                in "image", plus "instruction" and "k"
    each at every --concurrency (client threads sharing a fixed --requests per cell): --warmup requests
    first, untimed, then the latency of each request (p50, p90, p99, mean) and the cell's throughput
    (requests / wall time of the cell). Queries rotate over colours and shapes under "color" and
    "shape", so that no cell asks one question over and over. The first request of each kind after
    start-up is recorded too: the very first (a text search, k=50, which loads the "color" search index),
    then one of each kind. Every answer must be a 200 with results.
(4) The cold CLI query in the same run, after the server is stopped: `focalsearch query --text red -i color
    --index DIR` as a fresh process, wall time, median of --cold-repeats.
The client runs on the same machine as the server and shares its cores; all traffic is to 127.0.0.1.

Goals (printed beside each measurement, and under "goals" in --json):
- warm text and image_id p50 <= 30 ms, and upload p50 <= 60 ms, at concurrency 1;
- text throughput at concurrency 8 >= 3 x that at concurrency 1 (queries share batched forward passes);
- warm text p50 at concurrency 1 >= 100 x faster than the cold CLI query's wall time;
- (with float32 beside auto) the default starts within 1.2 x float32's start-up, and every warm p50 of the
  default is within 1.05 x float32's (the 5 % is the noise between two servers running the same
  arithmetic: auto keeps bf16 for a kind only where it timed >= 10 % faster);
- no transformers notice (e.g. its CLIPImageProcessorPil fallback) in any server's log.
The goals of the first three lines read the first --precisions entry (auto by default).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

INSTRUCTIONS = ("color", "shape")
# (text, instruction) pairs the text queries rotate over
TEXTS = (("red", "color"), ("circle", "shape"), ("blue", "color"), ("square", "shape"), ("green", "color"),
         ("triangle", "shape"), ("yellow", "color"), ("star", "shape"), ("purple", "color"), ("cross", "shape"),
         ("orange", "color"))
KINDS = ("text", "image_id", "upload")
K = 10
GOAL_P50_MS = {"text": 30.0, "image_id": 30.0, "upload": 60.0}
GOAL_SCALING = 3.0
GOAL_COLD_OVER_WARM = 100.0
GOAL_STARTUP_RATIO = 1.2  # the default's start-up over float32's
GOAL_WARM_RATIO = 1.05  # the default's warm p50 over float32's (see the docstring: noise of identical arithmetic)
NOTICES = ("[transformers]", "CLIPImageProcessorPil", "requires torchvision")
PRECISIONS = ("auto", "float32", "bfloat16")
COLD_COMMAND_TEXT = "red"


def focalsearch_command() -> list[str]:
    """The `focalsearch` console script of this interpreter's environment, or its entry point run by this interpreter."""
    script = shutil.which("focalsearch", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-c", "from focalsearch.cli import main; main()"]


def run_cli(arguments: list[str], timeout: float) -> subprocess.CompletedProcess:
    done = subprocess.run([*focalsearch_command(), *arguments], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RuntimeError(f"focalsearch {' '.join(arguments)} exited with {done.returncode}:\n{done.stderr[-2000:]}")
    return done


def index_conditions(index: Path) -> dict[str, int]:
    """instruction -> rows of an existing index (empty when the folder holds none)."""
    done = subprocess.run([*focalsearch_command(), "conditions", "--index", str(index), "--json"], capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        return {}
    return {c["instruction"]: c["rows"] or 0 for c in json.loads(done.stdout.strip().splitlines()[-1])["conditions"]}


def prepare_model(args, scratch: Path | None) -> str:
    """The --model to index with: demo or a path as given; vit-b16 built (once) from benchmarks/throughput.py."""
    if args.model != "vit-b16":
        return args.model
    if args.model_dir is not None:
        folder = args.model_dir
    elif args.index is not None:
        folder = args.index.parent / f"{args.index.name}-vit-b16"
    else:
        folder = scratch / "vit-b16"
    if not (folder / "config.json").is_file():
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from throughput import vit_checkpoint

        started = time.perf_counter()
        vit_checkpoint("vit-b16", folder)
        print(f"built a random ViT-B/16 FocalLens-CLIP in {folder} ({time.perf_counter() - started:.1f} s)", flush=True)
    return str(folder)


def prepare_index(args, scratch: Path | None) -> dict:
    """Reuse the index at --index, or synthesize the collection and index it; returns what was done."""
    index = args.index if args.index is not None else scratch / "index"
    found = index_conditions(index) if index.exists() else {}
    if found:
        missing = [i for i in INSTRUCTIONS if found.get(i, 0) < 1]
        if missing:
            raise SystemExit(f"{index} is an index without rows under {', '.join(map(repr, missing))}; "
                             f"give an empty or new --index to build one")
        rows = min(found[i] for i in INSTRUCTIONS)
        note = "" if rows == args.images else f" (not --images {args.images})"
        print(f"reusing the index at {index}: {rows} rows under each of {', '.join(INSTRUCTIONS)}{note}", flush=True)
        return {"index": str(index), "reused": True, "rows": rows, "conditions": found}
    if index.exists() and any(index.iterdir()):
        raise SystemExit(f"{index} exists, is not empty and holds no index; give an empty or new --index")
    if args.images_dir is not None:
        collection = args.images_dir
    elif args.index is not None:
        collection = index.parent / f"{index.name}-images"
    else:
        collection = scratch / "collection"
    folder = collection / "images"
    existing = sorted(folder.glob("*.png")) if folder.is_dir() else []
    started = time.perf_counter()
    if len(existing) != args.images:
        if existing:
            raise SystemExit(f"{folder} holds {len(existing)} PNGs, not {args.images}; give another --images-dir")
        run_cli(["synth", "colorshape", str(collection), "--n", str(args.images), "--seed", str(args.seed)], timeout=3600)
    synth_s = time.perf_counter() - started
    print(f"{'made' if not existing else 'reusing'} {args.images} ColorShape PNGs in {folder} ({synth_s:.1f} s)", flush=True)
    started = time.perf_counter()
    command = ["index", str(folder), "--model", args.model_location, "--index", str(index), "--json"]
    for instruction in INSTRUCTIONS:
        command += ["-i", instruction]
    report = json.loads(run_cli(command, timeout=4 * 3600).stdout.strip().splitlines()[-1])
    index_s = time.perf_counter() - started
    if report["skipped"] or report["encoded"] != args.images:
        raise RuntimeError(f"indexed {report['encoded']} of {args.images} images, skipped {len(report['skipped'])}")
    print(f"indexed {report['encoded']} images under {', '.join(INSTRUCTIONS)} with --model {args.model} in {index_s:.1f} s "
          f"({report['images_per_second']:.1f} img/s)", flush=True)
    return {"index": str(index), "reused": False, "rows": report["encoded"], "images_dir": str(folder),
            "synth_s": synth_s, "index_s": index_s, "index_images_per_s": report["images_per_second"]}


# /healthz shows its batching counters only to token holders, so the server runs with a token
# (as a server beside a browser should) and every request carries it.
TOKEN = secrets.token_urlsafe(16)
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(index: str, port: int, log, timeout: float, workers: int = 1,
                 precision: str = "auto") -> tuple[subprocess.Popen, float]:
    """Start `focalsearch serve` and wait until /healthz answers 200; returns the process and its start-up seconds."""
    started = time.perf_counter()
    process = subprocess.Popen([*focalsearch_command(), "serve", "--index", index, "--host", "127.0.0.1", "--port", str(port),
                                "--workers", str(workers), "--precision", precision],
                               stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "FOCALSEARCH_TOKEN": TOKEN})
    url = f"http://127.0.0.1:{port}/healthz"
    with httpx.Client(timeout=2.0, headers=AUTH) as client:
        while time.perf_counter() - started < timeout:
            if process.poll() is not None:
                raise RuntimeError(f"focalsearch serve exited with {process.returncode} before answering /healthz")
            try:
                if client.get(url).status_code == 200:
                    return process, time.perf_counter() - started
            except httpx.TransportError:
                pass
            time.sleep(0.01)
    raise RuntimeError(f"focalsearch serve did not answer /healthz within {timeout:.0f} s")


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


class Queries:
    """The requests of each kind, rotating over their payloads; built from a first search."""

    def __init__(self, base: str, client: httpx.Client, uploads: int):
        self.base = base
        started = time.perf_counter()
        hits = self.check(client.post(f"{base}/api/search", json={"text": "red", "instruction": "color", "k": 50}))["results"]
        self.first_search_ms = (time.perf_counter() - started) * 1000  # the first query after start-up
        ids = [hit["image_id"] for hit in hits]
        shape_hits = self.check(client.post(f"{base}/api/search", json={"text": "star", "instruction": "shape", "k": 50}))["results"]
        ids += [hit["image_id"] for hit in shape_hits if hit["image_id"] not in ids]
        self.image_ids = ids[:32]
        self.pngs: list[tuple[str, bytes]] = []
        for hit in (hits[: uploads // 2] + shape_hits[: uploads - uploads // 2]):
            response = client.get(f"{base}{hit['image']}")
            response.raise_for_status()
            self.pngs.append((hit["name"], response.content))

    @staticmethod
    def check(response: httpx.Response) -> dict:
        if response.status_code != 200:
            raise RuntimeError(f"POST /api/search answered {response.status_code}: {response.text[:500]}")
        body = response.json()
        if not body.get("results"):
            raise RuntimeError(f"POST /api/search answered no results: {response.text[:500]}")
        return body

    def send(self, client: httpx.Client, kind: str, number: int) -> None:
        url = f"{self.base}/api/search"
        instruction = INSTRUCTIONS[number % len(INSTRUCTIONS)]
        if kind == "text":
            text, instruction = TEXTS[number % len(TEXTS)]
            response = client.post(url, json={"text": text, "instruction": instruction, "k": K})
        elif kind == "image_id":
            image_id = self.image_ids[(number // len(INSTRUCTIONS)) % len(self.image_ids)]
            response = client.post(url, json={"image_id": image_id, "instruction": instruction, "k": K})
        else:
            name, data = self.pngs[(number // len(INSTRUCTIONS)) % len(self.pngs)]
            response = client.post(url, files={"image": (name, data, "image/png")}, data={"instruction": instruction, "k": str(K)})
        self.check(response)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of a process and its live children (server workers), all threads (Linux /proc)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry.name) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def run_cell(queries: Queries, kind: str, concurrency: int, requests: int, warmup: int, timeout: float, server_pid: int) -> dict:
    """``warmup`` then ``requests`` requests of one kind from ``concurrency`` client threads; latencies,
    throughput, and the CPU time the server and this client process spent per query (both share the cores)."""
    numbers = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []

    def worker(total: int, record: bool) -> None:
        with httpx.Client(timeout=timeout, headers=AUTH) as client:
            while True:
                with lock:
                    number = next(numbers)
                if number >= total:
                    return
                started = time.perf_counter()
                queries.send(client, kind, number)
                elapsed = time.perf_counter() - started
                if record:
                    with lock:
                        latencies.append(elapsed)

    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker, warmup, False) for _ in range(concurrency)]:
            future.result()
        numbers = itertools.count()
        passes = httpx.get(f"{queries.base}/healthz", timeout=timeout, headers=AUTH).json()
        server_cpu, client_cpu = process_cpu_seconds(server_pid), time.process_time()
        started = time.perf_counter()
        for future in [pool.submit(worker, requests, True) for _ in range(concurrency)]:
            future.result()
        wall = time.perf_counter() - started
        server_cpu, client_cpu = process_cpu_seconds(server_pid) - server_cpu, time.process_time() - client_cpu
        after = httpx.get(f"{queries.base}/healthz", timeout=timeout, headers=AUTH).json()
    encoded = after["queries_encoded"] - passes["queries_encoded"]
    forward_passes = after["forward_passes"] - passes["forward_passes"]
    ms = np.array(latencies) * 1000
    return {"kind": kind, "concurrency": concurrency, "requests": len(latencies), "warmup": warmup,
            "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "max_ms": float(ms.max()),
            "wall_s": wall, "queries_per_s": len(latencies) / wall,
            "server_cpu_ms_per_query": server_cpu * 1000 / len(latencies), "client_cpu_ms_per_query": client_cpu * 1000 / len(latencies),
            "encodings_per_forward_pass": encoded / forward_passes if forward_passes else None}


def first_requests(queries: Queries, timeout: float) -> dict[str, float]:
    """Milliseconds of one request of each kind (the first of its kind after start-up, bar the set-up searches)."""
    out = {}
    with httpx.Client(timeout=timeout, headers=AUTH) as client:
        for kind in KINDS:
            started = time.perf_counter()
            queries.send(client, kind, 0)
            out[kind] = (time.perf_counter() - started) * 1000
    return out


def cold_query(index: str, repeats: int, timeout: float) -> dict:
    walls = []
    for _ in range(repeats):
        started = time.perf_counter()
        done = run_cli(["query", "--text", COLD_COMMAND_TEXT, "-i", "color", "--index", index], timeout=timeout)
        walls.append(time.perf_counter() - started)
        if len(done.stdout.strip().splitlines()) < 2:
            raise RuntimeError(f"focalsearch query printed no results:\n{done.stdout[-1000:]}")
    return {"command": f"focalsearch query --text {COLD_COMMAND_TEXT} -i color --index {index}", "repeats": repeats,
            "walls_s": walls, "median_s": statistics.median(walls)}


def serve_round(index: str, precision: str, label: str, args, log_path: Path, concurrencies: list[int]) -> dict:
    """Start a server in ``precision``, measure start-up, first requests and every cell, stop it; its log is kept in the result."""
    port = args.port or free_port()
    base = f"http://127.0.0.1:{port}"
    process = None
    with open(log_path, "wb") as log:
        try:
            process, startup_s = start_server(index, port, log, args.startup_timeout, args.workers, precision)
            started = time.perf_counter()
            print(f"[{label}] server start-up (process start to /healthz 200): {startup_s:.2f} s, on {base}", flush=True)
            with httpx.Client(timeout=args.request_timeout, headers=AUTH) as client:
                queries = Queries(base, client, args.uploads)
            first = first_requests(queries, args.request_timeout)
            print(f"[{label}] first search after start-up: {queries.first_search_ms:.1f} ms; then the first of each kind: "
                  + ", ".join(f"{k} {v:.1f} ms" for k, v in first.items()), flush=True)
            arithmetic = settled_arithmetic(base, args.request_timeout)
            chosen = ", ".join(f"{kind} {trial['chosen']}" + (f" (trial: float32 {trial['float32_ms']:.1f} ms, bf16 {trial['bfloat16_ms']:.1f} ms)"
                                                               if trial.get("bfloat16_ms") is not None else f" ({trial['note']})")
                               for kind, trial in arithmetic.get("kinds", {}).items())
            print(f"[{label}] query arithmetic, settled {time.perf_counter() - started:.1f} s after start-up at the latest: "
                  f"{chosen or 'not reported'}", flush=True)
            cells = []
            for kind in KINDS:
                for concurrency in concurrencies:
                    cell = run_cell(queries, kind, concurrency, args.requests, args.warmup, args.request_timeout, process.pid)
                    cells.append(cell)
                    print(f"[{label}] {kind:>8} x{concurrency:<3} p50 {cell['p50_ms']:7.1f} ms  p99 {cell['p99_ms']:7.1f} ms  "
                          f"{cell['queries_per_s']:7.1f} q/s", flush=True)
        finally:
            if process is not None:
                stop_server(process)
    server_log = log_path.read_text(errors="replace")
    notices = [line for line in server_log.splitlines() if any(n in line for n in NOTICES)]
    return {"precision": precision, "startup_s": startup_s, "query_arithmetic": arithmetic, "first_search_ms": queries.first_search_ms,
            "first_request_ms": first, "cells": cells, "upload_png_bytes_mean": statistics.mean(len(d) for _, d in queries.pngs),
            "log_notices": notices}


def prime_caches(index: str, args, log_path: Path) -> None:
    """One server start and stop, untimed, so that no measured start pays for cold file caches (modules, model, index)."""
    port = args.port or free_port()
    with open(log_path, "wb") as log:
        process, seconds = start_server(index, port, log, args.startup_timeout, args.workers, "float32")
        stop_server(process)
    print(f"an untimed first start-up, for warm file caches: {seconds:.2f} s", flush=True)


def settled_arithmetic(base: str, timeout: float) -> dict:
    """The server's query arithmetic from /healthz, once its trial is over (auto times it between queries)."""
    deadline = time.perf_counter() + 300
    while True:
        arithmetic = httpx.get(f"{base}/healthz", timeout=timeout, headers=AUTH).json().get("query_arithmetic") or {}
        if arithmetic.get("settled", True) or time.perf_counter() > deadline:
            return arithmetic
        time.sleep(0.1)


def best_of_rounds(rounds: list[dict]) -> dict:
    """One precision's best over rounds: the shortest start-up, and per cell the round with the lowest p50."""
    best = dict(min(rounds, key=lambda r: r["startup_s"]))
    best["startup_s_rounds"] = [r["startup_s"] for r in rounds]
    best["cells"] = [min((r["cells"][i] for r in rounds), key=lambda c: c["p50_ms"]) for i in range(len(rounds[0]["cells"]))]
    for i, cell in enumerate(best["cells"]):
        cell["p50_ms_rounds"] = [r["cells"][i]["p50_ms"] for r in rounds]
    best["log_notices"] = [line for r in rounds for line in r["log_notices"]]
    return best


def goal(measured: float, target: float, holds: bool) -> dict:
    return {"measured": measured, "target": target, "holds": holds}


def compare_precisions(results: dict[str, dict], precisions: list[str], rounds: int, goals: dict) -> None:
    """Print the first precision beside each other (start-up and every warm p50, best of the rounds) with ratios;
    against float32, add the goals: start-up within GOAL_STARTUP_RATIO, every p50 within GOAL_WARM_RATIO."""
    first = precisions[0]
    for other in precisions[1:]:
        a, b = results[first], results[other]
        print(f"\n--precision {first} beside --precision {other}, best of {rounds} alternated round(s) each "
              f"(ratio = {first} / {other}; below 1 is {first} faster)")
        print(f"{'':>22} | {first:>9} | {other:>9} | {'ratio':>6}")
        startup_ratio = a["startup_s"] / b["startup_s"]
        print(f"{'start-up s':>22} | {a['startup_s']:9.2f} | {b['startup_s']:9.2f} | {startup_ratio:6.2f}")
        ratios = {}
        for ca, cb in zip(a["cells"], b["cells"]):
            name = f"{ca['kind']} x{ca['concurrency']} p50 ms"
            ratios[name] = ca["p50_ms"] / cb["p50_ms"]
            print(f"{name:>22} | {ca['p50_ms']:9.1f} | {cb['p50_ms']:9.1f} | {ratios[name]:6.2f}")
        for label, result in ((first, a), (other, b)):
            kinds = (result["query_arithmetic"] or {}).get("kinds", {})
            print(f"{label}: queries encoded in " + (", ".join(f"{k} {t['chosen']}" for k, t in kinds.items()) or "(not reported)"))
        if other == "float32" and first == "auto":
            goals["auto start-up / float32 start-up"] = goal(startup_ratio, GOAL_STARTUP_RATIO, startup_ratio <= GOAL_STARTUP_RATIO)
            worst = max(ratios, key=ratios.get)
            goals[f"auto warm p50 / float32 warm p50, the worst cell ({worst.removesuffix(' p50 ms')})"] = goal(
                ratios[worst], GOAL_WARM_RATIO, ratios[worst] <= GOAL_WARM_RATIO)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10000, help="ColorShape images to generate and index")
    parser.add_argument("--index", type=Path, default=None,
                        help="index folder: reused when it holds color and shape, else built there and kept")
    parser.add_argument("--images-dir", type=Path, default=None,
                        help="where the generated collection goes (default: beside --index as DIR-images, else a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="demo", help="demo, vit-b16 (random weights, ViT-B/16's shape) or a checkpoint folder")
    parser.add_argument("--model-dir", type=Path, default=None, help="where --model vit-b16 is built (kept; reused when there)")
    parser.add_argument("--precisions", default="auto,float32",
                        help="comma-separated serve --precision values, each measured in turn; the first is the one the goals read")
    parser.add_argument("--rounds", type=int, default=1, help="rounds over --precisions, order alternating; figures are the best round")
    parser.add_argument("--requests", type=int, default=200, help="timed requests per (kind, concurrency) cell")
    parser.add_argument("--warmup", type=int, default=20, help="untimed requests before each cell")
    parser.add_argument("--concurrency", default="1,8", help="comma-separated client thread counts")
    parser.add_argument("--uploads", type=int, default=8, help="distinct PNGs the upload queries rotate over")
    parser.add_argument("--cold-repeats", type=int, default=3)
    parser.add_argument("--port", type=int, default=None, help="loopback port for the server (default: a free one)")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--request-timeout", type=float, default=60.0)
    parser.add_argument("--cold-timeout", type=float, default=300.0, help="seconds one cold CLI query may take")
    parser.add_argument("--workers", type=int, default=1, help="server processes (serve --workers); per-pass counts then read one worker")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    concurrencies = sorted({int(c) for c in args.concurrency.split(",")})
    precisions = list(dict.fromkeys(p.strip() for p in args.precisions.split(",") if p.strip()))
    if args.images < 1 or args.requests < 1 or args.warmup < 0 or args.cold_repeats < 1 or min(concurrencies) < 1 or args.rounds < 1:
        raise SystemExit("--images, --requests, --cold-repeats, --rounds and every --concurrency must be at least 1")
    if not precisions or any(p not in PRECISIONS for p in precisions):
        raise SystemExit(f"--precisions takes a comma-separated list of {', '.join(PRECISIONS)}")

    scratch = Path(tempfile.mkdtemp(prefix="focalsearch-serve-latency-")) if args.index is None else None
    log_path = Path(tempfile.mkstemp(prefix="focalsearch-serve-", suffix=".log")[1])
    try:
        args.model_location = prepare_model(args, scratch)
        built = prepare_index(args, scratch)
        index = built["index"]
        rounds: dict[str, list[dict]] = {p: [] for p in precisions}
        prime_caches(index, args, log_path)
        for number in range(args.rounds):
            for precision in (precisions if number % 2 == 0 else precisions[::-1]):  # alternated, so drift hits both alike
                label = f"{precision}, round {number + 1}/{args.rounds}"
                rounds[precision].append(serve_round(index, precision, label, args, log_path, concurrencies))
        print(f"cold CLI query, {args.cold_repeats} fresh processes ...", flush=True)
        cold = cold_query(index, args.cold_repeats, args.cold_timeout)
    except BaseException:
        if log_path.exists() and log_path.stat().st_size:
            sys.stderr.write("--- server log (tail) ---\n" + log_path.read_text(errors="replace")[-3000:] + "\n")
        raise
    finally:
        log_path.unlink(missing_ok=True)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)

    results = {p: best_of_rounds(r) for p, r in rounds.items()}
    main_result = results[precisions[0]]  # the goals below read the first precision (auto by default)
    cells, startup_s, upload_bytes = main_result["cells"], main_result["startup_s"], main_result["upload_png_bytes_mean"]

    if args.workers > 1:  # /healthz answers from one worker at a time: its counters say nothing of the others
        for c in cells:
            c["encodings_per_forward_pass"] = None
    print(f"\nserve latency, --precision {precisions[0]} (best of {args.rounds} round(s)), model {args.model}, {built['rows']} images x {len(INSTRUCTIONS)} instructions, k={K}, "
          f"{args.requests} requests per cell after {args.warmup} warm-up (upload PNG {upload_bytes / 1024:.1f} KiB)")
    print(f"{'kind':>8} | {'conc':>4} | {'p50 ms':>7} | {'p90 ms':>7} | {'p99 ms':>7} | {'mean ms':>7} | {'q/s':>7} | "
          f"{'server CPU ms/q':>15} | {'client CPU ms/q':>15} | {'per pass':>8}")
    for c in cells:
        print(f"{c['kind']:>8} | {c['concurrency']:>4} | {c['p50_ms']:7.1f} | {c['p90_ms']:7.1f} | {c['p99_ms']:7.1f} | "
              f"{c['mean_ms']:7.1f} | {c['queries_per_s']:7.1f} | {c['server_cpu_ms_per_query']:15.2f} | {c['client_cpu_ms_per_query']:15.2f} | "
              + (f"{c['encodings_per_forward_pass']:8.2f}" if c["encodings_per_forward_pass"] else f"{'-':>8}"))
    print(f"server start-up: {startup_s:.2f} s; cold CLI query: {cold['median_s']:.2f} s (median of {cold['repeats']}: "
          + ", ".join(f"{w:.2f}" for w in cold["walls_s"]) + ")")

    cell = {(c["kind"], c["concurrency"]): c for c in cells}
    low, high = min(concurrencies), max(concurrencies)
    goals = {}
    if low == 1:
        for kind in KINDS:
            p50 = cell[(kind, 1)]["p50_ms"]
            goals[f"warm {kind} p50 at concurrency 1 (ms)"] = goal(p50, GOAL_P50_MS[kind], p50 <= GOAL_P50_MS[kind])
        if 8 in concurrencies:
            scaling = cell[("text", 8)]["queries_per_s"] / cell[("text", 1)]["queries_per_s"]
            goals["text throughput at concurrency 8 / at concurrency 1"] = goal(scaling, GOAL_SCALING, scaling >= GOAL_SCALING)
            # Where the CPU went at concurrency 8: the clients run on the same cores as the server.
            busy = cell[("text", 8)]
            cores = len(os.sched_getaffinity(0))
            server_cores = busy["server_cpu_ms_per_query"] * busy["queries_per_s"] / 1000
            client_cores = busy["client_cpu_ms_per_query"] * busy["queries_per_s"] / 1000
            per_query = busy["server_cpu_ms_per_query"] + busy["client_cpu_ms_per_query"]
            print(f"\ntext at concurrency 8: {busy['queries_per_s']:.0f} q/s x {busy['server_cpu_ms_per_query']:.2f} ms of server CPU "
                  f"= {server_cores:.2f} cores busy in the server, x {busy['client_cpu_ms_per_query']:.2f} ms of client CPU = "
                  f"{client_cores:.2f} cores in the clients, of {cores}. With clients and server sharing the cores, the most "
                  f"this CPU allows is {cores} x 1000 / {per_query:.2f} = {cores * 1000 / per_query:.0f} q/s, "
                  f"{cores * 1000 / per_query / cell[('text', 1)]['queries_per_s']:.2f} x the concurrency-1 rate.")
            if args.workers == 1:
                print(f"One server process runs its per-request Python mostly one thread at a time (the GIL): about "
                      f"1000 / {busy['server_cpu_ms_per_query']:.2f} = {1000 / busy['server_cpu_ms_per_query']:.0f} q/s; --workers 2 lifts that.")
            goals["text at concurrency 8 / the CPU bound at concurrency 8 (clients and server sharing the cores)"] = goal(
                busy["queries_per_s"] * per_query / (cores * 1000), 0.85, busy["queries_per_s"] * per_query / (cores * 1000) >= 0.85)
        speedup = cold["median_s"] * 1000 / cell[("text", 1)]["p50_ms"]
        goals["cold CLI query wall / warm text p50 at concurrency 1"] = goal(speedup, GOAL_COLD_OVER_WARM, speedup >= GOAL_COLD_OVER_WARM)
    else:
        print(f"(goals need concurrency 1 and 8 in --concurrency; got {low}..{high})")
    if len(precisions) > 1:
        compare_precisions(results, precisions, args.rounds, goals)
    notices = [line for r in results.values() for line in r["log_notices"]]
    goals["transformers notices in the server logs (lines)"] = goal(len(notices), 0, not notices)
    for line in dict.fromkeys(notices):
        print(f"server log: {line}")
    print("\ngoals:")
    for name, g in goals.items():
        print(f"  {'holds ' if g['holds'] else 'MISSES'} {name}: {g['measured']:.3f} (target {g['target']})")
    if args.json:
        payload = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": {"cpus": os.cpu_count(), "cores_in_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                        "platform": platform.platform(), "python": sys.version.split()[0],
                        "focalsearch_threads": os.environ.get("FOCALSEARCH_THREADS")},
            "model": args.model, "model_location": args.model_location, "instructions": list(INSTRUCTIONS), "k": K,
            "images": built["rows"], "index": built,
            "requests_per_cell": args.requests, "warmup_per_cell": args.warmup, "concurrency": concurrencies,
            "precision": precisions[0], "rounds": args.rounds,
            "upload_png_bytes_mean": upload_bytes, "server_startup_s": startup_s, "first_search_ms": main_result["first_search_ms"],
            "first_request_ms": main_result["first_request_ms"], "query_arithmetic": main_result["query_arithmetic"],
            "cells": cells, "cold_cli": cold, "goals": goals,
            "precisions": {p: {"best": results[p], "rounds": rounds[p]} for p in precisions},
        }
        args.json.write_text(json.dumps(payload, indent=2, default=float))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
