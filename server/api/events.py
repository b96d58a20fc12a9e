"""Live events over Server-Sent Events: one run's stream (``GET /runs/{id}/events``) and the
global feed of every run (``GET /events``).

Every stream follows the same order so that no event is lost and none is sent twice: subscribe
to the bus first, then replay what the store already holds after the client's cursor, then pass
the live events on, dropping the ones already sent. A subscriber dropped as too slow, or a gap
in the live sequence, is filled from the store: that is what resuming by id means server-side.

Each stream runs in its own task inside the response (sse-starlette's ``data_sender_callable``),
so a client that disconnects cancels it at once and its subscription is released with it.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any, Protocol, cast

import anyio
from litestar import Response, get
from litestar.di import NamedDependency
from litestar.exceptions import NotFoundException
from litestar.params import FromPath, HeaderParameter, QueryParameter
from litestar.types import ASGIApp
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import SendTimeoutError

from server.api.errors import query_bool, query_int
from server.braid import Braid
from server.bus.base import SubscriberTooSlow
from server.errors import NotFound
from server.events import Event
from server.status import LIFECYCLE_EVENTS, EventType
from server.store.base import Store

if TYPE_CHECKING:
    # sse-starlette's ASGI types (Starlette's), which its response's ``__call__`` takes.
    from starlette.types import Message, Receive, Scope, Send

log = logging.getLogger("braid.sse")

PING_SECONDS = 15.0
"""Keep-alive comment interval; the environment variable BRAID_SSE_PING overrides it (tests)."""

SEND_TIMEOUT_SECONDS = 30.0
"""A client that accepts no bytes for this long is disconnected (it can resume by id); the
environment variable BRAID_SSE_SEND_TIMEOUT overrides it (tests)."""

SHUTDOWN_GRACE_SECONDS = 1.0
"""At shutdown, streams end cleanly within this (less than uvicorn's graceful shutdown timeout)."""

REPLAY_PAGE = 500
MAX_DROPS = 3
"""A stream the bus drops this many times in a row without it sending anything ends (the bus is
closing or broken); its client reconnects and resumes by id."""

FEED_SEEN = 4096
"""How many recently sent global ids a feed remembers, to drop duplicates that arrive late."""

BODY_LIMIT = 64 * 1024
"""Bytes of frames a stream may hold unsent before its sender waits for the client."""


class StalledClients(logging.Filter):
    """uvicorn logs a stream that sse-starlette ended on its send timeout (a client that accepted
    no bytes for that long: a frozen tab, a stalled proxy) as an error with two tracebacks; that
    is the timeout doing its job, and it becomes one line at INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and _send_timed_out(record.exc_info[1]):
            record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
            record.msg = "an SSE client accepted nothing for %gs: its stream was closed (it resumes by id)"
            record.args = (send_timeout_seconds(),)
            record.exc_info, record.exc_text = None, None
        return True


def _send_timed_out(error: BaseException | None) -> bool:
    """Whether ``error`` was caused by sse-starlette's send timeout and nothing else (uvicorn gets
    Litestar's "caught after response started", caused by the stream's task group's exceptions)."""
    while error is not None:
        if isinstance(error, SendTimeoutError):
            return True
        if isinstance(error, BaseExceptionGroup):
            timed_out, rest = cast("BaseExceptionGroup[BaseException]", error).split(SendTimeoutError)
            return timed_out is not None and rest is None
        error = error.__cause__ or error.__context__
    return False


def quiet_stalled_clients() -> None:
    """Install ``StalledClients`` on uvicorn's error log (once)."""
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, StalledClients) for f in logger.filters):
        logger.addFilter(StalledClients())


class Frames(Protocol):
    """Where a stream's sender puts its frames: the response's ``Body``, or a memory stream."""

    def send_nowait(self, item: ServerSentEvent, /) -> None: ...

    async def send(self, item: ServerSentEvent, /) -> None: ...


Dispatch = Callable[[], Awaitable[None]]


def _seconds(variable: str, default: float) -> float:
    raw = os.environ.get(variable, "").strip()
    try:
        return float(raw) if raw else default
    except ValueError:
        return default


def ping_seconds() -> float:
    return _seconds("BRAID_SSE_PING", PING_SECONDS)


def send_timeout_seconds() -> float:
    return _seconds("BRAID_SSE_SEND_TIMEOUT", SEND_TIMEOUT_SECONDS)


def _encode(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, default=str)


def _run_frame(event: Event) -> ServerSentEvent:
    return ServerSentEvent(_encode(event.as_json()), event=str(event.type), id=str(event.seq))


def _feed_frame(event: Event) -> ServerSentEvent:
    return ServerSentEvent(
        _encode({**event.as_json(), "gid": event.gid}), event=str(event.type), id=str(event.gid)
    )


async def _send(out: Frames, frame: ServerSentEvent) -> None:
    """Queue a frame for the response: at once while there is room (no trip round the event loop
    per event), else waiting for the client to take some."""
    try:
        out.send_nowait(frame)
    except anyio.WouldBlock:
        await out.send(frame)


class Body:
    """An SSE response's body: the frames the stream's sender queued, each time the response
    asks for more all of them joined into one chunk, so the events of one commit reach the
    client in one write under one send timeout rather than one each. The sender waits while
    ``BODY_LIMIT`` bytes are unsent (a client that reads nothing is cut off by the response's
    send timeout). Its waits are bare asyncio futures, cheaper than a memory stream's: the
    server runs on asyncio (uvicorn), and a cancelled task stops waiting as with anyio's."""

    def __init__(self, limit: int = BODY_LIMIT) -> None:
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self._closed = False
        self._more: asyncio.Future[None] | None = None  # the response, waiting for frames
        self._room: asyncio.Future[None] | None = None  # the sender, waiting for the client

    def send_nowait(self, item: ServerSentEvent, /) -> None:
        """Queue a frame; ``anyio.WouldBlock`` while the body is full."""
        if self._closed:
            raise anyio.ClosedResourceError
        if self._size >= self._limit:
            raise anyio.WouldBlock
        chunk = item.encode()
        self._chunks.append(chunk)
        self._size += len(chunk)
        _wake(self._more)

    async def send(self, item: ServerSentEvent, /) -> None:
        """Queue a frame once the client has taken enough of the earlier ones."""
        while self._size >= self._limit and not self._closed:
            self._room = asyncio.get_running_loop().create_future()
            try:
                await self._room
            finally:
                self._room = None
        self.send_nowait(item)

    def close(self) -> None:
        """No more frames: the response sends what is queued, then ends."""
        self._closed = True
        _wake(self._more)
        _wake(self._room)

    def __aiter__(self) -> Body:
        return self

    async def __anext__(self) -> bytes:
        while not self._chunks:
            if self._closed:
                raise StopAsyncIteration
            self._more = asyncio.get_running_loop().create_future()
            try:
                await self._more
            finally:
                self._more = None
        chunks = self._chunks
        self._chunks, self._size = [], 0
        _wake(self._room)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class _Response(EventSourceResponse):
    """sse-starlette's response with its closing send (``more_body: False``) bounded by the send
    timeout as its data sends are: once a run's last event was written into a stalled client's
    buffers, that send waited for the client with no bound, holding the stream's tasks until the
    client went away."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        timeout = self.send_timeout

        async def send_bounded(message: Message) -> None:
            if timeout is None or message["type"] != "http.response.body" or message.get("more_body"):
                await send(message)
                return
            with anyio.move_on_after(timeout) as bound:
                await send(message)
            if bound.cancel_called:
                raise SendTimeoutError

        await super().__call__(scope, receive, send_bounded)


class _Shutdown:
    """The ``shutdown_event`` sse-starlette sets when the server shuts down: it cancels the
    stream's sender at once, so the stream ends cleanly (a task waiting on an ``anyio.Event``
    did the same, at the cost of a task and a task group per stream)."""

    def __init__(self) -> None:
        self.scope: anyio.CancelScope | None = None
        self.called = False

    def set(self) -> None:
        self.called = True
        if self.scope is not None:
            self.scope.cancel()


def _sse(produce: Callable[[Frames], Awaitable[None]], ping: float | None = None) -> EventSourceResponse:
    """An SSE response whose frames ``produce`` sends from a task of the response's own task group
    (cancelled when the client goes away; the stream ends when ``produce`` returns, or cleanly at
    server shutdown so that clients reconnect and resume by id)."""
    body = Body()
    shutdown = _Shutdown()

    async def sender() -> None:
        try:
            with anyio.CancelScope() as shutdown.scope:
                if shutdown.called:
                    shutdown.scope.cancel()
                try:
                    await produce(body)
                except Exception:
                    # The client sees the stream end and resumes by id.
                    log.exception("event stream failed")
        finally:
            body.close()

    return _Response(
        body,
        data_sender_callable=sender,
        ping=ping_seconds() if ping is None else ping,
        send_timeout=send_timeout_seconds(),
        # sse-starlette only calls ``set()`` on it.
        shutdown_event=cast("anyio.Event", shutdown),
        shutdown_grace_period=SHUTDOWN_GRACE_SECONDS,
    )


# --- one run -----------------------------------------------------------------------------------


async def _produce_run(
    braid: Braid, run_id: str, after: int, out: Frames, dispatch: Dispatch | None = None
) -> None:
    """Send the run's events with ``seq > after`` in order, without gaps, until workflow.finished.

    ``dispatch`` queues a run that was created but not queued yet: it is called once subscribed,
    and then nothing needs replaying from the store (nothing of the run was persisted before)."""
    last = after
    early: dict[int, Event] = {}  # live events that arrived ahead of a missing one

    async def emit(event: Event) -> bool:
        nonlocal last
        await _send(out, _run_frame(event))
        last = event.seq
        return event.type is EventType.WORKFLOW_FINISHED

    async def catch_up() -> bool:
        # Only ever send the next number: an event persisted out of order fills in later.
        while True:
            events = await braid.store.events(run_id, last, REPLAY_PAGE)
            for event in events:
                if event.seq <= last:
                    continue
                if event.seq != last + 1:
                    return False
                if await emit(event):
                    return True
            if len(events) < REPLAY_PAGE:
                return False

    async def emit_early() -> bool:
        for seq in [seq for seq in early if seq <= last]:
            del early[seq]
        while last + 1 in early:
            if await emit(early.pop(last + 1)):
                return True
        return False

    # What the store already holds goes first, without the bus: a run that ended replays from
    # the database alone (even while Redis is away); a live one is then followed from where
    # this left off (subscribed first, then caught up again, so nothing falls in between).
    if dispatch is None and (await catch_up() or await emit_early()):
        return
    checked_run = False
    drops = 0
    while drops <= MAX_DROPS:
        resumed_at = last
        async with braid.bus.subscribe(run_id) as subscription:
            if dispatch is not None:
                await dispatch()
                dispatch = None
                checked_run = True  # a run queued just now: its workflow.finished is yet to come
            elif await catch_up() or await emit_early():
                return
            if not checked_run:
                checked_run = True
                if (await braid.store.get_run(run_id)).status.ended:
                    # Ended while we replayed (or, defensively, without a workflow.finished).
                    await catch_up()
                    return
            try:
                while True:
                    event = await subscription.receive()
                    if event.seq <= last:
                        if event.type is EventType.WORKFLOW_FINISHED:
                            return  # the client's cursor was past the end
                        continue
                    early[event.seq] = event
                    if await emit_early():
                        return
                    if early and (await catch_up() or await emit_early()):
                        return
            except SubscriberTooSlow as exc:
                drops = 0 if last > resumed_at else drops + 1
                log.info("run %s: %s; resuming from %d", run_id, exc, last)
    log.warning("run %s: the event bus keeps dropping this stream; ending it at %d", run_id, last)


async def stream_run(
    braid: Braid, run_id: str, after: int = 0, dispatch: Dispatch | None = None
) -> EventSourceResponse:
    """The SSE stream of one run's events after ``after`` (used by ``GET /runs/{id}/events`` and by
    ``POST /graphs/{name}/runs?stream=true``); it closes after ``workflow.finished``.

    ``dispatch`` queues a run created but not queued yet (a streamed start): the stream calls it
    once subscribed, or, should the stream end before (the client left at once), on its way out,
    so that a run accepted is always queued."""
    once = _Once(dispatch) if dispatch is not None else None

    async def produce(out: Frames) -> None:
        try:
            await _produce_run(braid, run_id, after, out, once)
        finally:
            if once is not None and not once.called:
                with anyio.CancelScope(shield=True):
                    try:
                        await once()
                    except Exception:
                        log.exception("run %s: could not be queued", run_id)

    return _sse(produce)


class _Once:
    """Calls ``dispatch`` on the first call only."""

    def __init__(self, dispatch: Dispatch) -> None:
        self._dispatch = dispatch
        self.called = False

    async def __call__(self) -> None:
        if not self.called:
            self.called = True
            await self._dispatch()


# --- the global feed ---------------------------------------------------------------------------


async def last_gid(store: Store) -> int:
    """The highest global event id (0 when there are no events), in O(log n) store reads."""
    known, step = 0, 1024
    while True:
        beyond = await store.feed(after=known + step, limit=1, deltas=True)
        if beyond and beyond[0].gid is not None:
            known, step = beyond[0].gid, step * 2
            continue
        following = await store.feed(after=known, limit=1, deltas=True)
        if not following or following[0].gid is None:
            return known
        known, step = following[0].gid, max(1, step // 2)


async def _feed_page(store: Store, after: int, graph: str | None, deltas: bool) -> list[Event]:
    return await store.feed(after=after, limit=REPLAY_PAGE, graph=graph, deltas=deltas)


async def feed_tail(store: Store, top: int, count: int, graph: str | None, deltas: bool) -> list[Event]:
    """The last ``count`` feed events with ``gid <= top``, oldest first."""
    width = max(64, count * 4)
    while True:
        start = max(0, top - width)
        events: list[Event] = []
        cursor = start
        while True:
            page = await _feed_page(store, cursor, graph, deltas)
            events.extend(e for e in page if e.gid is not None and e.gid <= top)
            if len(page) < REPLAY_PAGE or not page or (page[-1].gid or 0) >= top:
                break
            cursor = page[-1].gid or cursor
        if len(events) >= count or start == 0:
            return events[-count:] if count else []
        width *= 8


async def _produce_feed(
    braid: Braid, after: int, replay: int, graph: str | None, deltas: bool, out: Frames
) -> None:
    """Send the last ``replay`` matching events up to ``after``, then every one after it, then
    the live ones, forever."""
    store = braid.store
    floor = 0  # every event at or below it is already with the client
    seen: set[int] = set()
    order: deque[int] = deque()
    sent = 0

    def wanted(event: Event) -> bool:
        return (deltas or event.type in LIFECYCLE_EVENTS) and (graph is None or event.graph == graph)

    async def emit(event: Event) -> None:
        nonlocal floor, sent
        gid = event.gid
        if gid is None or gid <= floor or gid in seen:
            return
        await _send(out, _feed_frame(event))
        sent += 1
        seen.add(gid)
        order.append(gid)
        if len(order) > FEED_SEEN:
            oldest = order.popleft()
            seen.discard(oldest)
            floor = max(floor, oldest)

    async def catch_up() -> None:
        # Global ids are committed (and published) slightly out of order across runs: re-read
        # from the floor (at most FEED_SEEN events back) and let ``emit`` drop what was sent.
        cursor = floor
        while True:
            page = await _feed_page(store, cursor, graph, deltas)
            for event in page:
                await emit(event)
            if len(page) < REPLAY_PAGE:
                return
            cursor = page[-1].gid or cursor

    started = False
    drops = 0
    while drops <= MAX_DROPS:
        resumed_at = sent
        async with braid.bus.subscribe(None) as subscription:
            if not started:
                started = True
                floor = after
                if replay > 0:
                    for event in await feed_tail(store, after, replay, graph, deltas):
                        await _send(out, _feed_frame(event))
            await catch_up()
            try:
                while True:
                    event = await subscription.receive()
                    if wanted(event):
                        await emit(event)
            except SubscriberTooSlow as exc:
                drops = 0 if sent > resumed_at else drops + 1
                log.info("event feed: %s; resuming from the store", exc)
    log.warning("the event bus keeps dropping the event feed; ending it (clients resume by id)")


async def stream_feed(
    braid: Braid, after: int | None = None, *, replay: int = 0, graph: str | None = None, deltas: bool = False
) -> EventSourceResponse:
    """The SSE feed of every run's events (lifecycle only unless ``deltas``), ids being global.

    Without a cursor the feed starts after the last event stored when the request came, read
    before the response opens: a client that sees the stream open and then starts runs gets all
    of their events. (Read once the stream ran, under load seconds later, it skipped every event
    stored in between.) ``replay`` counts back from there."""
    start = after
    if start is None:
        start = await last_gid(braid.store)
    tail = replay if after is None else 0

    async def produce(out: Frames) -> None:
        await _produce_feed(braid, start, tail, graph, deltas, out)

    return _sse(produce)


# --- handlers ----------------------------------------------------------------------------------


MAX_CURSOR = 2**63 - 1
"""Event ids are 64-bit database integers."""


def _cursor(name: str, raw: str | None) -> int | None:
    """A cursor or count (``after``, ``Last-Event-ID``, ``replay``); blank is absent, a bad one a 422."""
    return query_int(raw.strip() if raw is not None else None, name, minimum=0, maximum=MAX_CURSOR)


def _after(query: str | None, header: str | None) -> int | None:
    """The client's cursor: the later of ``?after=`` and ``Last-Event-ID``. A browser's EventSource
    reconnects to the same URL (its original ``?after=``) with a newer ``Last-Event-ID``."""
    cursors = [c for c in (_cursor("after", query), _cursor("Last-Event-ID", header)) if c is not None]
    return max(cursors) if cursors else None


def _wants_json(accept: str | None) -> bool:
    types = {part.split(";")[0].strip().lower() for part in (accept or "").split(",")}
    return "application/json" in types and "text/event-stream" not in types


LastEventId = Annotated[str | None, HeaderParameter(name="Last-Event-ID", required=False)]
Accept = Annotated[str | None, HeaderParameter(name="Accept", required=False)]


@get("/runs/{run_id:str}/events", summary="A run's events (SSE, or a JSON list)", tags=["runs"])
async def run_events(
    braid: NamedDependency[Braid],
    run_id: FromPath[str],
    after: Annotated[str | None, QueryParameter(name="after", required=False)] = None,
    last_event_id: LastEventId = None,
    accept: Accept = None,
) -> ASGIApp:
    """The run's events as Server-Sent Events (``id`` = the event's number in the run), closing
    after ``workflow.finished``; resume with ``Last-Event-ID`` or ``?after=N``. With
    ``Accept: application/json``, the JSON list of the events after N."""
    cursor = _after(after, last_event_id) or 0
    try:
        await braid.store.get_run(run_id)
    except NotFound as exc:
        raise NotFoundException(str(exc)) from None
    if _wants_json(accept):
        events = await braid.store.events(run_id, cursor)
        # Litestar serializes its own Response and passes any other ASGI app through untouched.
        return cast("ASGIApp", Response([event.as_json() for event in events]))
    return cast("ASGIApp", await stream_run(braid, run_id, cursor))


@get("/events", summary="Every run's lifecycle events (SSE)", tags=["runs"])
async def feed(
    braid: NamedDependency[Braid],
    after: Annotated[str | None, QueryParameter(name="after", required=False)] = None,
    last_event_id: LastEventId = None,
    graph: Annotated[str | None, QueryParameter(name="graph", required=False)] = None,
    deltas: Annotated[str | None, QueryParameter(name="deltas", required=False)] = None,
    replay: Annotated[str | None, QueryParameter(name="replay", required=False)] = None,
) -> EventSourceResponse:
    """All runs' events (no ``node.delta`` unless ``?deltas=true``; ``?graph=`` filters), ``id``
    being the global id. Resume with ``Last-Event-ID`` or ``?after=N``; without a cursor the feed
    starts with live events, after the last ``?replay=N`` ones."""
    cursor = _after(after, last_event_id)
    last_n = _cursor("replay", replay) or 0
    with_deltas = query_bool(deltas, "deltas")
    return await stream_feed(braid, cursor, replay=min(last_n, 10_000), graph=graph, deltas=with_deltas)


@get("/debug/subscribers", include_in_schema=False)
async def debug_subscribers(braid: NamedDependency[Braid]) -> dict[str, int]:
    """Live bus subscribers and asyncio tasks of this process (tests check nothing leaks)."""
    count: Any = getattr(braid.bus, "subscriber_count", -1)
    if callable(count):
        count = count()
    return {"subscribers": int(count), "tasks": len(asyncio.all_tasks())}


@get("/debug/collector", include_in_schema=False)
async def debug_collector(braid: NamedDependency[Braid]) -> dict[str, Any]:
    """This process's young-collection threshold, and whether the open Braid is out of the
    garbage collector's reach (``braid serve`` sees to both: ``server.collector``)."""
    return {
        "young_threshold": gc.get_threshold()[0],
        # get_objects() leaves out the frozen (permanent) generation.
        "braid_frozen": not any(obj is braid for obj in gc.get_objects()),
    }


def _handlers() -> list[Any]:
    handlers: list[Any] = [run_events, feed]
    if os.environ.get("BRAID_DEBUG") == "1":
        handlers += [debug_subscribers, debug_collector]
    return handlers


event_handlers = _handlers()
"""The route handlers ``create_app`` registers (``/debug/subscribers`` only with BRAID_DEBUG=1)."""
