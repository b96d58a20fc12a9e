"""An in-memory ``Recorder``: what tests and benchmarks run the engine with."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import anyio

from server.engine.records import NodeExecution, RunState, RunUpdate
from server.events import Event
from server.status import EventType, NodeStatus

Match = Callable[[Event], bool] | EventType | str


_ATOMS = frozenset({str, int, float, bool, type(None)})


def _copy(value: Any) -> Any:
    """A copy of plain data (dicts, lists, scalars): much cheaper than ``copy.deepcopy``."""
    if type(value) in _ATOMS:
        return value
    if isinstance(value, dict):
        items: dict[Any, Any] = value
        return {k: v if type(v) in _ATOMS else _copy(v) for k, v in items.items()}
    if isinstance(value, list | tuple):
        seq: list[Any] | tuple[Any, ...] = value
        return [v if type(v) in _ATOMS else _copy(v) for v in seq]
    return value


def _copy_execution(ex: NodeExecution) -> NodeExecution:
    # The constructor, not ``dataclasses.replace``: this runs for every event.
    return NodeExecution(
        ex.node,
        ex.iteration,
        ex.index,
        ex.status,
        ex.attempts,
        _copy(ex.output),
        ex.error,
        ex.started_at,
        ex.finished_at,
        _copy(ex.usage),
    )


def _matcher(match: Match) -> Callable[[Event], bool]:
    if isinstance(match, str):
        kind = EventType(match)
        return lambda event: event.type == kind
    return match


class MemoryRecorder:
    """Keeps every event, the latest state of every node execution and of the run (copies, so
    nothing the engine does later changes what was recorded)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.executions: dict[tuple[str, int, int | None], NodeExecution] = {}
        self.run: RunUpdate | None = None
        self._waiters: list[tuple[Callable[[Event], bool], anyio.Event, list[Event]]] = []

    async def record(self, event: Event, change: NodeExecution | RunUpdate | None = None) -> None:
        data = _copy(event.data)
        event = Event(event.run_id, event.seq, event.type, event.graph, data, event.at, event.gid)
        self.events.append(event)
        if isinstance(change, NodeExecution):
            self.executions[change.key] = _copy_execution(change)
        elif isinstance(change, RunUpdate):
            self.run = dataclasses.replace(change, output=_copy(change.output), usage=dict(change.usage))
        for waiter in list(self._waiters):
            match, done, found = waiter
            if match(event):
                found.append(event)
                done.set()
                self._waiters.remove(waiter)

    async def wait_for(self, match: Match) -> Event:
        """The first recorded event that ``match`` accepts (an event type, or a predicate), waiting
        for it if it has not come yet (bound the wait with ``anyio.fail_after``)."""
        accept = _matcher(match)
        for event in self.events:
            if accept(event):
                return event
        done = anyio.Event()
        found: list[Event] = []
        self._waiters.append((accept, done, found))
        await done.wait()
        return found[0]

    def of(self, *types: EventType | str) -> list[Event]:
        """The recorded events of the given types, in order."""
        wanted = {EventType(t) for t in types}
        return [e for e in self.events if e.type in wanted]

    def types(self) -> list[str]:
        return [str(e.type) for e in self.events]

    def execution(self, node: str, iteration: int = 0, index: int | None = None) -> NodeExecution:
        return self.executions[(node, iteration, index)]

    def state(self) -> RunState:
        """What a resumed run starts from: the ended executions and the last sequence number."""
        ended = (NodeStatus.SUCCEEDED, NodeStatus.FAILED, NodeStatus.SKIPPED)
        return RunState(
            last_seq=max((e.seq for e in self.events), default=0),
            started=any(e.type == EventType.WORKFLOW_STARTED for e in self.events),
            executions=[_copy_execution(ex) for ex in self.executions.values() if ex.status in ended],
        )
