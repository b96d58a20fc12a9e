"""Group commit: concurrent callers share one write (one transaction, one Redis pipeline).

Each caller queues its item and waits; whichever caller finds no write in progress becomes the
writer and writes what is queued, batch by batch and in order, until its own item is written
(and then one batch of the items queued meanwhile), then hands over to the next waiting caller.
A caller cancelled while queued still has its item written (a run's event sequence stays
gapless), and if it had just been made the writer, it writes before leaving. The store's event
recording and the Redis bus's publishing use it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import anyio
import anyio.lowlevel


@dataclass(eq=False, slots=True, kw_only=True)
class Pending:
    """One queued item; subclasses add what is written."""

    wake: anyio.Event | None = None  # made when the caller waits (a writer never does)
    waiting: bool = False
    done: bool = False
    error: Exception | None = None

    def finish(self, error: Exception | None = None) -> None:
        """Written (or failed with ``error``): wake its caller."""
        if error is not None:
            self.error = error
        self.done = True
        if self.wake is not None:
            self.wake.set()


P = TypeVar("P", bound=Pending)


class GroupCommit(Generic[P]):
    """Writes queued items with ``write(batch)``, at most ``batch_size`` at a time.

    ``write`` may set ``error`` on items that failed; if it raises, every item of the batch
    without an error of its own fails with that exception. ``queue`` holds the items not taken
    yet (``write`` may fail and ``finish`` some of them early; finished items are skipped)."""

    def __init__(
        self, write: Callable[[list[P]], Awaitable[None]], batch_size: int, *, idle_lap: float | None = None
    ) -> None:
        self.queue: list[P] = []
        self.batch_size = batch_size
        self._write = write
        self._writing = False
        # With ``idle_lap``: whether ``write`` may do its work on the event loop rather than in a
        # thread: the loop had nothing else to do when the writer started writing, or the batch
        # was queued while the writer wrote the one before (its callers waited a write already;
        # a thread would add a trip round the loop, busy at that).
        self._idle_lap = idle_lap
        self.inline = False

    async def submit(self, item: P) -> None:
        """Queue ``item`` and return once it is written; raise its error if it failed."""
        self.queue.append(item)
        await self.written(item)

    async def written(self, item: P) -> None:
        """Return once ``item``, queued before (``queue.append``), is written; raise its error if
        it failed. Queuing and waiting apart, a caller takes its item's place in the order at
        once and waits (and may write) later, or in another task."""
        while not item.done:
            if not self._writing:
                await self._drain(item)
                continue
            item.wake = anyio.Event()
            item.waiting = True
            try:
                await item.wake.wait()
            except BaseException:
                # Cancelled while queued: the item is still written, but if this caller was
                # just made the writer, someone must write.
                item.waiting = False
                if not item.done and not self._writing:
                    await self._drain(item)
                raise
            item.waiting = False
        if item.error is not None:
            raise item.error

    async def all_written(self, items: list[P]) -> None:
        """Return once ``items``, queued before in this order, are written; raise the first
        one's error. Batches are written in order: once the last is written, so are the others."""
        if items:
            await self.written(items[-1])
        for item in items:
            if item.error is not None:
                raise item.error

    async def _drain(self, own: P) -> None:
        """Write queued items batch by batch until ``own`` is written, then hand over."""
        self._writing = True
        try:
            with anyio.CancelScope(shield=True):
                # Let callers that are ready to submit join this first batch.
                began = time.perf_counter()
                await anyio.lowlevel.checkpoint()
                if self._idle_lap is not None:
                    # The loop is idle if it comes back at once. If it took a while, that may
                    # have been the callers that just joined (they wait for this write now):
                    # one more trip round the loop tells.
                    lap = time.perf_counter() - began
                    if lap > self._idle_lap:
                        began = time.perf_counter()
                        await anyio.lowlevel.checkpoint()
                        lap = time.perf_counter() - began
                    self.inline = lap <= self._idle_lap
                carried_on = False
                while self.queue:
                    batch = self.queue[: self.batch_size]
                    del self.queue[: self.batch_size]
                    try:
                        await self._write(batch)
                    except Exception as exc:
                        for item in batch:
                            if item.error is None:
                                item.error = exc
                    for item in batch:
                        if not item.done:
                            item.finish()
                    if own.done:
                        if self.queue and not carried_on:
                            # Queued while this batch was written (a burst's later requests):
                            # written now. A caller woken to take over first waits its turn on
                            # the loop behind every caller the batch just written woke, then one
                            # or two laps more to tell idleness: 15 to 30 ms in a burst of 60
                            # streamed runs, for a write of one.
                            carried_on = True
                            self.inline = self._idle_lap is not None
                            continue
                        successor = next((p for p in self.queue if p.waiting), None)
                        if successor is not None and successor.wake is not None:
                            successor.wake.set()
                            break
        finally:
            self._writing = False
