"""Which arithmetic a server encodes each kind of query in: float32, or the CPU's bf16 autocast.

bf16 autocast pays off on the large batches of indexing (1.9-2.5x a ViT-B/16's encoding rate;
benchmarks/throughput.py), but a query is a batch of one to a few. Every autocast pass first casts
the float32 weights to bf16, a cost that does not shrink with the batch, and oneDNN builds its bf16
kernels for each new shape. So on one CPU bf16 wins for a ViT's 197 image tokens and loses for a
text tower's handful of words; on another it may be the other way round. The server therefore
times both, for each query kind, on one lone query (the case a single user waits for): alternated,
best of a few passes, within a time budget that is a share of the start-up time so far, and keeps
bf16 only where it is clearly faster. Larger batches amortise the cast, so where bf16 wins for one
query it also wins for the batches that concurrent queries share; float32 is never the slower choice
where it is kept.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

QUERY_KINDS = ("text", "image")
# bf16 is kept for a kind only when its best pass takes at most this share of float32's best:
# a clear win, not a coin toss on a noisy machine (float32 is exact, and has no kernels to build).
KEEP_BF16_BELOW = 0.9
# The trial may spend this share of the start-up so far (imports, model, index) ...
BUDGET_SHARE_OF_STARTUP = 0.1
# ... but at least this long (and this long where the process start time is unknown).
MIN_BUDGET_S = 0.5
ROUNDS = 3  # timed passes of each arithmetic per kind, alternated; 2 suffice when the budget is short
PROBE_TEXT = "a small red circle"
PROBE_INSTRUCTION = "color"


@dataclass
class KindTrial:
    """One query kind's trial: best pass of each arithmetic in ms, and the arithmetic chosen."""

    chosen: str
    float32_ms: float | None = None
    bfloat16_ms: float | None = None
    note: str = ""

    def describe(self, kind: str) -> str:
        timed = ""
        if self.float32_ms is not None and self.bfloat16_ms is not None:
            timed = f" (float32 {self.float32_ms:.1f} ms, bf16 {self.bfloat16_ms:.1f} ms)"
        return f"{kind} {self.chosen}{timed}{'; ' + self.note if self.note else ''}"


@dataclass
class QueryArithmetic:
    """The arithmetic of each query kind, as --precision spells it, with how it was chosen."""

    kinds: dict[str, KindTrial] = field(default_factory=dict)
    seconds: float = 0.0
    budget_s: float = 0.0

    def precision(self, kind: str) -> str | None:
        """The precision to encode ``kind`` queries in (None: the encoder's own arithmetic)."""
        trial = self.kinds.get(kind)
        return trial.chosen if trial is not None else None

    def as_dict(self) -> dict:
        return {
            "kinds": {k: {"chosen": t.chosen, "float32_ms": t.float32_ms, "bfloat16_ms": t.bfloat16_ms, "note": t.note}
                      for k, t in self.kinds.items()},
            "trial_s": round(self.seconds, 3), "budget_s": round(self.budget_s, 3),
        }

    def describe(self) -> str:
        return "; ".join(t.describe(k) for k, t in self.kinds.items())


def seconds_since_process_start() -> float | None:
    """How long this process has run (Linux /proc), or None where that cannot be read."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime, in clock ticks since boot
        return float(Path("/proc/uptime").read_text().split()[0]) - started
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def trial_budget() -> float:
    """Seconds the trial may take: a share of the start-up so far, so that it stays a small part of it."""
    so_far = seconds_since_process_start()
    return max(MIN_BUDGET_S, BUDGET_SHARE_OF_STARTUP * so_far) if so_far is not None else MIN_BUDGET_S


def choose_query_arithmetic(encoder, precision: str = "auto", budget_s: float | None = None) -> QueryArithmetic:
    """Time float32 against bf16 autocast on one query of each kind the encoder serves; keep the faster.

    Only ``precision`` "auto" on a CPU encoder whose own arithmetic is bf16 autocast (a CPU with
    bf16) has a choice; otherwise every kind keeps the encoder's arithmetic, untimed. A kind whose
    trial does not fit in the budget stays float32. The passes double as the warm-up of the
    arithmetic chosen, so the first real query does not pay for it.
    """
    from PIL import Image

    from focalsearch.models.encoders import arithmetic_name

    own = arithmetic_name(encoder.autocast_dtype, encoder.dtype)
    kinds = [k for k in QUERY_KINDS if encoder.towers in ("both", "vision" if k == "image" else "text")]
    if precision != "auto":
        return QueryArithmetic({k: KindTrial(own, note=f"--precision {precision}") for k in kinds})
    if encoder.device.type != "cpu" or own != "bfloat16":
        return QueryArithmetic({k: KindTrial(own, note=f"no choice: {own} on {encoder.device.type}") for k in kinds})
    budget = trial_budget() if budget_s is None else budget_s
    started = time.perf_counter()
    deadline = started + budget
    side = encoder.min_decode_side
    probe = Image.new("RGB", (side, side), (200, 40, 40))
    instruction = PROBE_INSTRUCTION if encoder.towers == "both" else ""

    def one_pass(kind: str, precision: str) -> float:
        began = time.perf_counter()
        if kind == "text":
            encoder.encode_texts([PROBE_TEXT], precision=precision)
        else:
            encoder.encode_images([probe], instruction, precision=precision)
        return time.perf_counter() - began

    result = QueryArithmetic(budget_s=budget)
    for kind in kinds:
        first = one_pass(kind, "float32")  # the first pass of a shape pays for allocations: a warm-up
        if time.perf_counter() + first > deadline:
            result.kinds[kind] = KindTrial("float32", note="no time left to try bf16")
            continue
        best = {"float32": one_pass(kind, "float32"), "bfloat16": float("inf")}
        # bf16's first pass (its kernels) and one alternated round: about 5 float32 passes
        if time.perf_counter() + 5 * best["float32"] > deadline:
            result.kinds[kind] = KindTrial("float32", best["float32"] * 1000, note="no time left to try bf16")
            continue
        one_pass(kind, "bfloat16")  # builds bf16 kernels for this shape
        rounds = 0
        while rounds < ROUNDS:
            order = ("bfloat16", "float32") if rounds % 2 == 0 else ("float32", "bfloat16")
            for precision in order:
                best[precision] = min(best[precision], one_pass(kind, precision))
            rounds += 1
            if time.perf_counter() + 1.5 * sum(best.values()) > deadline:
                break
        faster = best["bfloat16"] <= KEEP_BF16_BELOW * best["float32"]
        result.kinds[kind] = KindTrial("bfloat16" if faster else "float32", best["float32"] * 1000, best["bfloat16"] * 1000,
                                       note=f"{rounds} alternated rounds")
    result.seconds = time.perf_counter() - started
    return result
