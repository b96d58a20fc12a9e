"""The event bus contract, against the embedded bus and against Redis."""

from __future__ import annotations

import math
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from typing import Any

import anyio
import pytest

from server.bus.base import SubscriberTooSlow, Subscription
from server.bus.memory import MemoryBus
from server.bus.redis import STREAMS_PER_READER, RedisBus
from server.errors import Unavailable
from server.events import Event
from server.keys import Keys
from server.queue.redis import connect
from server.status import EventType
from tests.services import require_redis

Bus = MemoryBus | RedisBus


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Backend:
    """Makes buses: a fresh in-process bus, or Redis buses sharing one test prefix (like the API
    and worker processes of one deployment)."""

    def __init__(self, kind: str, url: str = "") -> None:
        self.kind = kind
        self.url = url
        self.keys = Keys(f"braid-test-{uuid.uuid4().hex[:12]}")
        self.buses: list[Bus] = []

    def bus(self, *, buffer_size: int = 10_000, run_stream_ttl: int = 3600) -> Bus:
        bus: Bus
        if self.kind == "memory":
            bus = MemoryBus(buffer_size)
        else:
            bus = RedisBus(
                self.url,
                prefix=self.keys.prefix,
                buffer_size=buffer_size,
                run_stream_ttl=run_stream_ttl,
                block_ms=500,
            )
        self.buses.append(bus)
        return bus

    async def close(self) -> None:
        for bus in self.buses:
            await bus.close()
        if self.kind == "redis":
            async with connect(self.url) as redis:
                keys = [key async for key in redis.scan_iter(match=self.keys.pattern)]
                if keys:
                    await redis.delete(*keys)


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest, anyio_backend: str) -> AsyncIterator[Backend]:
    url = require_redis() if request.param == "redis" else ""
    backend = Backend(request.param, url)
    try:
        yield backend
    finally:
        await backend.close()


_gid = iter(range(1, 1_000_000))


def event(run_id: str, seq: int, type: EventType = EventType.NODE_STARTED, **data: Any) -> Event:
    return Event(
        run_id=run_id,
        seq=seq,
        type=type,
        graph="brief",
        data=data or {"node": f"n{seq}", "attempt": 1, "iteration": 0},
        at=datetime.now(UTC),
        gid=next(_gid),
    )


async def receive(subscription: Subscription, count: int) -> list[Event]:
    with anyio.fail_after(5):
        return [await subscription.receive() for _ in range(count)]


@pytest.mark.anyio
async def test_run_subscriber_gets_its_run_in_order(backend: Backend) -> None:
    bus = backend.bus()
    a = [event("a", 1), event("a", 2, EventType.NODE_DELTA, node="n", delta="héllo"), event("a", 3)]
    b = [event("b", 1)]
    async with bus.subscribe("a") as subscription:
        for e in [a[0], b[0], a[1], a[2]]:
            await bus.publish(e)

        assert await receive(subscription, 3) == a  # every field (gid, time, data) intact


@pytest.mark.anyio
async def test_global_subscriber_gets_every_run(backend: Backend) -> None:
    bus = backend.bus()
    events = [
        event("a", 1),
        event("b", 1),
        event("a", 2),
        event("c", 1, EventType.WORKFLOW_FINISHED, status="failed"),
    ]
    async with bus.subscribe() as subscription:
        for e in events:
            await bus.publish(e)

        assert await receive(subscription, 4) == events


@pytest.mark.anyio
async def test_publish_many_delivers_them_in_order(backend: Backend) -> None:
    bus = backend.bus()
    events = [event("a", seq) for seq in range(1, 41)] + [event("b", 1)]
    async with bus.subscribe("a") as run, bus.subscribe() as feed:
        await bus.publish_many(events)
        await bus.publish_many([])

        assert await receive(run, 40) == events[:40]
        assert await receive(feed, 41) == events


@pytest.mark.anyio
async def test_live_from_subscribe(backend: Backend) -> None:
    bus = backend.bus()
    await bus.publish(event("a", 1))  # before: the caller reads it from the database instead

    async with bus.subscribe("a") as run, bus.subscribe() as feed:
        await bus.publish(event("a", 2))  # right after subscribe returned: never lost

        assert [e.seq for e in await receive(run, 1)] == [2]
        assert [(e.run_id, e.seq) for e in await receive(feed, 1)] == [("a", 2)]


@pytest.mark.anyio
async def test_slow_subscriber_is_dropped_fast_one_keeps_up(backend: Backend) -> None:
    bus = backend.bus(buffer_size=5)
    async with bus.subscribe("a") as slow, bus.subscribe("a") as fast:
        for seq in range(1, 21):
            await bus.publish(event("a", seq))
            assert [e.seq for e in await receive(fast, 1)] == [seq]

        with anyio.fail_after(5):
            # the slow one never read: it holds at most 5 events, and is dropped at the 6th
            while slow.dropped is None:  # noqa: ASYNC110 (Redis: its reader task gets there)
                await anyio.sleep(0.01)
        with pytest.raises(SubscriberTooSlow):
            await slow.receive()


@pytest.mark.anyio
async def test_leaving_leaves_nothing_behind(backend: Backend) -> None:
    bus = backend.bus()
    async with bus.subscribe("a"), bus.subscribe("a"), bus.subscribe():
        assert bus.subscriber_count == 3
    with pytest.raises(KeyError):  # an error inside the block comes out as itself
        async with bus.subscribe("a"):
            raise KeyError("boom")

    assert bus.subscriber_count == 0
    if isinstance(bus, RedisBus):
        await reader_gone(bus)
    await bus.publish(event("a", 1))  # nobody listening: fine


async def reader_gone(bus: RedisBus) -> None:
    """The bus's reader ends once nothing is followed, at its next reply (``block_ms`` at most)."""
    with anyio.fail_after(5):
        while bus.reader_count:  # noqa: ASYNC110 (the reader task ends on its own)
            await anyio.sleep(0.01)


@pytest.mark.anyio
async def test_close_ends_subscriptions(backend: Backend) -> None:
    bus = backend.bus()
    async with bus.subscribe("a") as subscription:
        await bus.close()
        with anyio.fail_after(5), pytest.raises(SubscriberTooSlow):
            await subscription.receive()


@pytest.fixture
async def redis_backend(anyio_backend: str) -> AsyncIterator[Backend]:
    backend = Backend("redis", require_redis())
    try:
        yield backend
    finally:
        await backend.close()


@pytest.mark.anyio
async def test_redis_events_cross_processes(redis_backend: Backend) -> None:
    api, worker = redis_backend.bus(), redis_backend.bus()
    async with api.subscribe("a") as subscription:
        await worker.publish(event("a", 1))
        assert [e.seq for e in await receive(subscription, 1)] == [1]


@pytest.mark.anyio
async def test_redis_run_stream_expires_after_the_run_finished(redis_backend: Backend) -> None:
    bus = redis_backend.bus(run_stream_ttl=60)
    stream = redis_backend.keys.run_events("a")
    async with connect(redis_backend.url) as redis:
        await bus.publish(event("a", 1))
        assert await redis.ttl(stream) > 60  # an unfinished run's stream lives on, but not forever

        await bus.publish(event("a", 2, EventType.WORKFLOW_FINISHED, status="succeeded"))

        assert 0 < await redis.ttl(stream) <= 60
        assert await redis.xlen(redis_backend.keys.events) == 2


@pytest.mark.anyio
async def test_redis_publishes_a_batch_in_order_and_after_redis_forgot_its_scripts(
    redis_backend: Backend,
) -> None:
    bus = redis_backend.bus(run_stream_ttl=60)
    async with connect(redis_backend.url) as redis, bus.subscribe(None) as feed:
        async with anyio.create_task_group() as tg:  # published at once: one batch
            for run_id, seq in [("a", 1), ("b", 1), ("a", 2), ("b", 2)]:
                tg.start_soon(bus.publish, event(run_id, seq))
        got = await receive(feed, 4)
        assert [e.seq for e in got if e.run_id == "a"] == [1, 2]
        assert [e.seq for e in got if e.run_id == "b"] == [1, 2]
        assert await redis.xlen(redis_backend.keys.run_events("a")) == 2

        await redis.script_flush()  # as a Redis restarted empty would
        await bus.publish(event("a", 3, EventType.WORKFLOW_FINISHED, status="succeeded"))
        assert [e.seq for e in await receive(feed, 1)] == [3]
        assert 0 < await redis.ttl(redis_backend.keys.run_events("a")) <= 60


@pytest.mark.anyio
async def test_redis_subscriptions_of_one_stream_share_one_reader(redis_backend: Backend) -> None:
    """More SSE clients of one run (and of the feed) than redis-py's pool has connections (100):
    each stream is read once for all of them, so every one subscribes and gets every event."""
    api, worker = redis_backend.bus(), redis_backend.bus()
    count = 150
    async with AsyncExitStack() as stack:
        runs = [await stack.enter_async_context(api.subscribe("a")) for _ in range(count)]
        feeds = [await stack.enter_async_context(api.subscribe(None)) for _ in range(count)]

        sent = [event("a", 1), event("a", 2)]
        await worker.publish_many(sent)

        for subscription in runs + feeds:
            assert await receive(subscription, 2) == sent
        assert isinstance(api, RedisBus)
        assert api.reader_count == 1
    await reader_gone(api)


@pytest.mark.anyio
async def test_redis_a_stream_is_read_on_when_its_first_subscription_leaves(redis_backend: Backend) -> None:
    api, worker = redis_backend.bus(), redis_backend.bus()
    assert isinstance(api, RedisBus)
    reading, leave = anyio.Event(), anyio.Event()

    async def first() -> None:
        async with api.subscribe("a") as subscription:  # the first: the stream is followed anew
            await worker.publish(event("a", 1))
            assert [e.seq for e in await receive(subscription, 1)] == [1]
            reading.set()
            await leave.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        await reading.wait()
        async with api.subscribe("a") as stays:
            leave.set()  # the first subscription leaves; this one reads on from where it was
            await worker.publish(event("a", 2))
            await worker.publish_many([event("a", 3), event("a", 4)])

            assert [e.seq for e in await receive(stays, 3)] == [2, 3, 4]
            assert api.reader_count == 1


@pytest.mark.anyio
async def test_redis_joining_a_reader_misses_nothing_published_after_subscribe(
    redis_backend: Backend,
) -> None:
    api, worker = redis_backend.bus(), redis_backend.bus()
    async with api.subscribe("a") as early:
        await worker.publish(event("a", 1))
        assert [e.seq for e in await receive(early, 1)] == [1]
        for seq in range(2, 12):
            async with api.subscribe("a") as late:
                await worker.publish(event("a", seq))  # right after subscribe returned
                assert [e.seq for e in await receive(late, 1)] == [seq]
        assert [e.seq for e in await receive(early, 10)] == list(range(2, 12))


@pytest.mark.anyio
async def test_redis_away_every_subscription_waiting_on_the_first_fails_unavailable() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    bus = RedisBus(f"redis://127.0.0.1:{port}/0", prefix="braid-test-away", block_ms=500)
    outcomes: list[str] = []

    async def subscribe() -> None:
        try:
            async with bus.subscribe("a"):
                outcomes.append("subscribed")
        except Unavailable:
            outcomes.append("unavailable")

    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for _ in range(3):  # the first reads the starting point, the others wait for it
                    tg.start_soon(subscribe)
    finally:
        await bus.close()
    assert outcomes == ["unavailable"] * 3
    assert bus.subscriber_count == 0


@pytest.mark.anyio
async def test_redis_runs_followed_at_once_share_readers_and_connections(redis_backend: Backend) -> None:
    """150 runs streamed at once (more than redis-py's default pool of 100) all subscribe and get
    their run's events, read in groups by one XREAD each on a connection each: the bus holds a
    handful of connections, not one per run."""
    api, worker = redis_backend.bus(), redis_backend.bus()
    assert isinstance(api, RedisBus)
    count = 150
    async with AsyncExitStack() as stack, connect(redis_backend.url) as admin:
        subscriptions = [await stack.enter_async_context(api.subscribe(f"run{i}")) for i in range(count)]
        await worker.publish_many([event(f"run{i}", 1) for i in range(count)])
        for i, subscription in enumerate(subscriptions):
            assert [(e.run_id, e.seq) for e in await receive(subscription, 1)] == [(f"run{i}", 1)]
        await worker.publish_many([event(f"run{i}", 2) for i in reversed(range(count))])
        for i, subscription in enumerate(subscriptions):
            assert [(e.run_id, e.seq) for e in await receive(subscription, 1)] == [(f"run{i}", 2)]

        readers = math.ceil(count / STREAMS_PER_READER)
        assert api.reader_count == readers
        name = f"{redis_backend.keys.prefix}-bus"
        clients = [c for c in await admin.client_list() if c.get("name") == name]
        assert readers <= len(clients) <= readers + 2 * 2  # the API's and the worker's buses


@pytest.mark.anyio
async def test_redis_a_full_reader_makes_room_for_a_stream_when_one_of_its_streams_is_left(
    redis_backend: Backend,
) -> None:
    """A reader follows STREAMS_PER_READER streams at most, the next ones get another reader; a
    stream left frees its place at once, and the stream after takes it (no third reader; its
    reader, blocked for 30 s here, is woken for it) and gets its events at once."""
    api = RedisBus(redis_backend.url, prefix=redis_backend.keys.prefix, block_ms=30_000)
    worker = redis_backend.bus()
    try:
        async with AsyncExitStack() as stack:
            first = await stack.enter_async_context(AsyncExitStack())
            await first.enter_async_context(api.subscribe("r0"))
            count = 2 * STREAMS_PER_READER
            rest = [await stack.enter_async_context(api.subscribe(f"r{i}")) for i in range(1, count)]
            assert api.reader_count == 2
            await first.aclose()  # r0 is left: a place in the first reader
            async with api.subscribe("next") as later:
                assert api.reader_count == 2
                await worker.publish_many([event("next", 1), event("r1", 1), event(f"r{count - 1}", 1)])
                assert [(e.run_id, e.seq) for e in await receive(later, 1)] == [("next", 1)]
                assert [(e.run_id, e.seq) for e in await receive(rest[0], 1)] == [("r1", 1)]
                assert [(e.run_id, e.seq) for e in await receive(rest[-1], 1)] == [(f"r{count - 1}", 1)]
    finally:
        await api.close()


@pytest.mark.anyio
async def test_redis_a_run_followed_while_the_reader_waits_on_others_is_read_at_once(
    redis_backend: Backend,
) -> None:
    """The reader blocks in XREAD on the streams it follows (30 s here); a stream followed
    meanwhile wakes it, so its events come at once, not when the XREAD times out."""
    api = RedisBus(redis_backend.url, prefix=redis_backend.keys.prefix, block_ms=30_000)
    worker = redis_backend.bus()
    try:
        async with api.subscribe("a") as a:
            await worker.publish(event("a", 1))
            assert [e.seq for e in await receive(a, 1)] == [1]  # the reader reads "a"
            for run in ("b", "c", "d"):
                async with api.subscribe(run) as later:
                    await worker.publish(event(run, 1))
                    assert [(e.run_id, e.seq) for e in await receive(later, 1)] == [(run, 1)]
            await worker.publish(event("a", 2))
            assert [e.seq for e in await receive(a, 1)] == [2]
            assert api.reader_count == 1
    finally:
        await api.close()


@pytest.mark.anyio
async def test_redis_a_finished_runs_stream_is_read_no_further_and_its_connection_kept(
    redis_backend: Backend,
) -> None:
    """Once a run's workflow.finished is handed out its stream is not read again, so its
    subscriptions leave with no XREAD to cancel (redis-py drops a connection whose command was
    cancelled): runs streamed one after another reuse the bus's connection, not one each."""
    api, worker = redis_backend.bus(), redis_backend.bus()

    async def follow(run_id: str) -> None:
        async with api.subscribe(run_id) as subscription:
            await worker.publish_many([event(run_id, 1), event(run_id, 2, EventType.WORKFLOW_FINISHED)])
            assert [e.seq for e in await receive(subscription, 2)] == [1, 2]

    async with connect(redis_backend.url) as admin:

        async def accepted() -> int:
            return int((await admin.info("stats"))["total_connections_received"])

        await follow("warm-up")  # each bus has opened its connections
        before = await accepted()
        for i in range(20):
            await follow(f"run{i}")
        assert await accepted() - before <= 2
        assert isinstance(api, RedisBus)
        assert api.reader_count == 0
