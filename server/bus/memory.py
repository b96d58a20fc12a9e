"""The embedded event bus: events fan out to subscribers inside one process."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from contextlib import asynccontextmanager

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from server.bus.base import SubscriberTooSlow
from server.events import Event

DEFAULT_BUFFER = 10_000
"""Events a subscriber may fall behind by before it is dropped."""


class Buffer:
    """A subscriber's bounded buffer: ``offer`` never blocks; one offer too many drops the
    subscriber, whose next ``receive`` raises ``SubscriberTooSlow``."""

    def __init__(self, size: int) -> None:
        self._send: MemoryObjectSendStream[Event]
        self._receive: MemoryObjectReceiveStream[Event]
        self._send, self._receive = anyio.create_memory_object_stream[Event](size)
        self.dropped: str | None = None

    def offer(self, event: Event) -> bool:
        """Queue ``event``; False (and the subscriber dropped) when the buffer is full."""
        if self.dropped is not None:
            return False
        try:
            self._send.send_nowait(event)
        except anyio.WouldBlock:
            self.end(f"fell more than {self._send.statistics().max_buffer_size:g} events behind")
            return False
        except anyio.BrokenResourceError:
            return False
        return True

    def end(self, why: str) -> None:
        """Stop the subscription: its next ``receive`` raises ``SubscriberTooSlow(why)``."""
        if self.dropped is None:
            self.dropped = why
        self._send.close()

    async def receive(self) -> Event:
        if self.dropped is not None:
            raise SubscriberTooSlow(f"subscriber dropped: it {self.dropped}; resume from the last event id")
        try:
            # An event already here is taken without a trip round the event loop.
            try:
                return self._receive.receive_nowait()
            except anyio.WouldBlock:
                return await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise SubscriberTooSlow(
                f"subscriber dropped: it {self.dropped or 'was closed'}; resume from the last event id"
            ) from None

    def close(self) -> None:
        self._send.close()
        self._receive.close()


class MemoryBus:
    """Fans each published event out to the subscribers of its run and to the global ones."""

    def __init__(self, buffer_size: int = DEFAULT_BUFFER) -> None:
        self.buffer_size = buffer_size
        self._by_run: dict[str | None, set[Buffer]] = {}

    @property
    def subscriber_count(self) -> int:
        return sum(len(buffers) for buffers in self._by_run.values())

    async def publish(self, event: Event) -> None:
        for key in (event.run_id, None):
            for buffer in list(self._by_run.get(key, ())):
                if not buffer.offer(event):
                    self._remove(key, buffer)

    async def publish_many(self, events: Sequence[Event]) -> None:
        for event in events:
            await self.publish(event)

    @asynccontextmanager
    async def subscribe(self, run_id: str | None = None) -> AsyncGenerator[Buffer, None]:
        buffer = Buffer(self.buffer_size)
        self._by_run.setdefault(run_id, set()).add(buffer)
        try:
            yield buffer
        finally:
            self._remove(run_id, buffer)
            buffer.close()

    async def close(self) -> None:
        for key, buffers in list(self._by_run.items()):
            for buffer in list(buffers):
                buffer.end("was closed with the event bus")
                self._remove(key, buffer)

    def _remove(self, key: str | None, buffer: Buffer) -> None:
        buffers = self._by_run.get(key)
        if buffers is None:
            return
        buffers.discard(buffer)
        if not buffers:
            del self._by_run[key]
