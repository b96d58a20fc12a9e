"""The distributed run queue: a Redis Stream of run ids read by one consumer group.

A worker that dies leaves its messages pending; other workers reclaim them with ``XAUTOCLAIM``
once they have been idle for ``idle_ms``, while a live worker's heartbeat (``XCLAIM … JUSTID``)
keeps resetting that idle time. Acknowledged messages are deleted, so the stream holds only
pending and waiting runs and is never trimmed by length (which could drop pending entries).
Cancellations travel over pub/sub so every worker hears every one.
"""

from __future__ import annotations

import builtins
import logging
import os
import secrets
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, RedisError, ResponseError, TimeoutError

from server.errors import Unavailable
from server.keys import DEFAULT_PREFIX, WORKER_GROUP, Keys

log = logging.getLogger("braid.queue")

TRANSIENT = (ConnectionError, TimeoutError)

KEEP_IF_HELD = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
"""Extend a lock's time to live, if the caller (ARGV[1]) still holds it."""


def connect(
    url: str, *, block_ms: int = 2000, name: str | None = None, max_connections: int | None = None
) -> Redis:
    """A client for Braid's Redis: decoded responses, a socket timeout longer than any blocking
    read of ``block_ms``, and retries with exponential backoff on connection errors. ``name``
    shows in ``CLIENT LIST``; ``max_connections`` caps its pool (redis-py's default is 100, and
    a pool that is full refuses at once)."""
    return Redis.from_url(
        url,
        client_name=name,
        max_connections=max_connections,
        decode_responses=True,
        socket_timeout=block_ms / 1000 + 5,
        socket_connect_timeout=5,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
        retry_on_error=[ConnectionError, TimeoutError],
    )


def client_name(name: str) -> str:
    """``name`` made acceptable to ``CLIENT SETNAME`` (no spaces or newlines)."""
    return "".join(c if c.isprintable() and not c.isspace() else "_" for c in name)


def default_consumer() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def stream_replies(response: Any) -> list[tuple[str, list[tuple[str, Mapping[Any, Any] | None]]]]:
    """The entries of an ``XREAD``/``XREADGROUP`` reply by stream, whichever reply shape the
    client was configured for (a list of ``[stream, entries]`` or a dict by stream)."""
    if not response:
        return []
    items = response.items() if isinstance(response, dict) else ((item[0], item[1]) for item in response)
    return [
        (text(stream), [(text(entry_id), fields) for entry_id, fields in entries])
        for stream, entries in items
    ]


def stream_entries(response: Any) -> list[tuple[str, Mapping[Any, Any] | None]]:
    """The entries of an ``XREAD``/``XREADGROUP`` reply on one stream (see ``stream_replies``)."""
    return [entry for _, entries in stream_replies(response) for entry in entries]


@dataclass(eq=False)
class RedisDelivery:
    run_id: str
    deliveries: int
    message_id: str
    queue: RedisQueue

    async def ack(self) -> None:
        await self.queue._ack(self.message_id, self.run_id)

    async def heartbeat(self) -> None:
        await self.queue._heartbeat(self.message_id, self.run_id)

    async def dead_letter(self, reason: str) -> None:
        await self.queue._dead_letter(self, reason)


class RedisCancellations:
    """Run ids published on the cancel channel after ``start()`` returned (``__anext__`` starts
    it too). Cancelling a pending ``__anext__`` closes the listener, as it would an async
    generator."""

    def __init__(self, queue: RedisQueue) -> None:
        self._queue = queue
        self._pubsub: PubSub = queue.redis.pubsub()
        self._started = False
        self._closed = False
        queue._listeners.add(self)

    async def start(self) -> None:
        """Subscribe and wait for Redis to confirm, so no cancel published afterwards is missed."""
        if self._started:
            return
        await self._pubsub.subscribe(self._queue.keys.cancel)
        with anyio.fail_after(10):
            while True:
                message = await self._pubsub.get_message(timeout=1.0)
                if message is not None and text(message["type"]) == "subscribe":
                    break
        self._started = True

    def __aiter__(self) -> RedisCancellations:
        return self

    async def __anext__(self) -> str:
        if self._closed:
            raise StopAsyncIteration
        try:
            failures = 0
            while True:
                try:
                    await self.start()
                    # A bounded wait lets the client's health check notice a silently dead link.
                    message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=30.0)
                except (*TRANSIENT, builtins.TimeoutError) as exc:
                    failures += 1
                    await self._queue._backoff("listening for cancellations", exc, failures)
                    continue
                failures = 0
                if message is not None and text(message["type"]) == "message":
                    return text(message["data"])
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.aclose()
            raise

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue._listeners.discard(self)
        with anyio.move_on_after(2, shield=True):
            await self._pubsub.aclose()


class RedisQueue:
    """Runs through a Redis Stream with a consumer group; see the module docstring.

    Args:
        redis: a ``redis://`` URL, or a client (``decode_responses=True``, a ``socket_timeout``
            longer than ``block_ms``); a client passed in is not closed by ``close()``.
        prefix: the prefix of every key (see ``server.keys``).
        consumer: this worker's name in the group; unique per process by default.
        group: the consumer group.
        block_ms: how long one ``XREADGROUP`` blocks before ``take`` looks for idle runs again.
        idle_ms: a pending run idle this long (no heartbeat) is taken from its worker; a run's
            "alive" key (see ``server.keys.RUN_ALIVE``) lives this long after each beat.
        backoff_cap: the longest wait, in seconds, between reconnection attempts.
    """

    def __init__(
        self,
        redis: str | Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        consumer: str | None = None,
        group: str = WORKER_GROUP,
        block_ms: int = 2000,
        idle_ms: int = 30_000,
        backoff_cap: float = 10.0,
    ) -> None:
        self.consumer = consumer or default_consumer()
        self._owns_client = isinstance(redis, str)
        self.redis: Redis = (
            connect(redis, block_ms=block_ms, name=client_name(f"{prefix}-queue-{self.consumer}"))
            if isinstance(redis, str)
            else redis
        )
        self.keys = Keys(prefix)
        self.group = group
        self.block_ms = block_ms
        self.idle_ms = idle_ms
        self.backoff_cap = backoff_cap
        self._group_ready = False
        self._claim_cursor = "0-0"
        self._next_reclaim = 0.0
        self._listeners: set[RedisCancellations] = set()

    async def enqueue(self, run_id: str) -> None:
        try:
            await self._ensure_group()
            await self.redis.xadd(self.keys.runs, {"run_id": run_id})
        except TRANSIENT as exc:
            raise Unavailable(f"Redis is unavailable ({exc}); try again shortly") from exc

    async def take(self) -> RedisDelivery:
        failures = 0
        while True:
            try:
                await self._ensure_group()
                delivery = await self._reclaim() if anyio.current_time() >= self._next_reclaim else None
                if delivery is None:
                    delivery = await self._read()
            except TRANSIENT as exc:
                failures += 1
                await self._backoff("taking a run", exc, failures)
                continue
            except ResponseError as exc:
                # NOGROUP: the group is gone; UNBLOCKED: the stream was deleted under a blocked
                # read (FLUSHALL, or Redis restarted empty): recreate them.
                if "NOGROUP" not in str(exc) and "UNBLOCKED" not in str(exc):
                    raise
                self._group_ready = False
                continue
            failures = 0
            if delivery is not None:
                await self._mark_alive(delivery.run_id)
                return delivery

    async def cancel(self, run_id: str) -> None:
        try:
            await self.redis.publish(self.keys.cancel, run_id)
        except TRANSIENT as exc:
            raise Unavailable(f"Redis is unavailable ({exc}); try again shortly") from exc

    def cancellations(self) -> RedisCancellations:
        return RedisCancellations(self)

    async def ping(self) -> bool:
        with anyio.move_on_after(3):
            try:
                return bool(await self.redis.ping())
            except (RedisError, OSError):
                return False
        return False

    async def queued_run_ids(self, page: int = 1000) -> set[str]:
        """The ids of the runs with a message in the stream, waiting or pending (being executed).

        Acknowledged messages are deleted, so the stream holds exactly these; a pending message
        whose entry is gone cannot be delivered again, so the stream alone answers.
        """
        found: set[str] = set()
        start = "-"
        while True:
            entries = await self.redis.xrange(self.keys.runs, start, "+", count=page) or []
            for entry_id, fields in entries:
                run_id = {text(k): text(v) for k, v in (fields or {}).items()}.get("run_id")
                if run_id:
                    found.add(run_id)
                start = f"({text(entry_id)}"
            if len(entries) < page:
                return found

    async def alive_run_ids(self, run_ids: Sequence[str]) -> set[str]:
        """Those of ``run_ids`` a live worker is executing (their heartbeat key exists)."""
        if not run_ids:
            return set()
        values = await self.redis.mget([self.keys.run_alive(run_id) for run_id in run_ids])
        return {run_id for run_id, value in zip(run_ids, values, strict=True) if value is not None}

    async def lead_sweep(self, seconds: float) -> bool:
        """True for one caller, among every worker of this Redis, per ``seconds``."""
        return bool(
            await self.redis.set(self.keys.sweep, self.consumer, nx=True, px=max(1, round(seconds * 1000)))
        )

    async def keep_sweep(self, seconds: float) -> bool:
        """Keep the lead taken by ``lead_sweep`` for ``seconds`` from now; False if it was lost."""
        kept = await self.redis.eval(
            KEEP_IF_HELD, 1, self.keys.sweep, self.consumer, max(1, round(seconds * 1000))
        )
        return bool(kept)

    async def close(self) -> None:
        for listener in list(self._listeners):
            await listener.aclose()
        if self._owns_client:
            await self.redis.aclose()

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            await self.redis.xgroup_create(self.keys.runs, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def _read(self) -> RedisDelivery | None:
        response = await self.redis.xreadgroup(
            self.group, self.consumer, {self.keys.runs: ">"}, count=1, block=self.block_ms
        )
        for message_id, fields in stream_entries(response):
            return self._delivery(message_id, fields, 1)
        return None

    async def _reclaim(self) -> RedisDelivery | None:
        """Claim one run idle longer than ``idle_ms``, scanning the pending list from where the
        last scan stopped; after a whole scan found nothing, wait a while before the next."""
        while True:
            cursor, claimed, *_ = await self.redis.xautoclaim(
                self.keys.runs, self.group, self.consumer, self.idle_ms, self._claim_cursor, count=1
            )
            self._claim_cursor = text(cursor)
            for message_id, fields in claimed:
                if fields is None:  # deleted from the stream while pending
                    continue
                pending = await self.redis.xpending_range(
                    self.keys.runs, self.group, min=message_id, max=message_id, count=1
                )
                deliveries = int(pending[0]["times_delivered"]) if pending else 1
                return self._delivery(text(message_id), fields, deliveries)
            if self._claim_cursor in ("0-0", "0"):
                self._next_reclaim = anyio.current_time() + min(self.idle_ms, self.block_ms) / 2000
                return None

    def _delivery(self, message_id: str, fields: Mapping[Any, Any] | None, deliveries: int) -> RedisDelivery:
        values = {text(k): text(v) for k, v in (fields or {}).items()}
        return RedisDelivery(values.get("run_id", ""), deliveries, message_id, self)

    async def _ack(self, message_id: str, run_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.keys.runs, self.group, message_id)
            pipe.xdel(self.keys.runs, message_id)
            pipe.delete(self.keys.run_alive(run_id))
            await pipe.execute()

    async def _mark_alive(self, run_id: str) -> None:
        try:
            await self.redis.set(self.keys.run_alive(run_id), self.consumer, px=self.idle_ms)
        except RedisError as exc:
            log.warning("could not mark run %s as alive: %s", run_id, exc)

    async def _heartbeat(self, message_id: str, run_id: str | None = None) -> None:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                if run_id:
                    pipe.set(self.keys.run_alive(run_id), self.consumer, px=self.idle_ms)
                pipe.xclaim(self.keys.runs, self.group, self.consumer, 0, [message_id], justid=True)
                await pipe.execute()
        except RedisError as exc:
            # A missed beat is harmless unless they all fail for ``idle_ms``; never stop the run.
            # (The alive key is set even when the message is gone: Redis lost its data.)
            log.warning("heartbeat for message %s failed: %s", message_id, exc)

    async def _dead_letter(self, delivery: RedisDelivery, reason: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(
                self.keys.dead_runs,
                {
                    "run_id": delivery.run_id,
                    "reason": reason,
                    "deliveries": str(delivery.deliveries),
                    "message_id": delivery.message_id,
                    "consumer": self.consumer,
                    "at": datetime.now(UTC).isoformat(),
                },
                maxlen=10_000,
                approximate=True,
            )
            pipe.xack(self.keys.runs, self.group, delivery.message_id)
            pipe.xdel(self.keys.runs, delivery.message_id)
            pipe.delete(self.keys.run_alive(delivery.run_id))
            await pipe.execute()

    async def _backoff(self, doing: str, exc: Exception, failures: int) -> None:
        delay = min(self.backoff_cap, 0.1 * 2 ** min(failures, 16))
        log.warning("redis unavailable while %s (%s); retrying in %.1fs", doing, exc, delay)
        await anyio.sleep(delay)
