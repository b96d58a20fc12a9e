"""The execution engine: runs one validated graph for one run, recording every step.

The scheduler is event driven, never a global superstep: when a node ends, its outgoing edges are
resolved and every node whose incoming forward edges are all resolved starts at once (or is
skipped when none of them was taken, and the skip propagates). Nodes run concurrently in one anyio
task group, bounded by ``graph.concurrency``; a back edge that is taken resets its loop body and
starts the loop again. Everything the engine does goes out through the ``Recorder`` it is given,
in sequence order, so a run can be watched live and resumed by another worker.

Choices where DESIGN.md is silent:

* ``max_steps`` counts node executions: a mapped node counts once, whatever its item count;
  executions replayed on resume count too, so a resumed loop stops where it would have.
* A node that takes several back edges at once follows the first (declaration order).
* ``on_error: continue`` on a mapped node applies per item: a failed item's result is
  ``{"error": ...}`` and the node goes on; the map expression failing fails the node as a whole.
* A node cancelled while running (the run was cancelled, or a sibling failed) is recorded with
  status ``cancelled`` through a ``node.failed`` event whose error starts with ``cancelled``: the
  Recorder persists state only together with an event.
* A node completing again in a loop re-resolves its edges into nodes outside the loop only while
  those nodes have not started: a node runs at most once per pass (join-once).
* An agent runs only once every event recorded before its node started that it may depend on
  (completions, failures, skips) is durable. Its own ``node.started`` may still be committing
  while it runs (a fan-out's branches, with a store that commits in the background); it is
  durable before anything the node records after it. A completion that makes no node ready
  (a branch before its join, a last node) is committed after the node's task ends, and
  before the run's ``workflow.finished``.
"""

from __future__ import annotations

import asyncio
import math
import types
from collections import deque
from collections.abc import Awaitable, Coroutine, Generator, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar, cast

import anyio
import anyio.abc
import anyio.lowlevel
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from server.engine.context import NodeContext, Resources
from server.engine.protocols import LaterRecorder, Recorder
from server.engine.records import NodeExecution, RunInfo, RunState, RunUpdate, Usage, add_usage
from server.errors import BraidError, ExpressionError, NodeError, RetryableError
from server.events import Event, utcnow
from server.graph.model import Edge, Graph, Node, RetryPolicy, is_unicode
from server.status import EventType, NodeStatus, RunStatus

PLAN_CACHE_SIZE = 256
"""Graphs whose run plan an engine keeps."""

RECORD_TIMEOUT = 10.0
"""Longest wait for one ``Recorder.record`` call; beyond it the store is taken to be gone."""

_NOT_DEPENDED_ON = frozenset({EventType.NODE_STARTED, EventType.NODE_DELTA, EventType.NODE_RETRYING})
"""Events no node's start depends on (every other one may carry an output, or end a node)."""


T = TypeVar("T")


class RecordTimeout(BraidError):
    """The recorder did not answer in time: the run stops where it is, to be resumed later."""


_GUARD: ContextVar[anyio.CancelScope | None] = ContextVar("braid_record_guard", default=None)
"""The cancel scope a node task (or map item task) runs in, shielded while it records: one
scope per task instead of a shielded scope per event (anyio's scopes cost several µs each)."""


@types.coroutine
def _resume(coro: Coroutine[Any, Any, T], step: Any) -> Generator[Any, Any, T]:
    """Await the rest of ``coro``, which already ran to its first suspension and yielded
    ``step`` (as ``yield from`` would, from there on). Nothing may enter or leave a cancel scope
    in between: the scopes ``coro`` entered stay this task's innermost ones."""
    while True:
        try:
            sent = yield step
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:
            try:
                step = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                step = coro.send(sent)
            except StopIteration as stop:
                return stop.value


class _Deadlines:
    """Cancel scopes to cancel at a deadline (a node's attempt, a node task's record), on one
    asyncio timer for the run, due with the earliest of them. A scope's own deadline costs a
    timer each: made, pushed on asyncio's heap (comparisons in Python), cancelled and left there
    until due; two or three a node were 8% of a node's time in memory and 5% of a durable one's.
    Scopes are kept by timeout, each timeout's in the order they came, so by deadline."""

    __slots__ = ("at", "loop", "timer", "waiting")

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.waiting: dict[float, dict[anyio.CancelScope, float]] = {}
        self.timer: asyncio.TimerHandle | None = None
        self.at = math.inf

    def add(self, scope: anyio.CancelScope, timeout: float) -> None:
        """Cancel ``scope`` in ``timeout`` seconds, unless ``discard``ed before."""
        due = self.loop.time() + timeout
        queue = self.waiting.get(timeout)
        if queue is None:
            queue = self.waiting[timeout] = {}
        queue[scope] = due
        if due < self.at:
            self._arm(due)

    def discard(self, scope: anyio.CancelScope, timeout: float) -> None:
        del self.waiting[timeout][scope]

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _arm(self, due: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.at = due
        self.timer = self.loop.call_at(due, self._expire)

    def _expire(self) -> None:
        self.timer, self.at = None, math.inf
        now = self.loop.time()
        due = math.inf
        for queue in self.waiting.values():
            for scope, when in queue.items():
                if when > now:
                    due = min(due, when)
                    break
                scope.cancel()  # its task discards it
        if due < math.inf:
            self._arm(due)


class _Slots:
    """A run's bound on nodes (or map items) executing at once: ``anyio.CapacityLimiter``
    without its trip through the event loop on every acquire. Waiters get slots in order."""

    __slots__ = ("free", "waiting")

    def __init__(self, total: int) -> None:
        self.free = max(1, total)
        self.waiting: deque[anyio.Event] = deque()

    async def acquire(self) -> None:
        await anyio.lowlevel.checkpoint_if_cancelled()
        if self.free > 0 and not self.waiting:
            self.free -= 1
            return
        handed = anyio.Event()
        self.waiting.append(handed)
        try:
            await handed.wait()
        except BaseException:
            if handed.is_set():  # the slot came with the cancellation: pass it on
                self.release()
            else:
                self.waiting.remove(handed)
            raise

    def release(self) -> None:
        if self.waiting:
            self.waiting.popleft().set()  # the slot goes straight to the first waiter
        else:
            self.free += 1


def is_retryable(exc: BaseException) -> bool:
    """Whether another attempt may succeed: a retryable ``NodeError`` or a timeout. Never a
    cancellation or any other ``BaseException``."""
    if isinstance(exc, NodeError):
        return exc.retryable
    return isinstance(exc, TimeoutError)


def describe(exc: BaseException) -> str:
    """An error message for users: Braid's own errors as they are, others with their type."""
    if isinstance(exc, BraidError):
        return str(exc) or type(exc).__name__
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def retry_wait(policy: RetryPolicy) -> wait_exponential_jitter:
    """Exponential backoff from ``initial_delay`` by ``multiplier``, capped at ``max_delay``, plus
    up to one ``initial_delay`` of random jitter when ``jitter`` is set."""
    return wait_exponential_jitter(
        multiplier=policy.initial_delay,
        exp_base=policy.multiplier,
        max=policy.max_delay,
        jitter=policy.initial_delay if policy.jitter else 0,
    )


def _plain_copy(value: Any) -> Any:
    """A copy of plain data (dicts, lists, scalars), so an agent cannot change the run's state."""
    if isinstance(value, dict):
        items: dict[Any, Any] = value
        return {k: _plain_copy(v) for k, v in items.items()}
    if isinstance(value, list | tuple):
        seq: list[Any] | tuple[Any, ...] = value
        return [_plain_copy(v) for v in seq]
    return value


class _CopyOnRead(dict[str, Any]):
    """What an agent is given as ``outputs`` (and ``input``): a shallow snapshot of the run's dict
    whose values are copied as they are read, so an agent can neither change the run's state nor
    pay for copying what it does not read. A plain dict to everyone else (``tojson``, ``dict()``,
    the sandbox's refusal to call mutating methods); whatever hands out a value hands out a copy.
    """

    __slots__ = ()

    def __getitem__(self, key: str) -> Any:
        return _plain_copy(dict.__getitem__(self, key))

    def __iter__(self) -> Iterator[str]:  # not dict's own: ``dict(view)`` then reads through __getitem__
        return dict.__iter__(self)

    def get(self, key: str, default: Any = None) -> Any:  # pyright: ignore[reportIncompatibleMethodOverride]
        return _plain_copy(dict.get(self, key, default))

    def items(self) -> list[tuple[str, Any]]:  # pyright: ignore[reportIncompatibleMethodOverride]
        return [(k, _plain_copy(v)) for k, v in dict.items(self)]

    def values(self) -> list[Any]:  # pyright: ignore[reportIncompatibleMethodOverride]
        return [_plain_copy(v) for v in dict.values(self)]

    def copy(self) -> dict[str, Any]:
        return dict(self.items())

    def pop(self, key: str, *default: Any) -> Any:  # pyright: ignore[reportIncompatibleMethodOverride]
        return _plain_copy(dict.pop(self, key, *default))

    def popitem(self) -> tuple[str, Any]:
        key, value = dict.popitem(self)
        return key, _plain_copy(value)

    def setdefault(self, key: str, default: Any = None) -> Any:  # pyright: ignore[reportIncompatibleMethodOverride]
        return _plain_copy(dict.setdefault(self, key, default))

    def __or__(self, other: Any) -> dict[str, Any]:  # pyright: ignore[reportIncompatibleMethodOverride]
        merged = self.copy()
        merged.update(other)
        return merged


def _guarded(value: Any) -> Any:
    """``value`` as an agent may have it: dicts as a copy-on-read view, lists copied."""
    if isinstance(value, dict):
        return _CopyOnRead(value)
    if isinstance(value, list | tuple):
        return _plain_copy(value)
    return value


_SCALARS = (str, int, float, bool, type(None))


def json_data(value: Any, path: str) -> Any:
    """``value`` as plain JSON data (tuples become lists); anything else is a node failure, so an
    output the store could not persist never leaves a run half-recorded."""
    if isinstance(value, _SCALARS):
        if isinstance(value, str):
            if not value.isascii() and not is_unicode(value):
                raise NodeError(f"{path} is a string that is not valid Unicode (a lone surrogate)")
        elif isinstance(value, float) and not math.isfinite(value):
            raise NodeError(f"{path} is {value}, not a JSON number (JSON has no NaN or Infinity)")
        return value
    if isinstance(value, dict):
        items: dict[Any, Any] = value
        return {str(k): json_data(v, f"{path}.{k}") for k, v in items.items()}
    if isinstance(value, list | tuple):
        seq: list[Any] | tuple[Any, ...] = value
        return [json_data(v, f"{path}[{i}]") for i, v in enumerate(seq)]
    hint = (
        " (did an expression name a method, like `input.items`? use `input['items']`)"
        if callable(value)
        else ""
    )
    raise NodeError(f"{path} is a {type(value).__name__}, not JSON data{hint}")


def _json_details(values: Mapping[str, Any]) -> dict[str, Any]:
    """An attempt's ``details`` (``NodeContext.note``) as JSON data; a value that is not JSON data
    is shown as its ``repr`` rather than failing the node over what is only shown to users."""
    details: dict[str, Any] = {}
    for key, value in values.items():
        try:
            details[key] = json_data(value, f"details.{key}")
        except NodeError:
            details[key] = repr(value)
    return details


def _snapshot(ex: NodeExecution) -> NodeExecution:
    """What is recorded of ``ex`` now (the engine goes on changing ``ex``; outputs never change)."""
    return NodeExecution(
        ex.node,
        ex.iteration,
        ex.index,
        ex.status,
        ex.attempts,
        ex.output,
        ex.error,
        ex.started_at,
        ex.finished_at,
        dict(ex.usage) if ex.usage is not None else None,
    )


class RunHandle:
    """Created by the caller; ``cancel()`` from any task in the same event loop cancels the run.

    A handle cancelled before the run starts cancels it as soon as it starts.
    """

    def __init__(self) -> None:
        self._reason: str | None = None
        self._scope: anyio.CancelScope | None = None

    def cancel(self, reason: str = "cancelled") -> None:
        if self._reason is None:
            self._reason = reason
        if self._scope is not None:
            self._scope.cancel()

    @property
    def cancelled(self) -> bool:
        return self._reason is not None

    @property
    def reason(self) -> str | None:
        return self._reason

    def _attach(self, scope: anyio.CancelScope) -> None:
        self._scope = scope
        if self._reason is not None:
            scope.cancel()

    def _detach(self) -> None:
        self._scope = None


class Engine:
    """Executes graphs. One engine serves any number of runs at once; it holds no run state."""

    def __init__(self, resources: Resources | None = None, env: Mapping[str, str] | None = None) -> None:
        self.resources = resources if resources is not None else Resources()
        self.env: dict[str, str] = dict(env or {})
        # Per graph (by identity; the graph is kept so its id is not reused): what its runs share.
        self._plans: dict[int, tuple[Graph, _Plan]] = {}

    def plan(self, graph: Graph) -> _Plan:
        cached = self._plans.get(id(graph))
        if cached is not None and cached[0] is graph:
            return cached[1]
        plan = _Plan.of(graph)
        if len(self._plans) >= PLAN_CACHE_SIZE:
            del self._plans[next(iter(self._plans))]
        self._plans[id(graph)] = (graph, plan)
        return plan

    async def run(
        self,
        graph: Graph,
        run: RunInfo,
        recorder: Recorder,
        *,
        state: RunState | None = None,
        handle: RunHandle | None = None,
    ) -> RunUpdate:
        """Execute (or resume, given ``state``) ``run`` of ``graph`` to its end.

        Emits ``workflow.started`` (unless ``state.started``), the node events, and always
        ``workflow.finished``, whose run update it returns. A cancellation from outside (the
        caller's scope) records nothing more and propagates: the run stays ``running`` for another
        worker to resume. Errors of the recorder propagate the same way.
        """
        execution = _Run(self, graph, run, recorder, state or RunState(), handle or RunHandle())
        return await execution.execute()


# --- one run -----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Plan:
    """What the runs of one graph share (read only): edges by index, each node's forward edges,
    and where a node goes when none of its edges has a `when` (known before it runs)."""

    edges: dict[int, Edge]
    forward_out: dict[str, list[Edge]]
    fixed: dict[str, _Decision]

    @classmethod
    def of(cls, graph: Graph) -> _Plan:
        forward_out = {n: [e for e in graph.outgoing.get(n, []) if not e.back] for n in graph.nodes}
        fixed: dict[str, _Decision] = {}
        for n in graph.nodes:
            out = graph.outgoing.get(n, [])
            if all(e.when is None for e in out):
                back = next((e for e in out if e.back), None)
                forward = [] if back is not None else [(e, True) for e in forward_out[n]]
                fixed[n] = _Decision(back=back, forward=forward)
        return cls({e.index: e for e in graph.edges}, forward_out, fixed)


_PENDING, _ACTIVE, _DONE = 0, 1, 2
"""A node's phase in its current pass: waiting for its inputs, started, ended (or skipped)."""


@dataclass(slots=True)
class _Decision:
    """Where a node that ended goes next: the back edge it takes, or its forward edges' fate."""

    back: Edge | None
    forward: list[tuple[Edge, bool]]


class _Run:
    def __init__(
        self,
        engine: Engine,
        graph: Graph,
        info: RunInfo,
        recorder: Recorder,
        state: RunState,
        handle: RunHandle,
    ) -> None:
        self.engine = engine
        self.graph = graph
        self.info = info
        self.recorder = recorder
        self.state = state
        self.handle = handle
        self.seq = state.last_seq
        self.broken: Exception | None = None
        # The latest event a node may depend on (its number), and the latest recorded: while
        # the one is not after the other, a node's inputs are durable and its ``node.started``
        # can be recorded while its agent runs (see ``emit_later``).
        self.depended = state.last_seq
        self.recorded = state.last_seq
        self.later = cast("LaterRecorder", recorder) if hasattr(recorder, "record_later") else None
        # Events taken by ``record_later`` and not yet finished, and whether a task finishes them.
        self.backlog: list[tuple[object, Event]] = []
        self.finishing = False
        # Held while skips are recorded: a node that another branch makes ready meanwhile may
        # depend on one of them, so it starts only once they are recorded (see ``advance``).
        self.skip_lock = anyio.Lock()
        self.skipping = 0
        self.slots = _Slots(graph.concurrency)
        # Map items get their own slots: a mapped node holds a node slot while its items run.
        self.item_limiter = anyio.CapacityLimiter(max(1, graph.concurrency))
        # Whether every guarded ``record`` so far returned without suspending (an in-memory
        # recorder): a node then goes on with its successor in its own task; otherwise it starts
        # its successors while its completion is being recorded, so their ``node.started`` joins
        # the same commit (see ``completed``).
        self.immediate = True
        plan = engine.plan(graph)
        self.edges = plan.edges
        self.forward_out = plan.forward_out
        self.fixed = plan.fixed
        self.replay: dict[tuple[str, int, int | None], NodeExecution] = {}
        for ex in state.executions:
            node = graph.nodes.get(ex.node)
            if node is None:
                continue
            if ex.status in (NodeStatus.SUCCEEDED, NodeStatus.SKIPPED) or (
                ex.status == NodeStatus.FAILED and node.on_error == "continue"
            ):
                self.replay[ex.key] = ex
        self.outputs: dict[str, Any] = {}
        # The latest attempt's ``details`` per execution key, until its ending event takes them.
        self.details: dict[tuple[str, int, int | None], dict[str, Any]] = {}
        self.iteration = dict.fromkeys(graph.nodes, 0)
        self.phase = dict.fromkeys(graph.nodes, _PENDING)
        self.resolved: dict[str, dict[int, bool]] = {n: {} for n in graph.nodes}
        self.steps = 0
        self.usage: Usage = {}
        self.stop: tuple[RunStatus, str] | None = None
        self.crash: Exception | None = None
        self.scope = anyio.CancelScope()
        self.deadlines = _Deadlines()
        self.run_vars = {"id": info.id, "graph": graph.name, "version": info.version}
        started = [ex.started_at for ex in state.executions if ex.started_at is not None]
        self.started_at: datetime = min(started) if started else utcnow()

    # --- the run as a whole ---

    async def execute(self) -> RunUpdate:
        if not self.state.started:
            await self.emit(
                EventType.WORKFLOW_STARTED,
                {"version": self.info.version, "input": self.info.input},
                RunUpdate(status=RunStatus.RUNNING, at=utcnow()),
            )
        try:
            with self.scope:
                self.handle._attach(self.scope)
                async with anyio.create_task_group() as tg:
                    self.begin(tg)
        finally:
            self.handle._detach()
            self.deadlines.close()
        if self.crash is not None:
            raise self.crash
        output: Any = None
        if self.stop is not None:
            status, error = self.stop
        elif self.handle.cancelled:
            status, error = RunStatus.CANCELLED, self.handle.reason
        else:
            status, error = RunStatus.SUCCEEDED, None
            try:
                output = self.final_output()
            except Exception as exc:
                status, error = RunStatus.FAILED, f"output: {describe(exc)}"
        at = utcnow()
        update = RunUpdate(status=status, at=at, output=output, error=error, usage=dict(self.usage))
        duration = round((at - self.started_at).total_seconds() * 1000)
        await self.emit(
            EventType.WORKFLOW_FINISHED,
            {
                "status": str(status),
                "output": output,
                "error": error,
                "duration_ms": duration,
                "usage": dict(self.usage),
            },
            update,
        )
        return update

    def begin(self, tg: anyio.abc.TaskGroup) -> None:
        self.tg = tg
        if not self.graph.entry:
            self.fail("the graph has no entry node (a node without incoming edges): nothing can start")
            return
        for name in self.graph.entry:
            self.phase[name] = _ACTIVE
            tg.start_soon(self.node_task, name, name=f"braid node {name}")

    def fail(self, error: str, status: RunStatus = RunStatus.FAILED) -> None:
        """End the run with ``error``, cancelling whatever still runs (the first failure wins)."""
        if self.stop is None:
            self.stop = (status, error)
        self.scope.cancel()

    @property
    def stopping(self) -> bool:
        """Whether a cancellation comes from the run itself (not from outside the engine)."""
        return self.stop is not None or self.handle.cancelled

    def final_output(self) -> Any:
        if self.graph.output is not None:
            return self.graph.output.evaluate(self.variables(None, 0))
        ran = [n for n in self.graph.nodes if not self.forward_out[n] and n in self.outputs]
        if len(ran) == 1:
            return self.outputs[ran[0]]
        return {n: self.outputs[n] for n in ran} if ran else None

    async def emit(
        self,
        type: EventType,
        data: dict[str, Any],
        change: NodeExecution | RunUpdate | None,
        *,
        guarded: bool = True,
    ) -> None:
        """Number ``data`` as the run's next event and record it.

        The number is taken and ``record`` entered with no suspension point in between, so the
        recorder is entered in sequence order while the calls of concurrent nodes overlap (the
        store commits them together; see ``Recorder``). Shielded, so a cancellation never leaves
        a gap in the sequence, and bounded, so a dead store cannot hang the run. Once a recording
        failed nothing more is recorded: the run stops there, to be resumed, without a gap.

        In a node task (``guarded``: not inside a scope of its own, as an agent's ``node.delta``
        is) the shield is the task's guard scope, and the deadline is set only if ``record``
        suspends."""
        event = self._next_event(type, data)
        guard = _GUARD.get() if guarded else None
        if guard is not None:
            await self._record_guarded(guard, event, change)
        else:
            await self._record_shielded(self.recorder.record(event, change), event)
        self.recorded = max(self.recorded, event.seq)

    def emit_later(
        self, type: EventType, data: dict[str, Any], change: NodeExecution, *, before_agent: bool = True
    ) -> bool:
        """Number ``data`` and have it recorded by a task of the run (one at a time, finishing
        what was taken meanwhile together), if that can be: a ``LaterRecorder`` that suspends,
        and, ``before_agent`` (a ``node.started``), every event a node may depend on recorded,
        so that a node's agent never runs on inputs that are not durable. False if not, and
        nothing is done.

        The event takes its place at once, so whatever the run records next is durable only
        after it; should recording it fail, the run stops there as it would in ``emit``."""
        if self.immediate or self.later is None or (before_agent and self.recorded < self.depended):
            return False
        event = self._next_event(type, data)
        self.backlog.append((self.later.record_later(event, change), event))
        if not self.finishing:
            self.finishing = True
            self.tg.start_soon(self._finish_backlog, self.later, name="braid record later")
        return True

    def _next_event(self, type: EventType, data: dict[str, Any]) -> Event:
        """``data`` as the run's next event (raising if recording already failed)."""
        if self.broken is not None:
            raise self.broken
        self.seq += 1
        if type not in _NOT_DEPENDED_ON:
            self.depended = self.seq
        return Event(self.info.id, self.seq, type, self.graph.name, data, utcnow())

    async def _finish_backlog(self, later: LaterRecorder) -> None:
        try:
            while self.backlog:
                batch, self.backlog = self.backlog, []
                last = batch[-1][1]
                await self._record_shielded(later.finish([taken for taken, _ in batch]), last)
                self.recorded = max(self.recorded, last.seq)
        except Exception as exc:
            if self.crash is None:
                self.crash = exc
            self.scope.cancel()
        finally:
            self.finishing = False

    async def _record_shielded(self, record: Awaitable[None], event: Event) -> None:
        with anyio.move_on_after(RECORD_TIMEOUT, shield=True) as scope:
            try:
                await record
            except Exception as exc:
                self.broken = exc
                raise
        if scope.cancelled_caught:
            self.broken = RecordTimeout(
                f"recording {event.type} took over {RECORD_TIMEOUT:g}s: is the store reachable?"
            )
            raise self.broken

    async def _record_guarded(
        self, guard: anyio.CancelScope, event: Event, change: NodeExecution | RunUpdate | None
    ) -> None:
        guard.shield = True
        try:
            record = self.recorder.record(event, change)
            try:
                step = record.send(None)
            except StopIteration:
                return  # recorded without suspending
            except Exception as exc:
                self.broken = exc
                raise
            self.immediate = False
            self.deadlines.add(guard, RECORD_TIMEOUT)
            try:
                await _resume(record, step)
            except anyio.get_cancelled_exc_class():
                if not guard.cancel_called:
                    raise
                raise self.record_timeout(event) from None
            except Exception as exc:
                self.broken = exc
                raise
            finally:
                self.deadlines.discard(guard, RECORD_TIMEOUT)
            if guard.cancel_called:  # cancelled at its deadline as the record returned
                raise self.record_timeout(event)
        finally:
            guard.shield = False

    def record_timeout(self, event: Event) -> RecordTimeout:
        self.broken = RecordTimeout(
            f"recording {event.type} took over {RECORD_TIMEOUT:g}s: is the store reachable?"
        )
        return self.broken

    def variables(self, node: str | None, iteration: int, *, copy: bool = False) -> dict[str, Any]:
        """The template context. ``copy``: for an agent, which may keep or change what it gets,
        so the run's data reaches it through copy-on-read views (no copying of what it does not
        read: outputs are JSON data copied once, by ``json_data``, when they are produced)."""
        outputs: Any = self.outputs
        run_input: Any = self.info.input
        if copy:
            outputs, run_input = _CopyOnRead(outputs), _guarded(run_input)
        return {
            "input": run_input,
            "outputs": outputs,
            "run": dict(self.run_vars),
            "iteration": iteration,
            "env": dict(self.engine.env),
        }

    # --- scheduling ---

    async def node_task(self, name: str) -> None:
        """Execute ``name``, then (with an immediate recorder) the nodes it makes ready, one
        after another while they end without suspending (no-op and template agents): a task
        costs more than such a node. The nodes still to run when one suspends get tasks of
        their own, so everything that waits still waits concurrently."""
        with anyio.CancelScope() as guard:
            _GUARD.set(guard)
            try:
                queue = deque([name])
                while queue:
                    run = self.run_node(queue.popleft())
                    try:
                        step = run.send(None)
                    except StopIteration as stop:
                        queue.extend(stop.value)
                        continue
                    while queue:
                        node = queue.popleft()
                        self.tg.start_soon(self.node_task, node, name=f"braid node {node}")
                    queue.extend(await _resume(run, step))
            except Exception as exc:  # the recorder failed: stop here, to be resumed later
                if self.crash is None:
                    self.crash = exc
                self.scope.cancel()

    async def run_node(self, name: str) -> list[str]:
        """Execute ``name`` in a slot, then advance: the ready nodes left to this task to run."""
        await self.slots.acquire()
        try:
            decision = await self.execute_node(name)
        finally:
            self.slots.release()
        if decision is None:
            return []
        return await self.advance(name, decision, inline=self.immediate)

    def resolve(self, name: str, decision: _Decision) -> tuple[list[tuple[str, int]], list[str]]:
        """Resolve the edges of ``name``, which just ended: the nodes to skip, and to start."""
        self.phase[name] = _DONE
        skipped: list[tuple[str, int]] = []
        ready: list[str] = []
        if decision.back is not None:
            self.reset(decision.back)
            ready.append(decision.back.target)
        else:
            self.propagate(deque(decision.forward), skipped, ready)
        return skipped, ready

    async def advance(self, name: str, decision: _Decision, *, inline: bool = False) -> list[str]:
        """Resolve the edges of ``name``, which just ended, then skip or start what that decides;
        with ``inline``, the nodes to start are returned for the caller's task to run instead."""
        skipped, ready = self.resolve(name, decision)
        return await self.launch(skipped, ready, inline=inline)

    async def launch(self, skipped: list[tuple[str, int]], ready: list[str], *, inline: bool) -> list[str]:
        if not skipped and not self.skipping:
            return self.start(ready, inline=inline)
        self.skipping += 1
        try:
            return await self.skip_then_start(skipped, ready, inline=inline)
        finally:
            self.skipping -= 1

    async def skip_then_start(
        self, skipped: list[tuple[str, int]], ready: list[str], *, inline: bool, locked: bool = False
    ) -> list[str]:
        """Record the skips, then start the ready nodes; the caller holds ``skipping`` up (and
        the skip lock if ``locked``).

        Skips are recorded one at a time; whatever starts or is skipped meanwhile (here or in
        another branch) may depend on them, so it waits until they are all recorded."""
        if not locked:
            async with self.skip_lock:
                return await self.skip_then_start(skipped, ready, inline=inline, locked=True)
        for node, iteration in skipped:
            await self.skip(node, iteration)
        return self.start(ready, inline=inline)

    def start(self, ready: list[str], *, inline: bool) -> list[str]:
        if inline:
            return ready
        for node in ready:
            self.tg.start_soon(self.node_task, node, name=f"braid node {node}")
        return []

    def propagate(
        self, work: deque[tuple[Edge, bool]], skipped: list[tuple[str, int]], ready: list[str]
    ) -> None:
        while work:
            edge, taken = work.popleft()
            target = edge.target
            if self.phase[target] != _PENDING:
                continue  # already started or ended in this pass: a node runs once per pass
            resolved = self.resolved[target]
            resolved[edge.index] = taken
            if len(resolved) < len(self.graph.incoming.get(target, [])):
                continue
            if any(resolved.values()):
                self.phase[target] = _ACTIVE
                ready.append(target)
            else:
                self.phase[target] = _DONE
                skipped.append((target, self.iteration[target]))
                work.extend((e, False) for e in self.forward_out[target])

    def reset(self, back: Edge) -> None:
        """Start another pass of the loop that ``back`` closes."""
        body = self.graph.loop_body.get(back.index, frozenset({back.target, back.source}))
        for node in body:
            self.iteration[node] += 1
            self.phase[node] = _PENDING
            self.resolved[node] = {
                i: taken for i, taken in self.resolved[node].items() if self.edges[i].source not in body
            }
        self.phase[back.target] = _ACTIVE

    async def skip(self, name: str, iteration: int) -> None:
        recorded = self.replay.get((name, iteration, None))
        if recorded is not None and recorded.status == NodeStatus.SKIPPED:
            return
        at = utcnow()
        ex = NodeExecution(node=name, iteration=iteration, status=NodeStatus.SKIPPED, finished_at=at)
        await self.emit(EventType.NODE_SKIPPED, {"node": name}, ex)

    def decide(self, name: str, output: Any, *, lenient: bool = False) -> _Decision:
        """Evaluate the ``when`` of every edge out of ``name`` given its ``output``. An expression
        error raises ``ExpressionError`` (a failure of ``name``), or, when ``lenient``, counts as
        false."""
        fixed = self.fixed.get(name)
        if fixed is not None:
            return fixed
        # The expressions see ``output`` as the node's: set it for the time of this (synchronous)
        # evaluation only, rather than copying every output into a new dict.
        outputs = self.outputs
        had, previous = name in outputs, outputs.get(name)
        outputs[name] = output
        try:
            return self._decide(name, lenient=lenient)
        finally:
            if had:
                outputs[name] = previous
            else:
                del outputs[name]

    def _decide(self, name: str, *, lenient: bool = False) -> _Decision:
        variables = self.variables(name, self.iteration[name])

        def taken(edge: Edge) -> bool:
            if edge.when is None:
                return True
            try:
                return bool(edge.when.evaluate(variables))
            except ExpressionError as exc:
                if lenient:
                    return False
                raise ExpressionError(f"edge {edge.source} → {edge.target}: {exc}") from None

        for edge in self.graph.outgoing.get(name, []):
            if edge.back and taken(edge):
                return _Decision(back=edge, forward=[])
        return _Decision(back=None, forward=[(e, taken(e)) for e in self.forward_out[name]])

    # --- executing one node ---

    async def execute_node(self, name: str) -> _Decision | None:
        """Run (or replay) one pass of ``name``; None when the run is to stop."""
        node = self.graph.nodes[name]
        iteration = self.iteration[name]
        self.steps += 1
        if self.steps > self.graph.max_steps:
            self.fail(f"run exceeded max_steps={self.graph.max_steps}: is a loop missing its exit condition?")
            return None
        recorded = self.replay.get((name, iteration, None))
        if recorded is not None and recorded.status != NodeStatus.SKIPPED:
            output = recorded.output
            if recorded.status == NodeStatus.FAILED and output is None:
                output = {"error": recorded.error}
            add_usage(self.usage, recorded.usage)
            self.outputs[name] = output
            return self.decide(name, output, lenient=True)
        ex = NodeExecution(node=name, iteration=iteration, status=NodeStatus.RUNNING, started_at=utcnow())
        try:
            if node.map is None:
                try:
                    output = await self.attempts(node, ex)
                except Exception as exc:
                    return await self.failed(node, ex, describe(exc))
                return await self.completed(node, ex, output)
            return await self.run_map(node, ex)
        except anyio.get_cancelled_exc_class():
            if self.stopping:
                await self.cancelled(ex)
            raise

    async def completed(
        self, node: Node, ex: NodeExecution, output: Any, *, leaf: bool = True
    ) -> _Decision | None:
        try:
            decision = self.decide(node.id, output)
        except ExpressionError as exc:
            return await self.failed(node, ex, str(exc), leaf=leaf)
        ex.status = NodeStatus.SUCCEEDED
        ex.output = output
        ex.error = None
        ex.finished_at = utcnow()
        if leaf:
            add_usage(self.usage, ex.usage)
        self.outputs[node.id] = output
        if self.immediate:
            await self.emit(EventType.NODE_COMPLETED, self.completed_data(ex), _snapshot(ex))
            return decision
        # Recording takes a round trip: the successors start now, and record their
        # ``node.started`` after this completion (in sequence, so in the same commit when the
        # store groups them); each runs its agent only once its ``node.started`` is recorded,
        # by then this completion too (``emit_later`` declines while this is not recorded).
        skipped, ready = self.resolve(node.id, decision)
        if not skipped and not self.skipping:
            # Nothing to start: the completion is recorded after the node's task ends (it is
            # durable before anything that depends on it runs, and before the run ends).
            if not ready and self.emit_later(
                EventType.NODE_COMPLETED, self.completed_data(ex), _snapshot(ex), before_agent=False
            ):
                return None
            if len(ready) > 1 and self.later is not None:
                # A fan-out: this completion is committed first, on its own, then the branches
                # start, their agents running while their ``node.started`` are recorded.
                await self.emit(EventType.NODE_COMPLETED, self.completed_data(ex), _snapshot(ex))
                self.start(ready, inline=False)
                return None
            self.start(ready, inline=False)
            await self.emit(EventType.NODE_COMPLETED, self.completed_data(ex), _snapshot(ex))
            return None
        # Skips to record (here or in another branch): as ``launch`` does, but holding the lock
        # from now on, so skips are recorded in the order their edges were resolved, before
        # whatever another branch makes ready meanwhile.
        self.skipping += 1
        try:
            async with self.skip_lock:
                await self.emit(EventType.NODE_COMPLETED, self.completed_data(ex), _snapshot(ex))
                await self.skip_then_start(skipped, ready, inline=False, locked=True)
        finally:
            self.skipping -= 1
        return None

    async def failed(
        self, node: Node, ex: NodeExecution, error: str, *, leaf: bool = True
    ) -> _Decision | None:
        ex.status = NodeStatus.FAILED
        ex.error = error
        ex.finished_at = utcnow()
        if leaf:
            add_usage(self.usage, ex.usage)
        data = self.with_details({"node": node.id, "error": error, "iteration": ex.iteration}, ex)
        if node.on_error == "continue":
            ex.output = {"error": error}
            decision = self.decide(node.id, ex.output, lenient=True)
            self.outputs[node.id] = ex.output
            await self.emit(EventType.NODE_FAILED, data, _snapshot(ex))
            return decision
        await self.emit(EventType.NODE_FAILED, data, _snapshot(ex))
        self.fail(f"node '{node.id}' failed: {error}")
        return None

    async def cancelled(self, ex: NodeExecution) -> None:
        """Record a node that the run's own cancellation interrupted."""
        if ex.started_at is None or ex.status.ended:
            return
        reason = self.stop[1] if self.stop is not None else self.handle.reason
        ex.status = NodeStatus.CANCELLED
        ex.error = f"cancelled: {reason}" if reason and reason != "cancelled" else "cancelled"
        ex.finished_at = utcnow()
        data: dict[str, Any] = {"node": ex.node, "error": ex.error, "iteration": ex.iteration}
        if ex.index is not None:
            data["index"] = ex.index
        await self.emit(EventType.NODE_FAILED, self.with_details(data, ex), _snapshot(ex))

    def with_details(self, data: dict[str, Any], ex: NodeExecution, *, keep: bool = False) -> dict[str, Any]:
        """``data`` plus ``details`` of the latest attempt of ``ex``, if it noted any; taken out
        of the run's keeping unless ``keep`` (another attempt follows)."""
        details = self.details.get(ex.key) if keep else self.details.pop(ex.key, None)
        if details:
            data["details"] = details
        return data

    def completed_data(self, ex: NodeExecution) -> dict[str, Any]:
        data: dict[str, Any] = {
            "node": ex.node,
            "output": ex.output,
            "duration_ms": ex.duration_ms,
            "attempts": ex.attempts,
            "usage": dict(ex.usage or {}),
            "iteration": ex.iteration,
        }
        if ex.index is not None:
            data["index"] = ex.index
        return self.with_details(data, ex)

    async def attempts(self, node: Node, ex: NodeExecution, item: Any = None) -> Any:
        """Run the agent until an attempt succeeds, retrying what is retryable; the last failure
        propagates. Cancellation is never retried nor swallowed."""
        index = ex.index
        attempt = 0

        def tagged(data: dict[str, Any]) -> dict[str, Any]:
            if index is not None:
                data["index"] = index
            return data

        async def emit_delta(text: str) -> None:
            data = tagged({"node": node.id, "delta": text})
            await self.emit(EventType.NODE_DELTA, data, None, guarded=False)

        async def once() -> Any:
            nonlocal attempt
            attempt += 1
            ex.attempts = attempt
            ex.status = NodeStatus.RUNNING
            ex.error = None
            started = tagged({"node": node.id, "attempt": attempt, "iteration": ex.iteration})
            if not self.emit_later(EventType.NODE_STARTED, started, _snapshot(ex)):
                await self.emit(EventType.NODE_STARTED, started, _snapshot(ex))
            variables = self.variables(node.id, ex.iteration, copy=True)
            if index is not None:
                variables["item"] = _guarded(item)
                variables["index"] = index
            ctx = NodeContext(
                run_id=self.info.id,
                graph=self.graph.name,
                node=node.id,
                attempt=attempt,
                iteration=ex.iteration,
                variables=variables,
                resources=self.engine.resources,
                index=index,
                _emit_delta=emit_delta,
                usage={},
            )
            try:
                # ``anyio.fail_after``, its deadline kept by the run's ``deadlines``
                with anyio.CancelScope() as scope:
                    self.deadlines.add(scope, node.timeout)
                    try:
                        return json_data(await node.agent.run(node.config, ctx), "output")
                    finally:
                        self.deadlines.discard(scope, node.timeout)
                raise TimeoutError  # the deadline cancelled the attempt
            except TimeoutError as exc:
                raise RetryableError(str(exc) or f"timed out after {node.timeout:g}s") from exc
            finally:
                if ctx.usage:
                    ex.usage = add_usage(ex.usage or {}, ctx.usage)
                if ctx.details:
                    self.details[ex.key] = _json_details(ctx.details)
                else:
                    self.details.pop(ex.key, None)

        async def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome is not None else None
            error = describe(exc) if exc is not None else "failed"
            ex.status = NodeStatus.RETRYING
            ex.error = error
            data = {
                "node": node.id,
                "attempt": state.attempt_number,
                "error": error,
                "delay": state.upcoming_sleep,
            }
            await self.emit(
                EventType.NODE_RETRYING, self.with_details(tagged(data), ex, keep=True), _snapshot(ex)
            )

        # The first attempt runs directly: tenacity (costly to set up) comes in only after a
        # retryable failure, which it takes as its own first attempt, so the attempt numbers,
        # the backoff and the events are exactly those of tenacity running every attempt.
        try:
            return await once()
        except Exception as exc:
            if node.retry.attempts <= 1 or not is_retryable(exc):
                raise
            failure: Exception | None = exc

        async def again() -> Any:
            nonlocal failure
            if failure is not None:
                first, failure = failure, None
                raise first
            return await once()

        retrying = AsyncRetrying(
            sleep=anyio.sleep,
            stop=stop_after_attempt(max(1, node.retry.attempts)),
            wait=retry_wait(node.retry),
            retry=retry_if_exception(lambda e: isinstance(e, Exception) and is_retryable(e)),
            before_sleep=before_sleep,
            reraise=True,
        )
        return await retrying(again)

    async def run_map(self, node: Node, ex: NodeExecution) -> _Decision | None:
        ex.attempts = 1
        await self.emit(
            EventType.NODE_STARTED, {"node": node.id, "attempt": 1, "iteration": ex.iteration}, _snapshot(ex)
        )
        assert node.map is not None
        try:
            items = node.map.evaluate(self.variables(node.id, ex.iteration))
        except ExpressionError as exc:
            return await self.failed(node, ex, str(exc))
        if not isinstance(items, list | tuple):
            error = f"map expression {node.map.source!r} gave {type(items).__name__}, not a list"
            return await self.failed(node, ex, error)
        items = list(items)
        results: list[Any] = [None] * len(items)
        failures: list[str] = []
        async with anyio.create_task_group() as tg:
            for index, item in enumerate(items):
                tg.start_soon(self.run_item, node, ex, index, item, results, failures, tg.cancel_scope)
        if failures:
            return await self.failed(node, ex, failures[0], leaf=False)
        return await self.completed(node, ex, results, leaf=False)

    async def run_item(
        self,
        node: Node,
        parent: NodeExecution,
        index: int,
        item: Any,
        results: list[Any],
        failures: list[str],
        siblings: anyio.CancelScope,
    ) -> None:
        with anyio.CancelScope() as guard:
            _GUARD.set(guard)
            async with self.item_limiter:
                await self.run_item_in_slot(node, parent, index, item, results, failures, siblings)

    async def run_item_in_slot(
        self,
        node: Node,
        parent: NodeExecution,
        index: int,
        item: Any,
        results: list[Any],
        failures: list[str],
        siblings: anyio.CancelScope,
    ) -> None:
        recorded = self.replay.get((node.id, parent.iteration, index))
        if recorded is not None and recorded.status != NodeStatus.SKIPPED:
            output = recorded.output
            if recorded.status == NodeStatus.FAILED and output is None:
                output = {"error": recorded.error}
            results[index] = output
            add_usage(self.usage, recorded.usage)
            parent.usage = add_usage(parent.usage or {}, recorded.usage)
            return
        ex = NodeExecution(
            node=node.id,
            iteration=parent.iteration,
            index=index,
            status=NodeStatus.RUNNING,
            started_at=utcnow(),
        )
        try:
            try:
                output = await self.attempts(node, ex, item)
            except Exception as exc:
                error = describe(exc)
                ex.status = NodeStatus.FAILED
                ex.error = error
                ex.finished_at = utcnow()
                if node.on_error == "continue":
                    ex.output = results[index] = {"error": error}
                data = {"node": node.id, "error": error, "iteration": ex.iteration, "index": index}
                await self.emit(EventType.NODE_FAILED, self.with_details(data, ex), _snapshot(ex))
                if node.on_error != "continue":
                    failures.append(f"item {index}: {error}")
                    siblings.cancel()
            else:
                ex.status = NodeStatus.SUCCEEDED
                ex.output = results[index] = output
                ex.finished_at = utcnow()
                await self.emit(EventType.NODE_COMPLETED, self.completed_data(ex), _snapshot(ex))
            finally:
                add_usage(self.usage, ex.usage)
                if ex.usage:
                    parent.usage = add_usage(parent.usage or {}, ex.usage)
        except anyio.get_cancelled_exc_class():
            if self.stopping or failures:
                await self.cancelled(ex)
            raise
