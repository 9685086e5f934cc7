"""Which arithmetic a server encodes each kind of query in: float32, or the CPU's bf16 autocast.

bf16 autocast pays off on the large batches of indexing (1.9-2.5x a ViT-B/16's encoding rate;
benchmarks/throughput.py), but a query is a batch of one to a few. Every autocast pass first casts
the float32 weights to bf16, a cost that does not shrink with the batch, and oneDNN builds its bf16
kernels for each new shape. So on one CPU bf16 may win for a ViT's 197 image tokens and lose for a
text tower's handful of words, and on another the other way round: it has to be measured.

With ``--precision auto`` a server therefore starts in float32 (so it starts as fast as with
``--precision float32``) and times both arithmetics on one lone query of each kind (the case a single
user waits for), a pass at a time whenever no query is waiting: float32 first (the warm-up a first
query would pay anyway), then bf16 (its kernels), then alternated rounds, best of each. bf16 is kept
for a kind only where it is clearly faster. Larger batches amortise the weight cast, so where bf16
wins for one query it also wins for the batches that concurrent queries share; where float32 is
kept, auto is float32.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

QUERY_KINDS = ("text", "image")
# bf16 is kept for a kind only when its best pass takes at most this share of float32's best:
# a clear win, not a coin toss on a noisy machine (float32 is exact, and has no kernels to build).
KEEP_BF16_BELOW = 0.9
# Alternated rounds (a pass of each arithmetic) per kind: at least MIN_ROUNDS, and more while either
# arithmetic has had less than MIN_TRIAL_S of passes (up to MAX_ROUNDS): the best of more passes is
# what an unloaded machine would give, so cheap kinds (a text) get more of them on a busy machine.
MIN_ROUNDS, MAX_ROUNDS = 3, 15
MIN_TRIAL_S = 0.3
# A query that arrives during a trial pass waits for it: kinds whose float32 pass takes longer are not tried.
MAX_PASS_S = 1.0
PROBE_TEXT = "a small red circle"
PROBE_INSTRUCTION = "color"


@dataclass
class KindTrial:
    """One query kind's arithmetic, with its trial: the best pass of each arithmetic in ms."""

    chosen: str
    float32_ms: float | None = None
    bfloat16_ms: float | None = None
    note: str = ""


@dataclass
class QueryArithmetic:
    """The arithmetic of each query kind, as --precision spells it, and how it was chosen."""

    kinds: dict[str, KindTrial] = field(default_factory=dict)
    settled: bool = True  # False while a trial runs (its kinds meanwhile run in float32)
    trial_s: float = 0.0  # time spent in trial passes

    def precision(self, kind: str) -> str | None:
        """The precision to encode ``kind`` queries in (None: the encoder's own arithmetic)."""
        trial = self.kinds.get(kind)
        return trial.chosen if trial is not None else None

    def as_dict(self) -> dict:
        return {
            "settled": self.settled, "trial_s": round(self.trial_s, 3),
            "kinds": {k: {"chosen": t.chosen, "float32_ms": t.float32_ms, "bfloat16_ms": t.bfloat16_ms, "note": t.note}
                      for k, t in self.kinds.items()},
        }


class ArithmeticTrial:
    """Chooses each query kind's arithmetic for ``encoder`` (see the module's docstring).

    ``arithmetic`` holds the choice so far; while it is not settled, call ``step()`` to run one
    pass of the trial (the caller's thread must be the only one using the encoder), until it
    returns False. Only ``precision`` "auto" on a CPU encoder whose own arithmetic is bf16 autocast
    (a CPU with bf16) has a choice; otherwise every kind keeps the encoder's arithmetic, untimed.
    """

    def __init__(self, encoder, precision: str = "auto"):
        from focalsearch.models.encoders import arithmetic_name

        self.encoder = encoder
        own = arithmetic_name(encoder.autocast_dtype, encoder.dtype)
        kinds = [k for k in QUERY_KINDS if encoder.towers in ("both", "vision" if k == "image" else "text")]
        if precision != "auto":
            self.arithmetic = QueryArithmetic({k: KindTrial(own, note=f"--precision {precision}") for k in kinds})
        elif encoder.device.type != "cpu" or own != "bfloat16":
            self.arithmetic = QueryArithmetic({k: KindTrial(own, note=f"no choice: {own} on {encoder.device.type}") for k in kinds})
        else:
            self.arithmetic = QueryArithmetic({k: KindTrial("float32", note="trial pending") for k in kinds}, settled=False)
        self._passes = self._trial(kinds) if not self.arithmetic.settled else iter(())

    def step(self) -> bool:
        """Run the trial's next pass; False once the trial is over (the arithmetic is then settled)."""
        if next(self._passes, None) is None:
            self.arithmetic.settled = True
            return False
        return True

    def abandon(self, reason: str) -> None:
        """Stop the trial: the kinds not yet chosen stay float32."""
        self._passes = iter(())
        for trial in self.arithmetic.kinds.values():
            if trial.note == "trial pending":
                trial.note = f"trial stopped: {reason}"
        self.arithmetic.settled = True

    def run(self) -> QueryArithmetic:
        """The whole trial at once."""
        while self.step():
            pass
        return self.arithmetic

    def _trial(self, kinds: list[str]) -> Iterator[bool]:
        from PIL import Image

        side = self.encoder.min_decode_side
        probe = Image.new("RGB", (side, side), (200, 40, 40))
        instruction = PROBE_INSTRUCTION if self.encoder.towers == "both" else ""

        def one_pass(kind: str, precision: str) -> float:
            began = time.perf_counter()
            if kind == "text":
                self.encoder.encode_texts([PROBE_TEXT], precision=precision)
            else:
                self.encoder.encode_images([probe], instruction, precision=precision)
            took = time.perf_counter() - began
            self.arithmetic.trial_s += took
            return took

        for kind in kinds:
            one_pass(kind, "float32")  # the first pass of a shape pays for allocations: a warm-up
            yield True
            best = {"float32": one_pass(kind, "float32"), "bfloat16": float("inf")}
            yield True
            if best["float32"] > MAX_PASS_S:
                self.arithmetic.kinds[kind] = KindTrial("float32", best["float32"] * 1000,
                                                        note=f"a pass takes over {MAX_PASS_S:g} s: too long to try between queries")
                continue
            one_pass(kind, "bfloat16")  # builds bf16 kernels for this shape
            yield True
            spent = {"float32": 0.0, "bfloat16": 0.0}
            rounds = 0
            while rounds < MIN_ROUNDS or (rounds < MAX_ROUNDS and min(spent.values()) < MIN_TRIAL_S):
                for precision in ("bfloat16", "float32") if rounds % 2 == 0 else ("float32", "bfloat16"):
                    took = one_pass(kind, precision)
                    best[precision], spent[precision] = min(best[precision], took), spent[precision] + took
                    yield True
                rounds += 1
            faster = best["bfloat16"] <= KEEP_BF16_BELOW * best["float32"]
            self.arithmetic.kinds[kind] = KindTrial("bfloat16" if faster else "float32", best["float32"] * 1000,
                                                    best["bfloat16"] * 1000, note=f"best of {rounds} alternated passes each")


def choose_query_arithmetic(encoder, precision: str = "auto") -> QueryArithmetic:
    """Run the whole trial now (see ArithmeticTrial) and return each query kind's arithmetic."""
    return ArithmeticTrial(encoder, precision).run()
