"""Dynamic batching of query encodings, as inference servers do.

Concurrent queries each need one small forward pass. One worker thread takes every request that
arrives within a short window (or until a batch is full), groups them by what they need (texts;
images under one instruction), and runs one forward pass per group. The model is then only ever
used from that thread. Each kind runs in the arithmetic a ``trial`` chose for it
(focalsearch.models.arithmetic.ArithmeticTrial), else in the encoder's own; the trial's passes run
in the same thread, one at a time, whenever no request is waiting, from the first query on (so the
trial takes nothing from start-up, and an unused server spends nothing on it).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np


@dataclass
class _Request:
    kind: str  # "text" or "image"
    instruction: str
    payload: object
    future: Future = field(default_factory=Future)


class DynamicBatcher:
    """Encode texts and images for many threads at once, in batches of up to ``max_batch``.

    ``max_wait_ms`` is how long the first request of a batch waits for company: a lone query pays
    at most that much, and under load it is what lets requests share a forward pass.
    """

    def __init__(self, encoder, *, max_batch: int = 32, max_wait_ms: float = 2.0, trial=None):
        self.encoder = encoder
        self._trial = trial  # an ArithmeticTrial, or None: the encoder's arithmetic for every kind
        self.arithmetic = trial.arithmetic if trial is not None else None  # a QueryArithmetic, settled once the trial is over
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.batches = 0  # forward passes run, for tests and benchmarks
        self.encoded = 0
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name="focalsearch-batcher", daemon=True)
        self._thread.start()

    def encode_text(self, text: str) -> np.ndarray:
        return self._submit(_Request("text", "", text))

    def encode_image(self, image, instruction: str) -> np.ndarray:
        return self._submit(_Request("image", instruction, image))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _submit(self, request: _Request) -> np.ndarray:
        if not self._thread.is_alive():
            raise RuntimeError("the query encoder has stopped")
        self._queue.put(request)
        return request.future.result()

    def _run_trial_while_idle(self) -> None:
        """Trial passes, one at a time, for as long as no request waits (a request waits for one pass at most)."""
        while self._trial is not None and self._queue.empty():
            try:
                more = self._trial.step()
            except Exception as exc:  # the queries themselves will say what is wrong; keep float32
                self._trial.abandon(f"{type(exc).__name__}: {exc}")
                more = False
            if not more:
                self._trial = None

    def _take_batch(self) -> list[_Request] | None:
        if self.batches:
            self._run_trial_while_idle()
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=max(remaining, 0)) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # stop after this batch
                break
            batch.append(item)
        return batch

    def _serve(self) -> None:
        while (batch := self._take_batch()) is not None:
            groups: dict[tuple[str, str], list[_Request]] = defaultdict(list)
            for request in batch:
                groups[(request.kind, request.instruction)].append(request)
            for (kind, instruction), requests in groups.items():
                try:
                    payloads = [r.payload for r in requests]
                    precision = self.arithmetic.precision(kind) if self.arithmetic is not None else None  # float32 during the trial
                    if kind == "text":
                        vectors = self.encoder.encode_texts(payloads, precision=precision)
                    else:
                        vectors = self.encoder.encode_images(payloads, instruction, precision=precision)
                    self.batches += 1
                    self.encoded += len(requests)
                except BaseException as exc:  # hand the failure to every waiting caller
                    for request in requests:
                        request.future.set_exception(exc)
                    continue
                for request, vector in zip(requests, vectors):
                    request.future.set_result(np.asarray(vector, dtype=np.float32))
