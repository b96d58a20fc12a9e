"""The worker's runner, in process (embedded mode: the in-memory queue)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from server.braid import open_braid
from server.config import Settings
from server.queue.memory import MemoryDelivery, MemoryQueue

pytestmark = pytest.mark.anyio

NAP = {
    "name": "nap",
    "nodes": {"nap": {"agent": "wait", "seconds": 0.4}, "done": {"agent": "template", "template": "up"}},
    "edges": [{"from": "nap", "to": "done"}],
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def until(condition: Callable[[], bool], within: float = 10.0) -> None:
    """Poll ``condition`` (a counter the worker bumps, with no event to wait on) until it holds."""
    with anyio.fail_after(within):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.01)  # the poll interval; fail_after bounds the wait


async def test_a_worker_heartbeats_the_runs_it_holds_and_stops_once_they_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken: dict[str, MemoryDelivery] = {}
    take = MemoryQueue.take

    async def recording_take(self: MemoryQueue) -> MemoryDelivery:
        delivery = await take(self)
        taken[delivery.run_id] = delivery
        return delivery

    monkeypatch.setattr(MemoryQueue, "take", recording_take)
    # Heartbeats every 50 ms (a third of the idle time after which a run would be reclaimed).
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'braid.db'}", reclaim_idle_ms=150)
    async with open_braid(settings) as braid:
        await braid.store.put_graph("nap", NAP, None, 2)
        first, _ = await braid.runs.start("nap", {})
        await until(lambda: first.id in taken and taken[first.id].heartbeats >= 2)
        assert (await braid.runs.wait(first.id, 10)).status == "succeeded"
        await until(lambda: taken[first.id].acked)
        beats = taken[first.id].heartbeats

        # Another held run gets its beats; the one that ended gets no more.
        second, _ = await braid.runs.start("nap", {})
        await until(lambda: second.id in taken and taken[second.id].heartbeats >= 2)
        assert taken[first.id].heartbeats == beats
        assert (await braid.runs.wait(second.id, 10)).status == "succeeded"
