"""The distributed event bus: events go through Redis Streams, so every API process can serve
every run's live events.

Each event is appended to its run's stream (``{prefix}:events:{run_id}``, which expires a while
after the run finished; the database keeps the history) and to the global feed
(``{prefix}:events``, trimmed to an approximate length). The subscriptions of one stream in a
process share one reader, which reads onward from the last id it saw with ``XREAD BLOCK`` and
hands each event (decoded once) to all of them: a thousand SSE clients of one run hold one Redis
connection, not a thousand (redis-py's pool allows a hundred). A subscription's starting point is
fixed before ``subscribe`` returns: the stream's last entry id for the first subscription, else
the entry the shared reader last handed out. The reader runs in the task of one of its
subscriptions; when that one leaves, another takes over from the same id. A run's stream is read
no further once its ``workflow.finished`` was handed out: its subscriptions then leave with no
``XREAD`` in flight, whose cancellation would cost the connection (redis-py drops a connection
whose command was cancelled), so a streamed run no longer costs the API a new Redis connection.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
from redis.asyncio import Redis
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from server.batching import GroupCommit, Pending
from server.bus.memory import DEFAULT_BUFFER, Buffer
from server.errors import Unavailable
from server.events import Event
from server.keys import DEFAULT_PREFIX, Keys
from server.queue.redis import TRANSIENT, client_name, connect, stream_entries, text
from server.status import EventType

log = logging.getLogger("braid.bus")

PUBLISH_BATCH = 256
"""Events sent in one pipeline at most."""

MAX_CONNECTIONS = 5000
"""The bus client's pool: each stream followed in this process holds a connection in ``XREAD
BLOCK`` (the SSE clients of one run share it), so redis-py's default of 100 would refuse the
101st run streamed at once. Redis itself takes 10,000 clients by default (``maxclients``)."""


PUBLISH_SCRIPT = """
local maxlen = ARGV[1]
for j = 2, #KEYS do
  local e, g, ttl = ARGV[3 * j - 4], ARGV[3 * j - 3], ARGV[3 * j - 2]
  redis.call('XADD', KEYS[j], 'MAXLEN', '~', maxlen, '*', 'e', e, 'g', g)
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', 'e', e, 'g', g)
  if ttl ~= '' then redis.call('EXPIRE', KEYS[j], ttl) end
end
return #KEYS - 1
"""
"""Publishes a batch in one command: for each event (its run's stream in ``KEYS[j]``, from 2 on;
its fields and the TTL to set after it, or '' for none, in ``ARGV``), ``XADD`` to the run's
stream and to the feed (``KEYS[1]``), each trimmed to about ``ARGV[1]`` entries. Redis runs it
at once, in order: one command to pack and one reply to parse instead of three of each per
event (redis-py's work per command was most of a worker's cost of publishing)."""


@dataclass(eq=False, slots=True, kw_only=True)
class _Outgoing(Pending):
    event: Event


def encode(event: Event) -> dict[FieldT, EncodableT]:
    return {
        "e": json.dumps(event.as_json(), separators=(",", ":"), default=str),
        "g": "" if event.gid is None else str(event.gid),
    }


def decode(fields: Mapping[Any, Any]) -> Event:
    values = {text(k): text(v) for k, v in fields.items()}
    gid = values.get("g")
    return Event.from_json(json.loads(values["e"]), gid=int(gid) if gid else None)


class RedisBus:
    """Events through Redis Streams; see the module docstring.

    Args:
        redis: a ``redis://`` URL, or a client (``decode_responses=True``, a ``socket_timeout``
            longer than ``block_ms``); a client passed in is not closed by ``close()``.
        prefix: the prefix of every key (see ``server.keys``).
        run_stream_ttl: seconds a run's stream lives after its ``workflow.finished``.
        unfinished_ttl: seconds a run's stream lives after its latest event when it never finishes.
        feed_length: the approximate number of events the streams keep.
        block_ms: how long one ``XREAD`` blocks.
        buffer_size: events a subscriber may fall behind by before it is dropped.
    """

    def __init__(
        self,
        redis: str | Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        run_stream_ttl: int = 3600,
        unfinished_ttl: int = 86_400,
        feed_length: int = 100_000,
        block_ms: int = 5000,
        buffer_size: int = DEFAULT_BUFFER,
        backoff_cap: float = 10.0,
    ) -> None:
        self._owns_client = isinstance(redis, str)
        self.redis: Redis = (
            connect(
                redis, block_ms=block_ms, name=client_name(f"{prefix}-bus"), max_connections=MAX_CONNECTIONS
            )
            if isinstance(redis, str)
            else redis
        )
        self.keys = Keys(prefix)
        self.run_stream_ttl = run_stream_ttl
        self.unfinished_ttl = unfinished_ttl
        self.feed_length = feed_length
        self.block_ms = block_ms
        self.buffer_size = buffer_size
        self.backoff_cap = backoff_cap
        self.subscriber_count = 0
        self.reader_count = 0
        """Readers running: one per stream that has subscriptions in this process."""
        self._buffers: set[Buffer] = set()
        self._streams: dict[str, _Followed] = {}
        self._outbox = GroupCommit[_Outgoing](self._send, PUBLISH_BATCH)
        self._publish = self.redis.register_script(PUBLISH_SCRIPT)

    async def publish(self, event: Event) -> None:
        """Append the event to its run's stream and to the feed. Concurrent calls share one
        pipeline, one round trip (``server.batching``, as the store's events share a commit)."""
        await self._outbox.submit(_Outgoing(event=event))

    async def publish_many(self, events: Sequence[Event]) -> None:
        items = [_Outgoing(event=event) for event in events]
        self._outbox.queue.extend(items)
        await self._outbox.all_written(items)

    async def _send(self, batch: list[_Outgoing]) -> None:
        # A run's stream lives ``unfinished_ttl`` after its last event, ``run_stream_ttl`` after its
        # end (its last event): one EXPIRE per run of the batch, after its last event there.
        keys: list[str] = [self.keys.events]
        args: list[EncodableT] = [self.feed_length]
        last: dict[str, int] = {}  # run key -> where its TTL goes in ``args``
        for item in batch:
            event = item.event
            fields = encode(event)
            run_key = self.keys.run_events(event.run_id)
            previous = last.get(run_key)
            if previous is not None:
                args[previous] = ""
            last[run_key] = len(args) + 2
            finished = event.type is EventType.WORKFLOW_FINISHED
            keys.append(run_key)
            args += [fields["e"], fields["g"], self.run_stream_ttl if finished else self.unfinished_ttl]
        await self._publish(keys=keys, args=args)

    @asynccontextmanager
    async def subscribe(self, run_id: str | None = None) -> AsyncGenerator[Buffer, None]:
        key = self.keys.events if run_id is None else self.keys.run_events(run_id)
        followed = await self._follow(key)
        buffer = Buffer(self.buffer_size)
        followed.buffers.add(buffer)
        self._buffers.add(buffer)
        self.subscriber_count += 1
        failure: Exception | None = None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._take_turns, followed, buffer)
                try:
                    yield buffer
                except Exception as exc:
                    failure = exc  # re-raised below as itself, not wrapped in an ExceptionGroup
                finally:
                    tg.cancel_scope.cancel()
            if failure is not None:
                raise failure
        finally:
            self.subscriber_count -= 1
            self._buffers.discard(buffer)
            followed.buffers.discard(buffer)
            if not followed.buffers and self._streams.get(key) is followed:
                del self._streams[key]
            buffer.close()

    async def close(self) -> None:
        for buffer in list(self._buffers):
            buffer.end("was closed with the event bus")
        if self._owns_client:
            await self.redis.aclose()

    async def _follow(self, key: str) -> _Followed:
        """The shared reader of ``key``, its starting point fixed (a subscription that joins a
        reader already reading gets everything it hands out from then on, so it joins at once)."""
        while True:
            followed = self._streams.get(key)
            if followed is None:
                followed = self._streams[key] = _Followed(key)
                try:
                    followed.last = await self._last_id(key)
                except BaseException as exc:
                    if self._streams.get(key) is followed:
                        del self._streams[key]
                    followed.failure = exc if isinstance(exc, Unavailable) else None
                    raise
                finally:
                    followed.ready.set()
                return followed
            if followed.last is None:
                await followed.ready.wait()
                if followed.last is None:
                    if followed.failure is not None:
                        raise Unavailable(str(followed.failure))
                    continue  # the first subscription was cancelled before it got there
            return followed

    async def _last_id(self, key: str) -> str:
        try:
            last = await self.redis.xrevrange(key, "+", "-", count=1)
        except TRANSIENT as exc:
            raise Unavailable(f"Redis is unavailable ({exc}); try again shortly") from exc
        return text(last[0][0]) if last else "0-0"

    async def _take_turns(self, followed: _Followed, buffer: Buffer) -> None:
        """Read ``followed`` for every subscription to it while no other subscription's task
        does; otherwise wait for that one to stop (it left), then take over."""
        while followed.reading:
            await followed.handed_over.wait()
            if buffer.dropped is not None:
                return  # this subscription is ending: it reads for nobody
        if followed.finished:
            return  # the run's last event was handed out: nothing more will come
        followed.reading = True
        try:
            await self._read(followed)
        finally:
            followed.reading = False
            followed.handed_over.set()
            followed.handed_over = anyio.Event()

    async def _read(self, followed: _Followed) -> None:
        """Hand each entry after ``followed.last`` to every subscription of the stream, until
        none is left or the stream cannot be read any more (every subscription then ends)."""
        self.reader_count += 1
        try:
            failures = 0
            while followed.buffers:
                last = followed.last
                assert last is not None
                try:
                    response = await self.redis.xread({followed.key: last}, count=500, block=self.block_ms)
                except TRANSIENT as exc:
                    failures += 1
                    delay = min(self.backoff_cap, 0.1 * 2 ** min(failures, 16))
                    log.warning(
                        "redis unavailable while reading %s (%s); retrying in %.1fs", followed.key, exc, delay
                    )
                    await anyio.sleep(delay)
                    continue
                except RedisError as exc:
                    if self._streams.get(followed.key) is followed:
                        del self._streams[followed.key]  # later subscriptions start afresh
                    for buffer in list(followed.buffers):
                        buffer.end(f"lost its event stream ({exc})")
                    followed.buffers.clear()
                    return
                failures = 0
                for entry_id, fields in stream_entries(response):
                    followed.last = entry_id
                    try:
                        event = decode(fields or {})
                    except (KeyError, ValueError) as exc:
                        log.warning("skipping unreadable event %s in %s: %s", entry_id, followed.key, exc)
                        continue
                    for buffer in list(followed.buffers):
                        if not buffer.offer(event):
                            followed.buffers.discard(buffer)
                    if event.type is EventType.WORKFLOW_FINISHED and followed.key != self.keys.events:
                        followed.finished = True
                if followed.finished:
                    return
        finally:
            self.reader_count -= 1


class _Followed:
    """One stream's subscriptions in this process, and where their shared reader is."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.last: str | None = None
        """The id of the last entry handed out (at first, the stream's last id): None until
        the first subscription has read it."""
        self.ready = anyio.Event()
        self.failure: Unavailable | None = None
        self.buffers: set[Buffer] = set()
        self.reading = False
        self.handed_over = anyio.Event()
        self.finished = False
        """A run's stream whose ``workflow.finished`` was handed out: no one reads it again."""
