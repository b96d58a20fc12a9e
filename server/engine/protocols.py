"""The engine's only way out: a recorder that persists events with the state they reflect."""

from __future__ import annotations

from typing import Protocol

from server.engine.records import NodeExecution, RunUpdate
from server.events import Event


class Recorder(Protocol):
    """Where a run's events and state changes go.

    The engine calls ``record`` once per event, in sequence order, passing the state change the
    event reflects (the node execution for ``node.*`` events, the run update for ``workflow.*``;
    None for ``node.delta``). An implementation persists both together (the SQL store), or
    keeps them in memory (tests, benchmarks), and publishes the event to live subscribers.
    When ``record`` returns, the event and its state are durable.
    """

    async def record(self, event: Event, change: NodeExecution | RunUpdate | None = None) -> None:
        """Persist ``event`` and the state change it reflects, then publish the event."""
        ...
