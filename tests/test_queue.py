"""The run queue contract, against the embedded queue and against Redis."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import anyio
import pytest
from redis.asyncio import Redis

from server.keys import Keys
from server.queue.memory import MemoryCancellations, MemoryDelivery, MemoryQueue
from server.queue.redis import RedisCancellations, RedisDelivery, RedisQueue, connect
from tests.services import require_redis

Queue = MemoryQueue | RedisQueue
Delivery = MemoryDelivery | RedisDelivery


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Backend:
    """Makes queues that share one backing queue: the same object in memory, several workers
    (consumers) of one Redis stream otherwise."""

    def __init__(self, kind: str, url: str = "") -> None:
        self.kind = kind
        self.url = url
        self.keys = Keys(f"braid-test-{uuid.uuid4().hex[:12]}")
        self.queues: list[Queue] = []
        self._memory = MemoryQueue()

    def queue(self, *, idle_ms: int = 30_000) -> Queue:
        if self.kind == "memory":
            return self._memory
        queue = RedisQueue(
            self.url,
            prefix=self.keys.prefix,
            consumer=f"worker{len(self.queues)}",
            block_ms=100,
            idle_ms=idle_ms,
            backoff_cap=0.2,
        )
        self.queues.append(queue)
        return queue

    async def close(self) -> None:
        for queue in self.queues:
            await queue.close()
        await self._memory.close()
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


@pytest.fixture
async def redis_backend(anyio_backend: str) -> AsyncIterator[Backend]:
    backend = Backend("redis", require_redis())
    try:
        yield backend
    finally:
        await backend.close()


async def take(queue: Queue) -> Delivery:
    with anyio.fail_after(5):
        return await queue.take()


async def take_nothing(queue: Queue, wait: float) -> None:
    with anyio.move_on_after(wait):
        delivery = await queue.take()
        pytest.fail(f"{delivery.run_id} was delivered again (delivery {delivery.deliveries})")


async def raw(backend: Backend) -> Redis:
    return connect(backend.url)


@pytest.mark.anyio
async def test_enqueue_take_ack(backend: Backend) -> None:
    queue = backend.queue(idle_ms=100)
    await queue.enqueue("run-1")
    await queue.enqueue("run-2")

    first = await take(queue)
    second = await take(queue)
    await first.ack()
    await second.ack()

    assert (first.run_id, first.deliveries) == ("run-1", 1)
    assert (second.run_id, second.deliveries) == ("run-2", 1)
    await take_nothing(backend.queue(idle_ms=100), 0.3)
    if isinstance(first, MemoryDelivery):
        assert first.acked
    else:
        async with await raw(backend) as redis:
            assert (await redis.xpending(backend.keys.runs, "workers"))["pending"] == 0
            assert await redis.xlen(backend.keys.runs) == 0  # acknowledged messages are deleted


@pytest.mark.anyio
async def test_two_workers_get_distinct_runs(backend: Backend) -> None:
    workers = [backend.queue(), backend.queue()]
    runs = [f"run-{i}" for i in range(20)]
    got: list[tuple[int, str]] = []
    all_taken = anyio.Event()

    async def work(index: int, queue: Queue) -> None:
        while True:
            delivery = await queue.take()
            got.append((index, delivery.run_id))
            await delivery.ack()
            if len(got) == len(runs):
                all_taken.set()

    async with anyio.create_task_group() as tg:
        for index, queue in enumerate(workers):
            tg.start_soon(work, index, queue)
        for run_id in runs:
            await workers[0].enqueue(run_id)
        with anyio.fail_after(5):
            await all_taken.wait()
        tg.cancel_scope.cancel()

    assert sorted(run_id for _, run_id in got) == sorted(runs)  # each run once, none lost


@pytest.mark.anyio
async def test_cancel_reaches_every_listener(backend: Backend) -> None:
    listeners: list[MemoryCancellations | RedisCancellations] = [
        backend.queue().cancellations(),
        backend.queue().cancellations(),
    ]
    for listener in listeners:
        await listener.start()

    await backend.queue().cancel("run-1")
    await backend.queue().cancel("run-2")

    with anyio.fail_after(5):
        for listener in listeners:
            assert [await anext(listener), await anext(listener)] == ["run-1", "run-2"]
    for listener in listeners:
        await listener.aclose()


@pytest.mark.anyio
async def test_ping(backend: Backend) -> None:
    assert await backend.queue().ping() is True


@pytest.mark.anyio
async def test_dead_letter_is_not_delivered_again(backend: Backend) -> None:
    queue = backend.queue(idle_ms=100)
    await queue.enqueue("run-1")
    delivery = await take(queue)

    await delivery.dead_letter("delivered 6 times")

    await take_nothing(backend.queue(idle_ms=100), 0.3)
    if isinstance(delivery, MemoryDelivery):
        assert delivery.dead_reason == "delivered 6 times"
    else:
        async with await raw(backend) as redis:
            [(_, fields)] = await redis.xrange(backend.keys.dead_runs) or []
            assert fields is not None
            assert fields["run_id"] == "run-1"
            assert fields["reason"] == "delivered 6 times"


@pytest.mark.anyio
async def test_redis_ping_is_false_when_redis_is_down(anyio_backend: str) -> None:
    queue = RedisQueue("redis://127.0.0.1:1/0", prefix=f"braid-test-{uuid.uuid4().hex[:12]}")
    try:
        with anyio.fail_after(5):
            assert await queue.ping() is False
    finally:
        await queue.close()


@pytest.mark.anyio
async def test_redis_run_of_a_dead_worker_is_reclaimed(redis_backend: Backend) -> None:
    dead = redis_backend.queue(idle_ms=200)
    alive = redis_backend.queue(idle_ms=200)
    await dead.enqueue("run-1")
    first = await take(dead)

    again = await take(alive)  # the dead worker never acks nor heartbeats

    assert (first.run_id, first.deliveries) == ("run-1", 1)
    assert (again.run_id, again.deliveries) == ("run-1", 2)


@pytest.mark.anyio
async def test_redis_heartbeat_keeps_a_live_run(redis_backend: Backend) -> None:
    busy = redis_backend.queue(idle_ms=200)
    other = redis_backend.queue(idle_ms=200)
    await busy.enqueue("run-1")
    delivery = await take(busy)

    async with anyio.create_task_group() as tg:

        async def beat() -> None:
            while True:
                await delivery.heartbeat()
                await anyio.sleep(0.05)  # the heartbeat cadence, well inside idle_ms

        tg.start_soon(beat)
        await take_nothing(other, 0.8)
        tg.cancel_scope.cancel()

    again = await take(other)  # heartbeats stopped: the run is taken over
    assert (again.run_id, again.deliveries) == ("run-1", 2)


@pytest.mark.anyio
async def test_redis_run_delivered_too_often_is_dead_lettered(redis_backend: Backend) -> None:
    workers = [redis_backend.queue(idle_ms=100) for _ in range(3)]
    await workers[0].enqueue("run-1")
    limit = 3
    deliveries: list[int] = []
    while True:
        delivery = await take(workers[len(deliveries) % 3])
        deliveries.append(delivery.deliveries)
        if delivery.deliveries > limit:  # what the worker does: give up, with the reason
            await delivery.dead_letter(f"delivered {delivery.deliveries} times")
            break

    assert deliveries == [1, 2, 3, 4]
    await take_nothing(workers[0], 0.4)
    async with await raw(redis_backend) as redis:
        [(_, fields)] = await redis.xrange(redis_backend.keys.dead_runs) or []
        assert fields is not None
        assert (fields["run_id"], fields["reason"], fields["deliveries"]) == (
            "run-1",
            "delivered 4 times",
            "4",
        )
        assert (await redis.xpending(redis_backend.keys.runs, "workers"))["pending"] == 0


@pytest.mark.anyio
async def test_redis_queue_survives_a_killed_connection(redis_backend: Backend) -> None:
    queue = redis_backend.queue()
    assert isinstance(queue, RedisQueue)
    listener = queue.cancellations()
    await listener.start()
    taken: list[str] = []
    cancelled: list[str] = []
    got_run, got_cancel = anyio.Event(), anyio.Event()
    killed = 0

    async def work() -> None:
        taken.append((await queue.take()).run_id)
        got_run.set()

    async def listen() -> None:
        cancelled.append(await anext(listener))
        got_cancel.set()

    async with await raw(redis_backend) as redis, anyio.create_task_group() as tg:
        tg.start_soon(work)
        tg.start_soon(listen)
        name = f"{redis_backend.keys.prefix}-queue-{queue.consumer}"
        with anyio.fail_after(5):
            while not killed:  # once the worker's blocking read and the listener are connected
                clients = [c for c in await redis.client_list() if c.get("name") == name]
                commands = {c.get("cmd") for c in clients}
                if {"xreadgroup", "subscribe"} <= commands:
                    for client in clients:
                        killed += int(await redis.client_kill_filter(_id=client["id"]))
                else:
                    await anyio.sleep(0.01)

        await queue.enqueue("run-1")
        with anyio.fail_after(5):
            await got_run.wait()
            # the listener reconnects and resubscribes on its own; publish once it has
            while (await redis.pubsub_numsub(redis_backend.keys.cancel))[0][1] == 0:  # noqa: ASYNC110
                await anyio.sleep(0.01)
            await queue.cancel("run-1")
            await got_cancel.wait()
        assert await queue.ping() is True

    assert killed >= 2
    assert taken == ["run-1"]
    assert cancelled == ["run-1"]
    await listener.aclose()
