"""The embedded run queue: runs and cancellations travel inside one process."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream


@dataclass(eq=False)
class MemoryDelivery:
    run_id: str
    deliveries: int = 1
    acked: bool = False
    dead_reason: str | None = None
    heartbeats: int = field(default=0, repr=False)

    async def ack(self) -> None:
        self.acked = True

    async def heartbeat(self) -> None:
        # Nothing can steal a run inside one process; counted so tests can see the worker's beat.
        self.heartbeats += 1

    async def dead_letter(self, reason: str) -> None:
        self.dead_reason = reason
        self.acked = True


class MemoryCancellations:
    """Every cancel asked after this iterator was created, in order."""

    def __init__(self, queue: MemoryQueue) -> None:
        self._queue = queue
        self._send, self._receive = anyio.create_memory_object_stream[str](math.inf)
        queue._listeners.add(self)

    async def start(self) -> None:
        """Listening already (kept so callers can treat every queue's listener alike)."""

    def __aiter__(self) -> MemoryCancellations:
        return self

    async def __anext__(self) -> str:
        try:
            return await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        self._queue._listeners.discard(self)
        self._send.close()
        self._receive.close()


class MemoryQueue:
    """An unbounded in-process queue of run ids; ``cancel`` reaches every listener."""

    def __init__(self) -> None:
        self._send: MemoryObjectSendStream[str]
        self._receive: MemoryObjectReceiveStream[str]
        self._send, self._receive = anyio.create_memory_object_stream[str](math.inf)
        self._listeners: set[MemoryCancellations] = set()

    async def enqueue(self, run_id: str) -> None:
        self._send.send_nowait(run_id)

    async def take(self) -> MemoryDelivery:
        # A run already queued is taken without a trip round the event loop: a burst of runs
        # reaches the runner's slots at once instead of one per turn of a busy loop.
        try:
            return MemoryDelivery(self._receive.receive_nowait())
        except anyio.WouldBlock:
            return MemoryDelivery(await self._receive.receive())

    async def cancel(self, run_id: str) -> None:
        for listener in list(self._listeners):
            listener._send.send_nowait(run_id)

    def cancellations(self) -> MemoryCancellations:
        return MemoryCancellations(self)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._send.close()
        self._receive.close()
        for listener in list(self._listeners):
            await listener.aclose()
