"""The engine's only way out: a recorder that persists events with the state they reflect."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from server.engine.records import NodeExecution, RunUpdate
from server.events import Event


class Recorder(Protocol):
    """Where a run's events and state changes go.

    The engine calls ``record`` once per event, passing the state change the event reflects (the
    node execution for ``node.*`` events, the run update for ``workflow.*``; None for
    ``node.delta``). An implementation persists both together (the SQL store), or keeps them in
    memory (tests, benchmarks), and publishes the event to live subscribers. When ``record``
    returns, the event and its state are durable.

    Calls for one run may overlap (concurrent nodes record at once, so the store can commit their
    events together), but they begin in sequence order: an implementation must take each event's
    place in its order before its first suspension point (``await``), as the SQL store's queue
    and the memory recorder do, so a run's events are persisted in order and without gaps. The
    engine records nothing more of a run after a ``record`` call failed.
    """

    async def record(self, event: Event, change: NodeExecution | RunUpdate | None = None) -> None:
        """Persist ``event`` and the state change it reflects, then publish the event."""
        ...


class LaterRecorder(Recorder, Protocol):
    """A recorder that can also take an event's place at once and record it later, with others.

    The engine uses it for a node's ``node.started`` when everything the node depends on is
    recorded already: the agent starts without waiting for that commit (a completion queued
    after it still becomes durable only after it)."""

    def record_later(self, event: Event, change: NodeExecution | RunUpdate | None = None) -> object:
        """Take ``event``'s place in the run's order now; ``finish`` persists and publishes it."""
        ...

    async def finish(self, pending: Sequence[object]) -> None:
        """Persist and publish what ``record_later`` returned (every one of them, in order), as
        ``record`` does one event: together, so many cost about as much as one."""
        ...
