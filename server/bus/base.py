"""The event bus: carries persisted events to live subscribers (SSE streams) in every API
process. Subscribers never lose an event: they subscribe first, then read what was persisted
before, then take the live events, dropping the ones they already had (by ``seq`` / ``gid``)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from server.events import Event


class Subscription(Protocol):
    async def receive(self) -> Event:
        """The next event; raises ``SubscriberTooSlow`` if the subscriber fell too far behind."""
        ...


class EventBus(Protocol):
    async def publish(self, event: Event) -> None:
        """Deliver a persisted event (its ``gid`` set) to every matching subscriber; never blocks
        on a slow subscriber."""
        ...

    async def publish_many(self, events: Sequence[Event]) -> None:
        """``publish`` each of ``events``, in order, at once (one round trip)."""
        ...

    def subscribe(self, run_id: str | None = None) -> AbstractAsyncContextManager[Subscription]:
        """Events of one run (or of every run when None) published from now on."""
        ...

    async def close(self) -> None: ...


class SubscriberTooSlow(Exception):
    """A subscriber's buffer overflowed; it is dropped and should resume by id."""
