"""The distributed event bus: events go through Redis Streams, so every API process can serve
every run's live events.

Each event is appended to its run's stream (``{prefix}:events:{run_id}``, which expires a while
after the run finished; the database keeps the history) and to the global feed
(``{prefix}:events``, trimmed to an approximate length). The streams followed in a process are
read by readers, tasks of the bus, each reading up to ``STREAMS_PER_READER`` of them with one
``XREAD BLOCK`` on one connection and handing each event (decoded once) to every subscription
of its stream: a thousand SSE clients of one run hold one Redis connection, those of a thousand
runs about thirty. A subscription's starting point is fixed before ``subscribe`` returns: the
stream's last entry id for the first subscription of a stream, else the entry its reader last
handed out on it. A stream given to a reader blocked without it wakes the reader through the
reader's own wake stream (``{prefix}:bus-wake:{token}``, which it reads too), so no reader is
ever cancelled in an ``XREAD`` (redis-py drops a connection whose command was cancelled). A
run's stream is read no further once its ``workflow.finished`` was handed out; a reader ends
once it follows no stream, at its next reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence
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
from server.queue.redis import TRANSIENT, client_name, connect, stream_replies, text
from server.status import EventType

log = logging.getLogger("braid.bus")

PUBLISH_BATCH = 256
"""Events sent in one pipeline at most."""

MAX_CONNECTIONS = 5000
"""The bus client's pool. Each reader holds one connection; the rest are for publishing and for
the starting points of streams followed anew, which a burst of new SSE clients asks for at once
(redis-py refuses a command at once when its pool is full; its default is 100). Redis itself
takes 10,000 clients by default (``maxclients``)."""

STREAMS_PER_READER = 32
"""Streams one reader follows at most. Each reply makes it ask again with every stream it
follows, a couple of µs a stream in redis-py: with a thousand runs streamed at once behind one
reader, an event cost 2.1 ms of the API's CPU, against 0.5 with a reader (and a connection)
each; in groups of 32 the cost stays near the latter, on a thirty-second of the connections."""

CLOSE_WAIT = 2.0
"""Seconds ``close`` waits for the reader to end (once more after cancelling it)."""

WAKE_TTL = 86_400
"""Seconds a bus's wake stream outlives its last use (``close`` deletes it; a process that
died leaves it behind until then)."""


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
        self._buffers: set[Buffer] = set()
        self._streams: dict[str, _Followed] = {}
        self._readers: list[_Reader] = []
        self._outbox = GroupCommit[_Outgoing](self._send, PUBLISH_BATCH)
        self._publish = self.redis.register_script(PUBLISH_SCRIPT)

    @property
    def reader_count(self) -> int:
        """Readers running: one for every ``STREAMS_PER_READER`` streams followed, or fewer."""
        return len(self._readers)

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
        followed, new = await self._follow(key)
        buffer = Buffer(self.buffer_size)
        followed.buffers.add(buffer)
        self._buffers.add(buffer)
        self.subscriber_count += 1
        try:
            if new:
                await self._read_too(followed)
            yield buffer
        finally:
            self.subscriber_count -= 1
            self._buffers.discard(buffer)
            followed.buffers.discard(buffer)
            if not followed.buffers and self._streams.get(key) is followed:
                del self._streams[key]
                if followed.reader is not None:
                    followed.reader.keys.discard(key)  # room for another stream at once
            buffer.close()

    async def close(self) -> None:
        for buffer in list(self._buffers):
            buffer.end("was closed with the event bus")
        self._streams.clear()
        readers, self._readers = self._readers, []
        for reader in readers:
            reader.keys.clear()
            # It ends at its next reply, finding nothing to follow: woken rather than cancelled
            # (redis-py can swallow a cancellation that comes as a command is being sent).
            if reader.reading is not None:
                await self._wake(reader)
        tasks = {reader.task for reader in readers}
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=CLOSE_WAIT)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=CLOSE_WAIT)
        if readers:
            with contextlib.suppress(RedisError):
                await self.redis.delete(*(reader.wake_key for reader in readers))
        if self._owns_client:
            await self.redis.aclose()

    async def _follow(self, key: str) -> tuple[_Followed, bool]:
        """The stream ``key`` as this process follows it, its starting point fixed (a subscription
        that joins a stream already followed gets everything handed out from then on, so it
        joins at once), and whether it is followed anew (for the reader to read it too)."""
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
                return followed, True
            if followed.last is None:
                await followed.ready.wait()
                if followed.last is None:
                    if followed.failure is not None:
                        raise Unavailable(str(followed.failure))
                    continue  # the first subscription was cancelled before it got there
            return followed, False

    async def _read_too(self, followed: _Followed) -> None:
        """Have a reader read ``followed`` too: one with room for it (woken if it is blocked
        without), else a new one."""
        reader = next((r for r in self._readers if len(r.keys) < STREAMS_PER_READER), None)
        followed.reader = reader
        if reader is None:
            reader = followed.reader = _Reader(self.keys.bus_wake(uuid.uuid4().hex), {followed.key})
            reader.task = asyncio.get_running_loop().create_task(self._read(reader), name="braid bus reader")
            self._readers.append(reader)
            return
        reader.keys.add(followed.key)
        if reader.reading is not None and followed.key not in reader.reading and not reader.woken:
            await self._wake(reader)

    async def _wake(self, reader: _Reader) -> None:
        """Bring ``reader`` back from its ``XREAD`` (it asks again with every stream it follows)."""
        reader.woken = True
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xadd(reader.wake_key, {"w": "1"}, maxlen=16, approximate=True)
                pipe.expire(reader.wake_key, WAKE_TTL)
                await pipe.execute()
        except RedisError as exc:
            # The reader asks again within ``block_ms`` anyway.
            reader.woken = False
            log.warning("could not wake an event bus reader (%s)", exc)

    async def _last_id(self, key: str) -> str:
        try:
            last = await self.redis.xrevrange(key, "+", "-", count=1)
        except TRANSIENT as exc:
            raise Unavailable(f"Redis is unavailable ({exc}); try again shortly") from exc
        return text(last[0][0]) if last else "0-0"

    async def _read(self, reader: _Reader) -> None:
        """Hand each new entry of the streams ``reader`` follows to every subscription of that
        stream, until it follows none (at the next reply) or they cannot be read any more (their
        subscriptions then end)."""
        try:
            failures = 0
            while True:
                streams: dict[str, str] = {}
                for key in list(reader.keys):
                    followed = self._streams.get(key)
                    if followed is None or followed.finished or followed.last is None:
                        reader.keys.discard(key)  # left, or its run finished: room for another
                    else:
                        streams[key] = followed.last
                if not streams:
                    if reader in self._readers:  # a stream followed from now on gets a new one
                        self._readers.remove(reader)
                    return
                streams[reader.wake_key] = reader.wake_last
                reader.reading, reader.woken = streams, False
                try:
                    response = await self.redis.xread(streams, count=500, block=self.block_ms)  # type: ignore[arg-type]
                except TRANSIENT as exc:
                    failures += 1
                    delay = min(self.backoff_cap, 0.1 * 2 ** min(failures, 16))
                    log.warning("redis unavailable while reading events (%s); retrying in %.1fs", exc, delay)
                    await anyio.sleep(delay)
                    continue
                except RedisError as exc:
                    self._lose(streams, exc)
                    continue
                finally:
                    reader.reading = None
                failures = 0
                for key, entries in stream_replies(response):
                    if key == reader.wake_key:
                        if entries:
                            reader.wake_last = entries[-1][0]
                        continue
                    followed = self._streams.get(key)
                    if followed is not None:
                        self._hand_out(followed, entries)
        except BaseException as exc:
            if reader in self._readers:
                self._readers.remove(reader)
            if not isinstance(exc, asyncio.CancelledError):
                log.exception("an event bus reader failed")
                self._lose(reader.keys, exc)
            raise

    def _hand_out(self, followed: _Followed, entries: list[tuple[str, Mapping[Any, Any] | None]]) -> None:
        for entry_id, fields in entries:
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
                followed.finished = True  # nothing more comes: not read again

    def _lose(self, streams: Iterable[str], exc: BaseException) -> None:
        """End the subscriptions of ``streams``, which cannot be read (later ones start afresh)."""
        for key in list(streams):
            followed = self._streams.pop(key, None)
            if followed is None:
                continue
            for buffer in list(followed.buffers):
                buffer.end(f"lost its event stream ({exc})")
            followed.buffers.clear()


class _Reader:
    """A task of the bus reading up to ``STREAMS_PER_READER`` streams with one ``XREAD``."""

    task: asyncio.Task[None]

    def __init__(self, wake_key: str, keys: set[str]) -> None:
        self.keys = keys
        """The streams it follows (it drops those left or finished as it next asks)."""
        self.reading: dict[str, str] | None = None
        """The streams of its ``XREAD`` in flight (None while it is not blocked)."""
        self.woken = False
        """Whether it was woken while blocked (it asks again with every stream it follows)."""
        self.wake_key = wake_key
        self.wake_last = "0-0"


class _Followed:
    """One stream's subscriptions in this process, and where the reader is in it."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.last: str | None = None
        """The id of the last entry handed out (at first, the stream's last id): None until
        the first subscription has read it."""
        self.ready = anyio.Event()
        self.failure: Unavailable | None = None
        self.buffers: set[Buffer] = set()
        self.reader: _Reader | None = None
        self.finished = False
        """A run's stream whose ``workflow.finished`` was handed out: no one reads it again."""
