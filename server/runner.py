"""The worker side: take runs from the queue, execute them with the engine, acknowledge them
once their final state is persisted. Used in-process by ``braid serve`` (embedded mode) and by
``braid worker`` (distributed mode)."""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from datetime import datetime

import anyio

from agents.registry import Registry
from server.bus.base import EventBus
from server.engine.context import Resources
from server.engine.engine import Engine, RunHandle
from server.engine.records import NodeExecution, RunInfo, RunState, RunUpdate
from server.errors import NotFound, ValidationFailed
from server.events import Event, utcnow
from server.graph.fields import ValidationContext
from server.graph.model import Graph
from server.graph.parse import build_graph
from server.queue.base import Delivery, RunQueue
from server.status import EventType, RunStatus
from server.store.base import Store

log = logging.getLogger("braid.runner")

MAX_DELIVERIES = 5
"""A run delivered more often than this (its workers keep dying) is failed, not retried again."""

HEARTBEAT_SECONDS = 5.0


class Publisher:
    """The engine's Recorder: persist to the store, then publish to live subscribers (the store
    publishes what it wrote, batch by batch in the order it wrote it, so every subscriber gets a
    run's events in their order, one trip round the event loop sooner than if each caller
    published its own)."""

    def __init__(self, store: Store, bus: EventBus) -> None:
        self.store = store
        self.bus = bus

    async def record(self, event: Event, change: NodeExecution | RunUpdate | None = None) -> None:
        await self.store.record(event, change, publish=self.bus.publish_many)

    def record_later(self, event: Event, change: NodeExecution | RunUpdate | None = None) -> object:
        return self.store.record_later(event, change, publish=self.bus.publish_many)

    async def finish(self, pending: Sequence[object]) -> None:
        await self.store.finish(pending)


class GraphCache:
    """Validated graphs by (name, version, creation time): a stored version never changes, so it
    is built once. The record is read each time (the store serves it from memory), so a graph
    deleted and created again under the same version number is built anew."""

    def __init__(
        self, store: Store, registry: Registry, validation: ValidationContext, size: int = 256
    ) -> None:
        self._store = store
        self._registry = registry
        self._validation = validation
        self._size = size
        self._graphs: OrderedDict[tuple[str, int, datetime], Graph] = OrderedDict()

    async def get(self, name: str, version: int) -> Graph:
        record = await self._store.get_graph(name, version)
        key = (name, version, record.created_at)
        graph = self._graphs.get(key)
        if graph is None:
            graph = build_graph(record.spec, self._registry, self._validation)
            self._graphs[key] = graph
            if len(self._graphs) > self._size:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        return graph


async def finish_without_engine(
    publisher: Publisher, store: Store, run_id: str, status: RunStatus, error: str
) -> None:
    """End a run that the engine never got to (its graph is gone or invalid, it was cancelled while
    queued, it was delivered too often) with a ``workflow.finished`` event, so no client waits on a
    dead stream."""
    run = await store.get_run(run_id)
    if run.status.ended:
        return
    at = utcnow()
    event = Event(
        run_id=run_id,
        seq=run.last_seq + 1,
        type=EventType.WORKFLOW_FINISHED,
        graph=run.graph,
        data={"status": str(status), "output": None, "error": error, "duration_ms": 0, "usage": run.usage},
        at=at,
    )
    await publisher.record(event, RunUpdate(status=status, at=at, error=error, usage=dict(run.usage)))


class Runner:
    """Executes runs taken from ``queue``, up to ``concurrency`` at once."""

    def __init__(
        self,
        *,
        store: Store,
        queue: RunQueue,
        bus: EventBus,
        registry: Registry,
        resources: Resources,
        validation: ValidationContext,
        env: Mapping[str, str] | None = None,
        concurrency: int = 32,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
        backoff_cap: float = 10.0,
    ) -> None:
        self.store = store
        self.queue = queue
        self.publisher = Publisher(store, bus)
        self.engine = Engine(resources, env)
        self.graphs = GraphCache(store, registry, validation)
        self.concurrency = concurrency
        self.heartbeat_seconds = heartbeat_seconds
        self.backoff_cap = backoff_cap
        self.handles: dict[str, RunHandle] = {}
        self._held: dict[Delivery, None] = {}  # the deliveries being executed, in order
        self._stopping = False
        self._taking: anyio.CancelScope | None = None
        self._drained = anyio.Event()
        # Cancellations heard for runs this worker does not hold (yet): a cancel that races the
        # run's delivery is applied when the run arrives.
        self._cancelled: OrderedDict[str, None] = OrderedDict()

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Take and execute runs until cancelled (shutdown leaves unfinished runs to be resumed),
        or until ``stop_taking`` and the runs in flight have finished."""
        # A free slot is taken without a trip round the event loop (see MemoryQueue.take).
        limiter = anyio.Semaphore(self.concurrency, fast_acquire=True)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._listen_for_cancellations)
                tg.start_soon(self._heartbeats)
                task_status.started()
                with anyio.CancelScope() as self._taking:
                    if self._stopping:
                        self._taking.cancel()
                    await self._take_and_execute(tg, limiter)
                # Stopped taking: every slot free again means no run is in flight.
                for _ in range(self.concurrency):
                    await limiter.acquire()
                tg.cancel_scope.cancel()
        finally:
            self._drained.set()

    async def _take_and_execute(self, tg: anyio.abc.TaskGroup, limiter: anyio.Semaphore) -> None:
        failures = 0
        while True:
            await limiter.acquire()
            try:
                delivery = await self.queue.take()
            except Exception as exc:
                # The queue backs off on connection errors itself; anything else must not kill
                # the worker either: log it, wait, and take again.
                limiter.release()
                failures += 1
                delay = min(self.backoff_cap, 0.1 * 2 ** min(failures, 16))
                log.error("taking a run failed (%s); retrying in %.1fs", exc, delay, exc_info=True)
                await anyio.sleep(delay)
                continue
            except BaseException:
                limiter.release()
                raise
            failures = 0
            tg.start_soon(self._execute_delivery, delivery, limiter)

    def stop_taking(self) -> None:
        """Take no more runs; ``serve`` returns once the runs in flight have finished."""
        self._stopping = True
        if self._taking is not None:
            self._taking.cancel()

    async def drain(self, grace: float) -> bool:
        """Stop taking runs and wait up to ``grace`` seconds for the runs in flight to finish;
        True if they did. Runs still in flight afterwards are left unacknowledged, for another
        worker to resume, when the caller stops ``serve``."""
        self.stop_taking()
        if self._taking is None:  # serve never started
            return True
        with anyio.move_on_after(grace):
            await self._drained.wait()
            return True
        return False

    async def _listen_for_cancellations(self) -> None:
        failures = 0
        while True:
            try:
                async for run_id in self.queue.cancellations():
                    failures = 0
                    if not self.cancel_local(run_id):
                        self._cancelled[run_id] = None
                        if len(self._cancelled) > 10_000:
                            self._cancelled.popitem(last=False)
            except Exception as exc:
                failures += 1
                delay = min(self.backoff_cap, 0.1 * 2 ** min(failures, 16))
                log.error("listening for cancellations failed (%s); retrying in %.1fs", exc, delay)
                await anyio.sleep(delay)
            else:
                return  # the queue was closed

    async def _execute_delivery(self, delivery: Delivery, limiter: anyio.Semaphore) -> None:
        try:
            if delivery.deliveries > MAX_DELIVERIES:
                reason = (
                    f"run was delivered {delivery.deliveries} times without finishing "
                    "(its workers keep dying); giving up"
                )
                await self._fail_undeliverable(delivery.run_id, reason)
                await delivery.dead_letter(reason)
                return
            self._held[delivery] = None  # heartbeats go on while it is held
            try:
                await self._execute_through_outages(delivery.run_id)
            finally:
                del self._held[delivery]
            await delivery.ack()
        except Exception:
            # The run stays as persisted; its message is redelivered (or reclaimed) later.
            log.exception("run %s: execution failed; it will be retried", delivery.run_id)
        finally:
            limiter.release()

    async def _execute_through_outages(self, run_id: str) -> None:
        """``execute``, holding the run while the database is unreachable: a failure while the
        store does not answer its ping is an outage, not a dying worker, so the run keeps its
        message (the heartbeat goes on) and resumes once the store answers again, rather than
        being redelivered until it counts as undeliverable (``MAX_DELIVERIES``)."""
        while True:
            try:
                await self.execute(run_id)
                return
            except Exception as exc:
                if await self.store.ping():
                    raise  # the database is there: a failure of its own, for redelivery
                log.warning("run %s: the database is unreachable (%s); holding the run", run_id, exc)
            failures = 0
            while not await self.store.ping():
                failures += 1
                await anyio.sleep(min(self.backoff_cap, 0.1 * 2 ** min(failures, 16)))
            log.info("run %s: the database is back; resuming the run", run_id)

    async def _heartbeats(self) -> None:
        """Every ``heartbeat_seconds``, a heartbeat for each run this worker holds: one task for
        all of them rather than a task (and a timer) per run."""
        while True:
            await anyio.sleep(self.heartbeat_seconds)
            for delivery in list(self._held):
                try:
                    await delivery.heartbeat()
                except Exception as exc:  # the next beat tries again; the run goes on meanwhile
                    log.warning("run %s: heartbeat failed (%s)", delivery.run_id, exc)

    async def execute(self, run_id: str) -> RunUpdate | None:
        """Execute (or resume) one run to its end; None when there was nothing to do."""
        try:
            run = await self.store.get_run(run_id)
        except NotFound:
            log.warning("run %s: not in the database; dropping its message", run_id)
            return None
        if run.status.ended:
            return None
        try:
            graph = await self.graphs.get(run.graph, run.version)
        except (NotFound, ValidationFailed) as exc:
            await finish_without_engine(
                self.publisher, self.store, run_id, RunStatus.FAILED, f"cannot run: {exc}"
            )
            return None
        if run.status is RunStatus.QUEUED and run.last_seq == 0:
            # A fresh run: no event yet, so no node execution either (they are written together).
            state = RunState(last_seq=0, started=False, executions=[])
        else:
            state = await self.store.run_state(run_id)
        handle = RunHandle()
        self.handles[run_id] = handle
        if run_id in self._cancelled:
            del self._cancelled[run_id]
            handle.cancel("cancelled by request")
        try:
            info = RunInfo(id=run.id, graph=run.graph, version=run.version, input=run.input)
            return await self.engine.run(graph, info, self.publisher, state=state, handle=handle)
        finally:
            del self.handles[run_id]

    async def _fail_undeliverable(self, run_id: str, reason: str) -> None:
        with contextlib.suppress(NotFound):  # the run was deleted: nothing to fail
            await finish_without_engine(self.publisher, self.store, run_id, RunStatus.FAILED, reason)

    def cancel_local(self, run_id: str) -> bool:
        """Cancel a run this process executes; False if it is not here."""
        handle = self.handles.get(run_id)
        if handle is None:
            return False
        handle.cancel("cancelled by request")
        return True
