"""How many decoded query-image pixels one server process holds at once.

Every uploaded query image takes its decoded pixel count from a budget before it is decoded and
gives it back when its request is answered, after the encoder has seen it: uploads whose pixels
would go over the budget wait their turn (first come, first served), and one that waits longer
than ``wait_seconds`` gets a 503. With the budget equal to the query-image cap, large uploads are
decoded and encoded one after another instead of all at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator

from starlette.exceptions import HTTPException

DEFAULT_WAIT_SECONDS = 30.0


class PixelBudget:
    """A first-come, first-served budget of pixels, shared by the requests on one event loop."""

    def __init__(self, limit: int, *, wait_seconds: float = DEFAULT_WAIT_SECONDS):
        if limit < 1:
            raise ValueError("the pixel budget must be at least 1")
        self.limit = limit
        self.wait_seconds = wait_seconds
        self.in_flight = 0
        self._waiting: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    @contextlib.asynccontextmanager
    async def ticket(self) -> AsyncIterator[Ticket]:
        """A request's share of the budget: what it takes is given back when the block ends."""
        ticket = Ticket(self)
        try:
            yield ticket
        finally:
            self._give_back(ticket.held)
            ticket.held = 0

    async def _take(self, pixels: int) -> None:
        if not self._waiting and self.in_flight + pixels <= self.limit:
            self.in_flight += pixels
            return
        entry = (pixels, asyncio.get_running_loop().create_future())
        self._waiting.append(entry)
        try:
            await asyncio.wait_for(entry[1], self.wait_seconds)
        except BaseException:  # timed out, or the request went away
            if entry[1].done() and not entry[1].cancelled():  # granted just before: give it back
                self._give_back(pixels)
            else:
                if entry in self._waiting:
                    self._waiting.remove(entry)
                self._grant()  # the ones behind it may fit now
            raise
        # granted: _grant counted the pixels in

    def _give_back(self, pixels: int) -> None:
        if pixels:
            self.in_flight -= pixels
            self._grant()

    def _grant(self) -> None:
        while self._waiting and self.in_flight + self._waiting[0][0] <= self.limit:
            pixels, future = self._waiting.popleft()
            if future.done():  # its request gave up
                continue
            self.in_flight += pixels
            future.set_result(None)


class Ticket:
    """What one request holds of a PixelBudget."""

    def __init__(self, budget: PixelBudget):
        self.budget = budget
        self.held = 0

    async def take(self, pixels: int) -> None:
        """Wait until ``pixels`` (at most the whole budget) fit; a 503 when that takes too long."""
        pixels = max(0, min(pixels, self.budget.limit))
        if not pixels:
            return
        try:
            await self.budget._take(pixels)
        except asyncio.TimeoutError:
            raise HTTPException(
                503, f"busy: other large query images are being decoded; retry in a moment "
                f"(waited {self.budget.wait_seconds:g} s)",
            ) from None
        self.held += pixels
