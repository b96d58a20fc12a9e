"""The store: the database is the source of truth for graphs, runs, node executions and events.

``Store`` is implemented once with SQLModel (``server.store.sql``) over SQLite (aiosqlite, the
embedded default) and Postgres (asyncpg); one contract suite tests both.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from server.engine.records import NodeExecution, RunState, RunUpdate, Usage
from server.events import Event
from server.status import RunStatus

Publish = Callable[[Sequence[Event]], Awaitable[None]]
"""Where written events go next (an event bus's ``publish_many``)."""


@dataclass(slots=True)
class GraphRecord:
    name: str
    version: int
    spec: dict[str, Any]
    description: str | None
    created_at: datetime
    nodes: int = 0


@dataclass(slots=True)
class GraphSummary:
    name: str
    version: int
    description: str | None
    nodes: int
    created_at: datetime
    last_run: RunRecord | None = None


@dataclass(slots=True)
class RunRecord:
    id: str
    graph: str
    version: int
    status: RunStatus
    input: Any
    created_at: datetime
    output: Any = None
    error: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    usage: Usage = field(default_factory=dict[str, int])
    idempotency_key: str | None = None
    last_seq: int = 0

    @property
    def duration_ms(self) -> int | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return round((self.finished_at - self.started_at).total_seconds() * 1000)


class Store(Protocol):
    async def start(self) -> None:
        """Connect and create the tables (checking the schema version)."""
        ...

    async def close(self) -> None: ...

    async def ping(self) -> bool:
        """True when the database answers (for /health)."""
        ...

    # graphs
    async def create_graph(
        self, name: str, spec: dict[str, Any], description: str | None, nodes: int
    ) -> GraphRecord:
        """Store version 1 of a new graph; ``Conflict`` if the name exists."""
        ...

    async def put_graph(
        self, name: str, spec: dict[str, Any], description: str | None, nodes: int
    ) -> tuple[GraphRecord, bool]:
        """Store a new version (or version 1); returns the record and whether the graph is new."""
        ...

    async def get_graph(self, name: str, version: int | None = None) -> GraphRecord:
        """The latest (or the given) version; ``NotFound`` if missing."""
        ...

    async def graph_versions(self, name: str) -> list[GraphRecord]:
        """Every version of a graph, newest first; ``NotFound`` if the graph does not exist."""
        ...

    async def list_graphs(self) -> list[GraphSummary]: ...

    async def delete_graph(self, name: str) -> None:
        """Delete every version (runs are kept); ``NotFound`` if missing."""
        ...

    # runs
    async def create_run(
        self, graph: str, version: int, input: Any, idempotency_key: str | None = None
    ) -> tuple[RunRecord, bool]:
        """A new ``queued`` run, or the existing run with the same idempotency key (False)."""
        ...

    async def get_run(self, run_id: str) -> RunRecord: ...

    async def list_runs(
        self,
        graph: str | None = None,
        status: RunStatus | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> tuple[list[RunRecord], str | None]:
        """Runs newest first and the cursor of the next page (None at the end)."""
        ...

    async def runs_with_status(self, *statuses: RunStatus) -> list[RunRecord]:
        """Runs in the given statuses, oldest first (start-up recovery, sweeps)."""
        ...

    async def node_executions(self, run_id: str) -> list[NodeExecution]:
        """The run's node executions in the order they started."""
        ...

    async def run_state(self, run_id: str) -> RunState:
        """What a resumed run starts from: ended node executions and the last event seq."""
        ...

    # events (the engine's Recorder)
    async def record(
        self, event: Event, change: NodeExecution | RunUpdate | None = None, *, publish: Publish | None = None
    ) -> None:
        """Persist the event (assigning ``event.gid``) and the state change, atomically; then,
        with ``publish``, pass it on: events written together are published together, in the
        order they were written, before their callers go on."""
        ...

    def record_later(
        self, event: Event, change: NodeExecution | RunUpdate | None = None, *, publish: Publish | None = None
    ) -> object:
        """``record`` in two steps: the event takes its place in the order now, ``finish``
        persists (and publishes) it (see ``LaterRecorder``)."""
        ...

    async def finish(self, pending: Sequence[object]) -> None:
        """Persist events queued by ``record_later``; raise the first one's error."""
        ...

    async def events(self, run_id: str, after: int = 0, limit: int | None = None) -> list[Event]:
        """The run's events with ``seq > after`` in order."""
        ...

    async def feed(
        self, after: int = 0, limit: int = 500, graph: str | None = None, deltas: bool = False
    ) -> list[Event]:
        """All runs' events with ``gid > after`` in order (no ``node.delta`` unless asked)."""
        ...
