"""The run queue: carries run ids from the API to workers. The database stays the source of
truth; a message only says "this run needs executing"."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol


class Delivery(Protocol):
    """One run handed to one worker."""

    run_id: str
    deliveries: int
    """How many times this message was delivered (1 the first time)."""

    async def ack(self) -> None:
        """The run's final state is persisted: drop the message."""
        ...

    async def heartbeat(self) -> None:
        """The worker is alive and still on it: do not hand it to another worker."""
        ...

    async def dead_letter(self, reason: str) -> None:
        """Give up on this message (it was delivered too often): keep it aside with ``reason``
        and drop it from the queue. The worker fails the run itself."""
        ...


class RunQueue(Protocol):
    async def enqueue(self, run_id: str) -> None: ...

    async def take(self) -> Delivery:
        """Wait for the next run (reclaimed runs of dead workers included)."""
        ...

    async def cancel(self, run_id: str) -> None:
        """Ask whichever worker holds ``run_id`` to cancel it."""
        ...

    def cancellations(self) -> AsyncIterator[str]:
        """Run ids whose cancellation was asked, as they are asked (every worker sees every one)."""
        ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...
