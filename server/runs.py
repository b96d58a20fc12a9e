"""Starting, cancelling and waiting for runs: what the API (and the CLI through it) asks of a
Braid process, whatever the deployment mode."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import anyio
from jsonschema import Draft202012Validator

from server.bus.base import EventBus, SubscriberTooSlow
from server.errors import Conflict, Problem, Unavailable, ValidationFailed
from server.graph.model import Graph
from server.queue.base import RunQueue
from server.runner import GraphCache, Publisher, finish_without_engine
from server.status import EventType, RunStatus
from server.store.base import RunRecord, Store

log = logging.getLogger("braid.runs")


def input_problems(graph: Graph, value: Any) -> list[Problem]:
    """Every way ``value`` fails the graph's input JSON Schema, with ``input.``-rooted paths."""
    if graph.input_schema is None:
        return []
    validator = Draft202012Validator(graph.input_schema)
    problems: list[Problem] = []
    for error in sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path)):
        path = "input"
        for part in error.absolute_path:
            path += f"[{part}]" if isinstance(part, int) else f".{part}"
        problems.append(Problem(path, error.message))
    return problems


class Runs:
    """The run lifecycle as the API sees it."""

    def __init__(self, store: Store, queue: RunQueue, bus: EventBus, graphs: GraphCache) -> None:
        self.store = store
        self.queue = queue
        self.bus = bus
        self.graphs = graphs
        self.publisher = Publisher(store, bus)

    async def start(
        self,
        graph_name: str,
        input: Any,
        *,
        version: int | None = None,
        idempotency_key: str | None = None,
        dispatch: bool = True,
    ) -> tuple[RunRecord, bool]:
        """Validate the input, create the run (or find it by idempotency key) and queue it.

        With ``dispatch=False`` a new run is created but not queued: the caller must call
        ``dispatch`` for it (a streamed start subscribes to the run's events first)."""
        record = await self.store.get_graph(graph_name, version)
        graph = await self.graphs.get(record.name, record.version)
        problems = input_problems(graph, input)
        if problems:
            raise ValidationFailed(problems, what="input")
        run, created = await self.store.create_run(record.name, record.version, input, idempotency_key)
        if created and dispatch:
            await self.dispatch(run.id)
        return run, created

    async def dispatch(self, run_id: str) -> None:
        """Queue a run created by ``start(..., dispatch=False)``.

        The run is stored already, so it is accepted even when the queue (Redis) cannot be
        reached: the workers' sweep queues it once Redis is back (``server.sweep``)."""
        try:
            await self.queue.enqueue(run_id)
        except Unavailable as exc:
            log.warning("run %s is stored but not queued yet (%s); the sweep will queue it", run_id, exc)

    async def cancel(self, run_id: str) -> RunRecord:
        """Ask for the run to end ``cancelled``; ``Conflict`` if it already ended."""
        run = await self.store.get_run(run_id)
        if run.status.ended:
            raise Conflict(
                f"run {run_id} already ended ({run.status}); only a queued or running run can be cancelled"
            )
        await self.queue.cancel(run_id)
        if run.status is RunStatus.QUEUED:
            # Conflict: a worker started the run at this very moment (its workflow.started took
            # the sequence number); the cancel message sent above reaches that worker.
            with contextlib.suppress(Conflict):
                await finish_without_engine(
                    self.publisher, self.store, run_id, RunStatus.CANCELLED, "cancelled by request"
                )
        return await self.store.get_run(run_id)

    async def wait(self, run_id: str, timeout: float) -> RunRecord:
        """The run once it ended, or as it is when ``timeout`` seconds have passed — or at once
        when its events cannot be followed (Redis away: the run cannot progress meanwhile)."""
        with anyio.move_on_after(timeout), contextlib.suppress(Unavailable):
            async with self.bus.subscribe(run_id) as subscription:
                run = await self.store.get_run(run_id)
                while not run.status.ended:
                    try:
                        event = await subscription.receive()
                    except SubscriberTooSlow:
                        break
                    if event.type is EventType.WORKFLOW_FINISHED:
                        break
        return await self.store.get_run(run_id)
