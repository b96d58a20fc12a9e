"""The SQL store: SQLModel over SQLite (aiosqlite, the embedded default) or Postgres (asyncpg).

Events are written with group commit: concurrent ``record`` calls are queued, and whichever caller
finds no write in progress becomes the writer and commits everything queued in one transaction,
while the others wait for their batch. Under load one transaction carries the events of many runs
and nodes; a lone caller pays for one transaction as before.

On SQLite a batch is written by one call into a writer thread with its own (synchronous) SQLite
connection: through aiosqlite every statement, fetch, cursor close and commit is a round trip to
aiosqlite's thread, a dozen per batch, which was most of the cost of recording an event. The
writer's transactions are reported to the main engine's ``commit`` listeners too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import time
import uuid
import zlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import anyio
import anyio.to_thread
from sqlalchemy import (
    JSON,
    Connection,
    Engine,
    Row,
    bindparam,
    create_engine,
    event,
    func,
    inspect,
    text,
    update,
)
from sqlalchemy import select as sa_select
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, StatementError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.sql.dml import Update
from sqlmodel import SQLModel, col, delete, select
from sqlmodel.ext.asyncio.session import AsyncSession

from server.batching import GroupCommit, Pending
from server.engine.records import NodeExecution, RunState, RunUpdate
from server.errors import Conflict, NotFound, SetupError
from server.events import Event, utcnow
from server.status import EventType, NodeStatus, RunStatus
from server.store.base import GraphRecord, GraphSummary, Publish, RunRecord
from server.store.models import (
    EVENTS,
    GRAPHS,
    NODES,
    RUNS,
    SCHEMA,
    SCHEMA_VERSION,
    WHOLE_NODE,
    EventRow,
    GraphRow,
    NodeRow,
    RunRow,
    UTCDateTime,
)

log = logging.getLogger("braid.store")

#: What ``run_state`` hands a resumed run: executions that need not run again.
RESUMABLE = (NodeStatus.SUCCEEDED, NodeStatus.FAILED, NodeStatus.SKIPPED)

#: Postgres advisory lock key taken by every event transaction, so event ids (``gid``) become
#: visible in commit order and a reader of the feed never skips an event committed late.
FEED_LOCK = 0x62726169  # "brai"
#: Taken while creating the tables, for processes that start at once on a new database.
START_LOCK = 0x62726173
#: The first of the two advisory lock keys ``put_graph`` takes (the second is the graph's name).
GRAPH_LOCK = 0x62726167

NODE_COLUMNS = ("status", "attempts", "output", "error", "started_at", "finished_at", "usage")

GRAPH_TTL_SECONDS = 1.0
"""How long the record of one graph version is served from memory. Writes through this store
clear it at once; which version is the latest is always read from the database (so another
process's new version is seen at once). A graph deleted and recreated by another process may
show its old version of the same number for up to this long."""
GRAPH_CACHE_SIZE = 1024

AUTOCOMMIT_POOL = 20
"""Postgres connections a process keeps for autocommit statements (with the transactional
engine's 5 + 5, three Braid processes stay within Postgres's default of 100 connections)."""

READER_THREADS = 4
"""SQLite reads run on synchronous connections in up to this many threads at once."""
INLINE_LAP = 0.0002
"""A SQLite batch is written on the event loop's own thread when the loop is otherwise idle (the
writer came back from a trip round the loop within ``INLINE_LAP`` seconds, see ``GroupCommit``):
a small one takes tens of microseconds there, while the trip to the writer thread and back
costs a hundred or more (several hundred on a virtual machine whose other core sleeps), and the
loop would only wait. A busy loop has other work to do meanwhile: its batches go to the writer
thread, where SQLite's own work runs beside the loop; but a batch queued while the one before
was written is written on the loop too, by the same writer (its callers have waited a write
already, and the trip would add a lap of the busy loop)."""
INLINE_CHECKPOINT_EVERY = 128
"""Commits written on the event loop between two WAL checkpoints (done in the writer thread):
the loop's connection never checkpoints itself, which would fsync on the event loop."""

T = TypeVar("T")


class RunIds:
    """Run ids: UUIDv7 strings, ordered by creation time and strictly increasing in a process."""

    def __init__(self) -> None:
        self._last = 0

    def new(self) -> str:
        value = (time.time_ns() // 1_000_000) << 74 | int.from_bytes(os.urandom(10), "big") >> 6
        value = max(value, self._last + 1)
        self._last = value
        ms, rand_a, rand_b = value >> 74, (value >> 62) & 0xFFF, value & ((1 << 62) - 1)
        return str(uuid.UUID(int=ms << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b))


@dataclass(eq=False, slots=True, kw_only=True)
class _Pending(Pending):
    event: Event
    change: NodeExecution | RunUpdate | None
    publish: Publish | None = None


@dataclass(eq=False, slots=True, kw_only=True)
class _NewRun(Pending):
    values: dict[str, Any]


class _GraphRead:
    """A graph record being read; callers wanting the same one meanwhile wait for it."""

    __slots__ = ("done", "error", "record", "writes")

    def __init__(self, writes: int) -> None:
        self.writes = writes  # the store's count of graph writes begun when the read began
        self.done = anyio.Event()
        self.record: GraphRecord | None = None
        self.error: Exception | None = None


@dataclass(eq=False, slots=True, kw_only=True)
class _Lookup(Pending):
    """A point read by key on Postgres; lookups made at once share a statement."""

    key: str
    found: Any = None


@dataclass(slots=True)
class _Writes:
    """The rows of one batch: events, node upserts, ``last_seq`` updates, other run updates."""

    events: list[dict[str, Any]]
    nodes: list[dict[str, Any]]
    seq_only: list[dict[str, Any]]
    runs: list[tuple[str, dict[str, Any]]]


_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def _dumps(value: Any) -> str:
    # ``json.dumps`` with these options builds a new encoder per call: this runs per value stored.
    return _JSON.encode(value)


def _sqlite_timestamp(value: datetime | None) -> str | None:
    """A timestamp as ``UTCDateTime`` stores it on SQLite: UTC (a naive one taken to be UTC),
    as SQLite's ``DATETIME`` text, ``YYYY-MM-DD HH:MM:SS.ffffff``."""
    utc = _utc(value)
    return None if utc is None else utc.replace(tzinfo=None).isoformat(" ", "microseconds")


class _SqliteBatches:
    """Writes ``record`` batches (and new runs) on SQLite: on the event loop when it is otherwise
    idle, else in a thread of its own (``INLINE_LAP``); each way one connection kept open, rows
    written through its DB-API cursor with statements prepared once. SQLAlchemy's work per
    statement and a pool checkout per batch cost several times SQLite's own work; the values are
    what SQLAlchemy's bind processors make of them (``processors``), so the rows are the same.
    The thread is reached through a plain executor: ``anyio.to_thread`` adds two trips through
    the event loop (a checkpoint and its limiter's) to every batch."""

    EVENT_COLUMNS = ("run_id", "seq", "type", "graph", "at", "data")
    NODE_KEY = ("run_id", "node", "iteration", "idx")

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.conn: Connection | None = None
        processors = self.processors
        self.event_processors = processors(EVENTS, self.EVENT_COLUMNS)
        self.event_sql = (
            f"INSERT INTO {EVENTS.name} ({', '.join(self.EVENT_COLUMNS)}) "
            f"VALUES ({', '.join('?' for _ in self.EVENT_COLUMNS)})"
        )
        node_columns = (*self.NODE_KEY, *NODE_COLUMNS)
        self.node_columns = node_columns
        self.node_processors = processors(NODES, node_columns)
        self.node_sql = (
            f"INSERT INTO {NODES.name} ({', '.join(node_columns)}) "
            f"VALUES ({', '.join('?' for _ in node_columns)}) "
            f"ON CONFLICT ({', '.join(self.NODE_KEY)}) DO UPDATE SET "
            + ", ".join(f"{name} = excluded.{name}" for name in NODE_COLUMNS)
        )
        self.seq_sql = f"UPDATE {RUNS.name} SET last_seq = ? WHERE id = ?"
        self.run_columns = tuple(column.name for column in RUNS.columns)
        self.run_processors = processors(RUNS, self.run_columns)
        self.no_run_values = dict.fromkeys(self.run_columns)
        self.run_sql = (
            f"INSERT INTO {RUNS.name} ({', '.join(self.run_columns)}) "
            f"VALUES ({', '.join('?' for _ in self.run_columns)})"
        )
        self.run_updates: dict[frozenset[str], tuple[str, tuple[str, ...], list[Any]]] = {}
        self.thread: ThreadPoolExecutor | None = None
        # The event loop's connection, for batches written there: it never waits for a lock
        # (another process writing: the batch goes to the writer thread, which waits) and never
        # checkpoints the WAL (``_checkpoint_soon`` does, in the writer thread).
        self.inline: Connection | None = None
        self.inline_commits = 0
        self.checkpointing = False

    def processors(self, table: Any, names: tuple[str, ...]) -> list[Callable[[Any], Any] | None]:
        """What SQLAlchemy's bind processors make of the values of ``names`` of ``table``: its own
        processors, but for timestamps and JSON values the same text made at a fraction of the
        cost (a row went through them in about 11 µs: a tenth of a node's durable cost)."""
        dialect = self.engine.dialect
        return [
            _sqlite_timestamp
            if isinstance(table.c[name].type, UTCDateTime)
            else _dumps
            if isinstance(table.c[name].type, JSON) and not table.c[name].type.none_as_null
            else table.c[name].type.dialect_impl(dialect).bind_processor(dialect)
            for name in names
        ]

    async def commit(self, writes: _Writes, *, inline: bool) -> list[int]:
        """Write one batch in one transaction: the events' ``gid``s."""
        return await self._written(self.write, writes, inline)

    async def insert_runs(self, runs: list[dict[str, Any]], *, inline: bool) -> None:
        """Insert new runs in one transaction."""
        await self._written(self.write_runs, runs, inline)

    async def _written(self, write: Callable[[sqlite3.Cursor, Any], T], argument: Any, inline: bool) -> T:
        """``write`` in a transaction of its own: with ``inline`` on the event loop if SQLite's
        write lock is free, else in the writer thread."""
        if inline:
            try:
                result = self._transaction(write, argument, inline=True)
            except DBAPIError as exc:
                if not _busy(exc):
                    raise
                log.debug("SQLite is busy (%s); writing through the writer thread", exc.orig)
            else:
                self.inline_commits += 1
                if self.inline_commits >= INLINE_CHECKPOINT_EVERY and not self.checkpointing:
                    self._checkpoint_soon()
                return result
        return await asyncio.get_running_loop().run_in_executor(
            self._thread(), self._transaction, write, argument
        )

    def _thread(self) -> ThreadPoolExecutor:
        if self.thread is None:
            self.thread = ThreadPoolExecutor(1, thread_name_prefix="braid-sqlite-writer")
        return self.thread

    def _checkpoint_soon(self) -> None:
        """Checkpoint the WAL in the writer thread (``PASSIVE``: writers go on meanwhile)."""
        self.checkpointing = True
        self.inline_commits = 0

        def checkpoint() -> None:
            conn = self.conn
            if conn is None:
                conn = self.conn = self.engine.connect()
            try:
                dbapi = conn.connection.dbapi_connection
                assert dbapi is not None
                dbapi.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except BaseException:
                self.conn = None
                conn.close()
                raise

        def done(future: asyncio.Future[None]) -> None:
            self.checkpointing = False
            if not future.cancelled() and future.exception() is not None:
                log.warning("WAL checkpoint failed: %s", future.exception())

        future = asyncio.get_running_loop().run_in_executor(self._thread(), checkpoint)
        future.add_done_callback(done)

    def _run_update(
        self, columns: frozenset[str]
    ) -> tuple[str, tuple[str, ...], list[Callable[[Any], Any] | None]]:
        """``UPDATE runs`` of ``columns`` by id (``started_at`` keeps its first value), built once
        per set of columns: the statement, its column order and their bind processors."""
        built = self.run_updates.get(columns)
        if built is None:
            names = tuple(sorted(columns))
            sets = [
                f"{name} = coalesce({name}, ?)" if name == "started_at" else f"{name} = ?" for name in names
            ]
            sql = f"UPDATE {RUNS.name} SET {', '.join(sets)} WHERE id = ?"
            built = self.run_updates[columns] = (sql, names, self.processors(RUNS, names))
        return built

    def write_runs(self, cursor: sqlite3.Cursor, runs: list[dict[str, Any]]) -> None:
        # A column a run leaves out (``started_at`` of a new run) is NULL, as in SQLAlchemy's insert.
        rows = [
            self._row({**self.no_run_values, **run}, self.run_columns, self.run_processors) for run in runs
        ]
        self._execute(cursor, self.run_sql, rows, many=True)

    async def aclose(self) -> None:
        thread, self.thread = self.thread, None
        if thread is not None:
            await asyncio.get_running_loop().run_in_executor(thread, self.close)
            thread.shutdown(wait=False)
        else:
            self.close()

    def write(self, cursor: sqlite3.Cursor, writes: _Writes) -> list[int]:
        gids: list[int] = []
        for row in writes.events:
            self._execute(cursor, self.event_sql, self._row(row, self.EVENT_COLUMNS, self.event_processors))
            gid = cursor.lastrowid
            assert gid is not None  # set by every INSERT
            gids.append(gid)
        if writes.nodes:
            rows = [self._row(n, self.node_columns, self.node_processors) for n in writes.nodes]
            self._execute(cursor, self.node_sql, rows, many=True)
        if writes.seq_only:
            rows = [(r["b_seq"], r["b_id"]) for r in writes.seq_only]
            self._execute(cursor, self.seq_sql, rows, many=True)
        for run_id, values in writes.runs:
            sql, names, processors = self._run_update(frozenset(values))
            self._execute(cursor, sql, [*self._row(values, names, processors), run_id])
        return gids

    def _transaction(
        self, write: Callable[[sqlite3.Cursor, Any], T], argument: Any, *, inline: bool = False
    ) -> T:
        """``write(cursor, argument)`` with a cursor of the writer thread's connection (or, with
        ``inline``, the event loop's), in one transaction."""
        conn = self.inline if inline else self.conn
        if conn is None:
            conn = self.engine.connect()
            if inline:
                dbapi = conn.connection.dbapi_connection
                assert dbapi is not None
                dbapi.execute("PRAGMA busy_timeout=0")
                dbapi.execute("PRAGMA wal_autocheckpoint=0")
                self.inline = conn
            else:
                self.conn = conn
        try:
            with conn.begin():
                dbapi = conn.connection.dbapi_connection
                assert dbapi is not None
                cursor = cast(sqlite3.Cursor, dbapi.cursor())
                try:
                    return write(cursor, argument)
                finally:
                    cursor.close()
        except BaseException:
            # A fresh connection for the next batch, whatever state this one is in; the event
            # loop's is dropped rather than pooled, for its settings to stay its own.
            if inline:
                self.inline = None
                conn.invalidate()
            else:
                self.conn = None
            conn.close()
            raise

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.inline is not None:
            self.inline.invalidate()
            self.inline.close()
            self.inline = None

    @staticmethod
    def _row(
        values: dict[str, Any], names: tuple[str, ...], processors: list[Callable[[Any], Any] | None]
    ) -> list[Any]:
        return [
            values[name] if process is None else process(values[name])
            for name, process in zip(names, processors, strict=True)
        ]

    @staticmethod
    def _execute(cursor: Any, sql: str, params: Any, *, many: bool = False) -> None:
        """``cursor.execute`` (or ``executemany``), its errors raised as SQLAlchemy's (an
        ``IntegrityError`` for a duplicate event or an unknown run), as the store expects."""
        try:
            if many:
                cursor.executemany(sql, params)
            else:
                cursor.execute(sql, params)
        except sqlite3.Error as exc:
            raise DBAPIError.instance(sql, params, exc, sqlite3.Error) from exc


class _SqlitePointReads:
    """Point reads by key (a run by id, a graph's latest version number) on the calling thread,
    the event loop's: an indexed lookup takes SQLite microseconds, while a trip to a reader
    thread costs a hundred or more of the event loop's own, and under load its Python side
    holds the GIL against the loop anyway. The connection is read-only and never waits for a
    lock (``busy_timeout=0``): in WAL mode a reader needs none, and if SQLite still says busy
    (a crashed writer's WAL being recovered) the caller reads through a reader thread instead.
    Values go through the result processors SQLAlchemy applies, so the rows are the same."""

    def __init__(self, path: str, dialect: Any) -> None:
        self.path = path
        self.conn: sqlite3.Connection | None = None

        def processors(table: Any) -> list[Callable[[Any], Any] | None]:
            return [
                column.type.dialect_impl(dialect).result_processor(dialect, None) for column in table.columns
            ]

        self.run_columns = tuple(column.name for column in RUNS.columns)
        self.run_processors = processors(RUNS)
        self.run_sql = f"SELECT {', '.join(self.run_columns)} FROM {RUNS.name} WHERE id = ?"
        self.latest_sql = f"SELECT max(version) FROM {GRAPHS.name} WHERE name = ?"

    def _connection(self) -> sqlite3.Connection:
        conn = self.conn
        if conn is None:
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA busy_timeout=0")
            conn.execute("PRAGMA query_only=ON")
            self.conn = conn
        return conn

    def run(self, run_id: str) -> RunRecord | None:
        """The run, None if there is none; ``sqlite3.Error`` if SQLite could not read now."""
        row = self._connection().execute(self.run_sql, (run_id,)).fetchone()
        if row is None:
            return None
        values = [
            value if process is None or value is None else process(value)
            for value, process in zip(row, self.run_processors, strict=True)
        ]
        return _run(_Columns(zip(self.run_columns, values, strict=True)))

    def latest_version(self, name: str) -> int | None:
        row = self._connection().execute(self.latest_sql, (name,)).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()


class _Columns(dict[str, Any]):
    """A row's values by column name, read as attributes (what ``_run`` reads of a row)."""

    __getattr__ = dict.__getitem__


def _set_sqlite_pragmas(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class SqlStore:
    """The ``Store`` on a SQL database, from a ``sqlite+aiosqlite://`` or ``postgresql+asyncpg://`` URL."""

    def __init__(self, url: str, *, batch_size: int = 512) -> None:
        self.url = url
        self._engine = create_async_engine(
            url,
            json_serializer=_dumps,
            **({} if url.startswith("sqlite") else {"pool_pre_ping": True, "max_overflow": 5}),
        )
        self._sqlite = self._engine.dialect.name == "sqlite"
        # SQLite event batches go through a synchronous connection in a thread of their own (one
        # round trip per batch); not for an in-memory database, which a second engine would not see.
        self._writer: Engine | None = None
        self._batches: _SqliteBatches | None = None
        self._writer_thread = anyio.CapacityLimiter(1)
        # Reads: on SQLite, synchronous connections in threads of their own (one thread hop per
        # read instead of aiosqlite's several); on Postgres, autocommit connections: the query
        # alone, without the BEGIN and ROLLBACK around each read, and without a pre-ping (a round
        # trip per checkout): a statement that meets a connection Postgres dropped is tried once
        # more on a new one (``_autocommitted``).
        self._reader: Engine | None = None
        self._points: _SqlitePointReads | None = None
        self._reader_threads = anyio.CapacityLimiter(READER_THREADS)
        self._autocommit: AsyncEngine = self._engine
        if self._sqlite:
            event.listen(self._engine.sync_engine, "connect", _set_sqlite_pragmas)
            database = self._engine.url.database
            if database and database != ":memory:" and not database.startswith("file:"):
                sync_url = self._engine.url.set(drivername="sqlite+pysqlite")
                self._writer = create_engine(sync_url, json_serializer=_dumps)
                event.listen(self._writer, "connect", _set_sqlite_pragmas)
                main = self._engine.sync_engine
                event.listen(self._writer, "commit", lambda conn: main.dispatch.commit(conn))
                self._batches = _SqliteBatches(self._writer)
                self._reader = create_engine(sync_url, json_serializer=_dumps)
                event.listen(self._reader, "connect", _set_sqlite_pragmas)
                self._points = _SqlitePointReads(database, self._reader.dialect)
        else:
            self._autocommit = create_async_engine(
                url,
                json_serializer=_dumps,
                isolation_level="AUTOCOMMIT",
                # Reads and single inserts of many concurrent requests share AUTOCOMMIT_POOL
                # connections, waiting for one when all are busy: overflow connections are closed
                # when handed back, so under load each statement paid for a new Postgres
                # connection (a backend started and torn down) and the API slowed down the more
                # requests it had at once.
                pool_size=AUTOCOMMIT_POOL,
                max_overflow=0,
            )
        # Graph reads by (name, version or None for the latest): (expiry, record).
        self._graphs: dict[tuple[str, int], tuple[float, GraphRecord]] = {}
        self._graph_writes = 0
        # Graph reads in flight: a burst of POSTs to one graph finding the cache expired reads the
        # record once, the others wait for that read (they each read it, 60 reads queued for the
        # reader threads, and the burst's runs were created milliseconds later).
        self._graph_reads: dict[tuple[str, int], _GraphRead] = {}
        self._sessions = async_sessionmaker(self._engine, class_=AsyncSession, expire_on_commit=False)
        self._ids = RunIds()
        self._records = GroupCommit[_Pending](self._write_batch, batch_size, idle_lap=INLINE_LAP)
        # Runs created at once (a burst of POSTs) share a transaction: on SQLite, one at a time
        # each, they queued for the writer ahead of the events of the runs already going.
        self._creations = GroupCommit[_NewRun](self._insert_runs, batch_size, idle_lap=INLINE_LAP)
        # Point reads on Postgres made at once (the runs a worker takes together, the POSTs an
        # API process answers together) share one statement: a statement costs the event loop
        # more in SQLAlchemy's and asyncpg's work and its socket writes than in its rows.
        self._run_lookups = GroupCommit[_Lookup](
            lambda batch: self._look_up(batch, PG_RUN_BY_ID, PG_RUNS_BY_ID, lambda row: (row.id, _run(row))),
            batch_size,
        )
        self._latest_lookups = GroupCommit[_Lookup](
            lambda batch: self._look_up(batch, PG_LATEST_VERSION, PG_LATEST_VERSIONS, tuple),
            batch_size,
        )
        # SQLite has one writer at a time; taking turns in-process avoids "database is locked".
        self._sqlite_lock = anyio.Lock(fast_acquire=True)
        # The statements of ``record`` and new runs on an in-memory SQLite database (a file has its
        # writer thread, Postgres its own SQL), built once: building an upsert costs more than
        # running it.
        self._insert_events = EVENTS.insert().returning(EVENTS.c.gid, sort_by_parameter_order=True)
        upsert = sqlite_insert(NODES)
        self._upsert_nodes = upsert.on_conflict_do_update(
            index_elements=["run_id", "node", "iteration", "idx"],
            set_={name: upsert.excluded[name] for name in NODE_COLUMNS},
        )
        self._insert_run = RUNS.insert()
        self._run_statements: dict[frozenset[str], Update] = {}
        self._set_last_seq = (
            update(RUNS).where(RUNS.c.id == bindparam("b_id")).values(last_seq=bindparam("b_seq"))
        )

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        async with self._engine.begin() as conn:
            if not self._sqlite:
                await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": START_LOCK})
            found = await conn.run_sync(_schema_version)
            if found is not None and found != SCHEMA_VERSION:
                where = self._engine.url.render_as_string(hide_password=True)
                holds = f"Braid schema version {found}" if found else "tables but no Braid schema version"
                raise SetupError(
                    f"the database at {where} holds {holds}, but this Braid needs schema version "
                    f"{SCHEMA_VERSION}: "
                    "use the Braid release that matches the database, or point BRAID_DATABASE_URL at "
                    "a new database (for SQLite, a new file) and load your graphs again"
                )
            await conn.run_sync(SQLModel.metadata.create_all)
            if found is None:
                await conn.execute(SCHEMA.insert().values(id=1, version=SCHEMA_VERSION))

    async def close(self) -> None:
        if self._batches is not None:
            await self._batches.aclose()
        if self._writer is not None:
            await anyio.to_thread.run_sync(self._writer.dispose, limiter=self._writer_thread)
        if self._points is not None:
            self._points.close()
        if self._reader is not None:
            await anyio.to_thread.run_sync(self._reader.dispose, limiter=self._reader_threads)
        if self._autocommit is not self._engine:
            await self._autocommit.dispose()
        await self._engine.dispose()

    async def ping(self) -> bool:
        try:
            with anyio.move_on_after(5):
                async with self._engine.connect() as conn:
                    return (await conn.execute(text("SELECT 1"))).scalar() == 1
        except Exception:
            return False
        return False

    # --- graphs ---------------------------------------------------------------------------------

    async def create_graph(
        self, name: str, spec: dict[str, Any], description: str | None, nodes: int
    ) -> GraphRecord:
        row = GraphRow(
            name=name, version=1, spec=spec, description=description, nodes=nodes, created_at=utcnow()
        )
        try:
            async with self._writing_graphs() as session:
                session.add(row)
        except IntegrityError:
            raise Conflict(
                f"graph {name!r} already exists: PUT /graphs/{name} stores a new version"
            ) from None
        return _graph(row)

    async def put_graph(
        self, name: str, spec: dict[str, Any], description: str | None, nodes: int
    ) -> tuple[GraphRecord, bool]:
        for attempt in range(5):
            try:
                async with self._writing_graphs() as session:
                    if not self._sqlite:
                        # Writers of one graph take turns, so they never race for a version number.
                        key = zlib.crc32(name.encode()) - (1 << 31)
                        await session.exec(select(func.pg_advisory_xact_lock(GRAPH_LOCK, key)))
                    latest = (
                        await session.exec(select(func.max(GraphRow.version)).where(GraphRow.name == name))
                    ).one()
                    row = GraphRow(
                        name=name,
                        version=(latest or 0) + 1,
                        spec=spec,
                        description=description,
                        nodes=nodes,
                        created_at=utcnow(),
                    )
                    session.add(row)
                return _graph(row), row.version == 1
            except IntegrityError:
                # ``create_graph`` took version 1 meanwhile: read the new maximum again.
                if attempt == 4:
                    raise
        raise AssertionError("unreachable")

    async def get_graph(self, name: str, version: int | None = None) -> GraphRecord:
        if version is None:
            # The latest version is always read (a version stored by another process a moment ago
            # is the one a run gets); the record of that version may come from memory.
            latest = await self._point_read(
                lambda points: points.latest_version(name),
                lambda conn: _latest_version(conn, name),
                self._latest_lookups,
                name,
            )
            if latest is None:
                raise NotFound(f"graph {name!r} not found")
            version = latest
        key = (name, version)
        while True:
            now = time.monotonic()
            cached = self._graphs.get(key)
            if cached is not None and cached[0] > now:
                return cached[1]
            flight = self._graph_reads.get(key)
            if flight is None or flight.writes != self._graph_writes:
                break  # none in flight, or it began before a graph write: read anew
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error
            if flight.record is not None:
                return flight.record
            # The read was cancelled: try again.
        writes = self._graph_writes
        flight = self._graph_reads[key] = _GraphRead(writes)
        try:
            record = flight.record = await self._read(lambda conn: _read_graph(conn, name, version))
        except Exception as exc:
            flight.error = exc
            raise
        finally:
            if self._graph_reads.get(key) is flight:
                del self._graph_reads[key]
            flight.done.set()
        if writes == self._graph_writes:  # no write began meanwhile: the record is current
            if len(self._graphs) >= GRAPH_CACHE_SIZE:
                self._graphs.clear()
            self._graphs[key] = (now + GRAPH_TTL_SECONDS, record)
        return record

    async def graph_versions(self, name: str) -> list[GraphRecord]:
        query = select(GraphRow).where(GraphRow.name == name).order_by(col(GraphRow.version).desc())
        async with self._sessions() as session:
            rows = (await session.exec(query)).all()
        if not rows:
            raise NotFound(f"graph {name!r} not found")
        return [_graph(row) for row in rows]

    async def list_graphs(self) -> list[GraphSummary]:
        latest = (
            select(GraphRow.name, func.max(GraphRow.version).label("version"))
            .group_by(col(GraphRow.name))
            .subquery()
        )
        graphs = (
            select(GraphRow)
            .join(latest, (col(GraphRow.name) == latest.c.name) & (col(GraphRow.version) == latest.c.version))
            .order_by(col(GraphRow.name))
        )
        async with self._sessions() as session:
            rows = (await session.exec(graphs)).all()
            names = [row.name for row in rows]
            last_ids = (
                select(func.max(RunRow.id)).where(col(RunRow.graph).in_(names)).group_by(col(RunRow.graph))
            ).scalar_subquery()
            runs = (
                (await session.exec(select(RunRow).where(col(RunRow.id).in_(last_ids)))).all()
                if names
                else []
            )
        last = {run.graph: _run(run) for run in runs}
        return [
            GraphSummary(
                name=row.name,
                version=row.version,
                description=row.description,
                nodes=row.nodes,
                created_at=row.created_at,
                last_run=last.get(row.name),
            )
            for row in rows
        ]

    async def delete_graph(self, name: str) -> None:
        async with self._writing_graphs() as session:
            deleted = (
                await session.exec(
                    delete(GraphRow).where(col(GraphRow.name) == name).returning(col(GraphRow.version))
                )
            ).all()
        if not deleted:
            raise NotFound(f"graph {name!r} not found")

    # --- runs -----------------------------------------------------------------------------------

    async def create_run(
        self, graph: str, version: int, input: Any, idempotency_key: str | None = None
    ) -> tuple[RunRecord, bool]:
        run = RunRecord(
            id=self._ids.new(),
            graph=graph,
            version=version,
            status=RunStatus.QUEUED,
            input=input,
            created_at=utcnow(),
            idempotency_key=idempotency_key,
        )
        values = {
            "id": run.id,
            "graph": graph,
            "version": version,
            "status": str(RunStatus.QUEUED),
            "input": input,
            "output": None,
            "error": None,
            "created_at": run.created_at,
            "usage": {},
            "idempotency_key": idempotency_key,
            "last_seq": 0,
        }
        try:
            await self._creations.submit(_NewRun(values=values))
        except IntegrityError:
            if idempotency_key is None:
                raise
            query = sa_select(RUNS).where(RUNS.c.graph == graph, RUNS.c.idempotency_key == idempotency_key)
            existing = await self._read(lambda conn: conn.execute(query).first())
            if existing is None:
                raise
            return _run(existing), False
        return run, True

    async def _insert_runs(self, batch: list[_NewRun]) -> None:
        """Insert a batch of new runs in one statement; if one of them fails (an idempotency key
        taken meanwhile), each one alone, so only that one fails."""
        try:
            await self._write_runs([item.values for item in batch])
        except IntegrityError:
            if len(batch) == 1:
                raise
            for item in batch:
                try:
                    await self._write_runs([item.values])
                except IntegrityError as exc:
                    item.error = exc

    async def _write_runs(self, runs: list[dict[str, Any]]) -> None:
        if self._batches is not None:
            async with self._sqlite_lock:
                await self._batches.insert_runs(runs, inline=self._creations.inline)
        elif not self._sqlite:
            parameters = (
                [r["id"] for r in runs],
                [r["graph"] for r in runs],
                [r["version"] for r in runs],
                [r["status"] for r in runs],
                [_dumps(r["input"]) for r in runs],
                [_utc(r["created_at"]) for r in runs],
                [_dumps(r["usage"]) for r in runs],
                [r["idempotency_key"] for r in runs],
            )
            await self._autocommitted(lambda conn: conn.exec_driver_sql(PG_INSERT_RUNS, parameters))
        else:  # an in-memory SQLite database
            async with self._sqlite_lock, self._engine.begin() as conn:
                await conn.execute(self._insert_run, runs)

    async def get_run(self, run_id: str) -> RunRecord:
        def read(conn: Connection) -> RunRecord | None:
            row = conn.execute(RUN_BY_ID, {"run_id": run_id}).first()
            return None if row is None else _run(row)

        run = await self._point_read(lambda points: points.run(run_id), read, self._run_lookups, run_id)
        if run is None:
            raise NotFound(f"run {run_id!r} not found")
        return run

    async def list_runs(
        self,
        graph: str | None = None,
        status: RunStatus | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> tuple[list[RunRecord], str | None]:
        query = select(RunRow)
        if graph is not None:
            query = query.where(RunRow.graph == graph)
        if status is not None:
            query = query.where(RunRow.status == str(status))
        if before is not None:
            query = query.where(col(RunRow.id) < before)
        query = query.order_by(col(RunRow.id).desc()).limit(limit + 1)
        async with self._sessions() as session:
            rows = (await session.exec(query)).all()
        runs = [_run(row) for row in rows[:limit]]
        return runs, (runs[-1].id if len(rows) > limit and runs else None)

    async def runs_with_status(self, *statuses: RunStatus) -> list[RunRecord]:
        query = (
            select(RunRow).where(col(RunRow.status).in_([str(s) for s in statuses])).order_by(col(RunRow.id))
        )
        async with self._sessions() as session:
            return [_run(row) for row in (await session.exec(query)).all()]

    async def node_executions(self, run_id: str) -> list[NodeExecution]:
        query = (
            sa_select(NODES)
            .where(NODES.c.run_id == run_id)
            .order_by(NODES.c.started_at.is_(None), NODES.c.started_at, NODES.c.id)
        )
        return await self._read(lambda conn: [_execution(row) for row in conn.execute(query)])

    async def run_state(self, run_id: str) -> RunState:
        return await self._read(lambda conn: _read_run_state(conn, run_id))

    # --- events ---------------------------------------------------------------------------------

    async def record(
        self, event: Event, change: NodeExecution | RunUpdate | None = None, *, publish: Publish | None = None
    ) -> None:
        await self._records.submit(_Pending(event=event, change=change, publish=publish))

    def record_later(
        self, event: Event, change: NodeExecution | RunUpdate | None = None, *, publish: Publish | None = None
    ) -> _Pending:
        item = _Pending(event=event, change=change, publish=publish)
        self._records.queue.append(item)
        return item

    async def finish(self, pending: Sequence[object]) -> None:
        await self._records.all_written(cast("list[_Pending]", list(pending)))

    async def _write_batch(self, batch: list[_Pending]) -> None:
        try:
            await self._commit(batch)
        except Exception as exc:
            if len(batch) == 1 or not _bad_data(exc):
                for item in batch:
                    item.error = _conflict(item, exc)
            else:
                # Find the culprit: one bad event must not fail the other runs' events. A run's
                # events after its failed one fail with it, so its sequence keeps no gap.
                failed: dict[str, Exception] = {}
                for item in batch:
                    earlier = failed.get(item.event.run_id)
                    if earlier is not None:
                        item.error = earlier
                        continue
                    try:
                        await self._commit([item])
                    except Exception as item_exc:
                        item.error = failed[item.event.run_id] = _conflict(item, item_exc)
        failures = {item.event.run_id: item.error for item in batch if item.error is not None}
        queue = self._records.queue
        if failures and queue:
            # Events of those runs queued meanwhile come later in their sequence: fail them too.
            later = [p for p in queue if p.event.run_id in failures]
            queue[:] = [p for p in queue if p.event.run_id not in failures]
            for item in later:
                item.finish(failures[item.event.run_id])
        await _publish(batch)

    async def _commit(self, batch: list[_Pending]) -> None:
        events = [
            {
                "run_id": e.run_id,
                "seq": e.seq,
                "type": str(e.type),
                "graph": e.graph,
                "at": e.at,
                "data": e.data,
            }
            for e in (item.event for item in batch)
        ]
        nodes: dict[tuple[str, str, int, int], dict[str, Any]] = {}
        last_seq: dict[str, int] = {}
        run_params: dict[str, dict[str, Any]] = {}  # the changed columns of each updated run
        for item in batch:
            run_id, change = item.event.run_id, item.change
            last_seq[run_id] = max(item.event.seq, last_seq.get(run_id, 0))
            if isinstance(change, NodeExecution):
                idx = WHOLE_NODE if change.index is None else change.index
                nodes[(run_id, change.node, change.iteration, idx)] = {
                    "run_id": run_id,
                    "node": change.node,
                    "iteration": change.iteration,
                    "idx": idx,
                    "status": str(change.status),
                    "attempts": change.attempts,
                    "output": change.output,
                    "error": change.error,
                    "started_at": change.started_at,
                    "finished_at": change.finished_at,
                    "usage": change.usage,
                }
            elif isinstance(change, RunUpdate):
                run_params.setdefault(run_id, {}).update(_run_params(change))
        seq_only = [{"b_id": r, "b_seq": seq} for r, seq in last_seq.items() if r not in run_params]
        changed = [(r, {**values, "last_seq": last_seq[r]}) for r, values in run_params.items()]
        writes = _Writes(events, list(nodes.values()), seq_only, changed)

        if self._batches is not None:
            async with self._sqlite_lock:
                gids = await self._batches.commit(writes, inline=self._records.inline)
        elif not self._sqlite:
            gids = await self._commit_postgres(writes, last_seq, run_params)
        else:  # an in-memory SQLite database
            async with self._sqlite_lock, self._engine.begin() as conn:
                gids = [int(gid) for gid in (await conn.execute(self._insert_events, events)).scalars()]
                if writes.nodes:
                    await conn.execute(self._upsert_nodes, writes.nodes)
                if writes.seq_only:
                    await conn.execute(self._set_last_seq, writes.seq_only)
                await self._update_runs(conn, run_params, last_seq)
        for item, gid in zip(batch, gids, strict=True):
            item.event.gid = gid

    async def _commit_postgres(
        self, writes: _Writes, last_seq: dict[str, int], runs: dict[str, dict[str, Any]]
    ) -> list[int]:
        """A batch on Postgres as one statement (``PG_RECORD``), so one round trip and its own
        transaction: a transaction of a statement each (BEGIN, the lock, the events, the nodes,
        the runs, COMMIT) cost eight round trips, each waiting behind the worker's other tasks."""
        events = writes.events
        nodes = writes.nodes
        updated = [(run_id, runs.get(run_id, {})) for run_id in last_seq]
        parameters = (
            FEED_LOCK,
            [e["run_id"] for e in events],
            [e["seq"] for e in events],
            [e["type"] for e in events],
            [e["graph"] for e in events],
            [_utc(e["at"]) for e in events],
            [_dumps(e["data"]) for e in events],
            [n["run_id"] for n in nodes],
            [n["node"] for n in nodes],
            [n["iteration"] for n in nodes],
            [n["idx"] for n in nodes],
            [n["status"] for n in nodes],
            [n["attempts"] for n in nodes],
            [_dumps(n["output"]) for n in nodes],
            [n["error"] for n in nodes],
            [_utc(n["started_at"]) for n in nodes],
            [_utc(n["finished_at"]) for n in nodes],
            [_dumps(n["usage"]) for n in nodes],
            [run_id for run_id, _ in updated],
            [last_seq[run_id] for run_id, _ in updated],
            [values.get("status") for _, values in updated],
            [_utc(values.get("started_at")) for _, values in updated],
            [_utc(values.get("finished_at")) for _, values in updated],
            ["finished_at" in values for _, values in updated],
            [_dumps(values.get("output")) for _, values in updated],
            [values.get("error") for _, values in updated],
            [_dumps(values.get("usage")) for _, values in updated],
        )

        async def record(conn: AsyncConnection) -> list[tuple[int, str, int]]:
            result = await conn.exec_driver_sql(PG_RECORD, parameters)
            return cast("list[tuple[int, str, int]]", result.all())

        rows = await self._autocommitted(record)
        gids = {(run_id, seq): int(gid) for gid, run_id, seq in rows}
        return [gids[(e["run_id"], e["seq"])] for e in events]

    async def _update_runs(
        self, conn: AsyncConnection, runs: dict[str, dict[str, Any]], last_seq: dict[str, int]
    ) -> None:
        """A batch's run updates, one statement per set of changed columns run for all the runs
        at once, rather than one statement built, compiled and sent per run."""
        groups: dict[frozenset[str], list[dict[str, Any]]] = {}
        for run_id, values in runs.items():
            params = {f"b_{name}": value for name, value in values.items()}
            params["b_id"], params["b_last_seq"] = run_id, last_seq[run_id]
            groups.setdefault(frozenset(values), []).append(params)
        for columns, rows in groups.items():
            statement = self._run_statements.get(columns)
            if statement is None:
                statement = self._run_statements[columns] = _update_runs_statement(columns)
            await conn.execute(statement, rows)

    async def events(self, run_id: str, after: int = 0, limit: int | None = None) -> list[Event]:
        query = (
            sa_select(EVENTS).where(EVENTS.c.run_id == run_id, EVENTS.c.seq > after).order_by(EVENTS.c.seq)
        )
        if limit is not None:
            query = query.limit(limit)
        return await self._read(lambda conn: [_event(row) for row in conn.execute(query)])

    async def feed(
        self, after: int = 0, limit: int = 500, graph: str | None = None, deltas: bool = False
    ) -> list[Event]:
        query = sa_select(EVENTS).where(EVENTS.c.gid > after)
        if not deltas:
            query = query.where(EVENTS.c.type != str(EventType.NODE_DELTA))
        if graph is not None:
            query = query.where(EVENTS.c.graph == graph)
        query = query.order_by(EVENTS.c.gid).limit(limit)
        return await self._read(lambda conn: [_event(row) for row in conn.execute(query)])

    # --- helpers --------------------------------------------------------------------------------

    @asynccontextmanager
    async def _write(self) -> AsyncGenerator[AsyncSession, None]:
        """A write transaction, committed on exit."""
        lock: AbstractAsyncContextManager[Any] = self._sqlite_lock if self._sqlite else nullcontext()
        async with lock, self._sessions() as session, session.begin():
            yield session

    @asynccontextmanager
    async def _writing_graphs(self) -> AsyncGenerator[AsyncSession, None]:
        """``_write`` for graph rows: graph reads in flight meanwhile are not cached, and what
        was cached is forgotten."""
        self._graph_writes += 1
        self._graphs.clear()
        try:
            async with self._write() as session:
                yield session
        finally:
            self._graph_writes += 1
            self._graphs.clear()

    async def _point_read(
        self,
        quick: Callable[[_SqlitePointReads], T],
        read: Callable[[Connection], T],
        lookups: GroupCommit[_Lookup],
        key: str,
    ) -> T:
        """A read by key: ``quick`` on SQLite's point-read connection, on Postgres a lookup of
        ``key`` in ``lookups`` (see ``_look_up``), else (or when SQLite is busy) ``read``."""
        if not self._sqlite:
            lookup = _Lookup(key=key)
            await lookups.submit(lookup)
            return lookup.found
        points = self._points
        if points is not None:
            try:
                return quick(points)
            except sqlite3.Error as exc:
                points.close()  # opened again for the next read, whatever state it was in
                log.debug("point read failed (%s); reading through a reader thread", exc)
        return await self._read(read)

    async def _look_up(
        self, batch: list[_Lookup], one: str, many: str, pair: Callable[[Any], tuple[str, Any]]
    ) -> None:
        """Set ``found`` of each lookup of ``batch``: one statement of SQL of its own (no
        statement compiled and no rows processed by SQLAlchemy, asyncpg's codecs give the values
        as they are stored), ``one`` for a key, ``many`` for several; ``pair`` makes a row into
        its key and what is found. A key without a row finds None."""
        keys = list(dict.fromkeys(lookup.key for lookup in batch))

        async def read(conn: AsyncConnection) -> Any:
            if len(keys) == 1:
                return (await conn.exec_driver_sql(one, (keys[0],))).all()
            return (await conn.exec_driver_sql(many, (keys,))).all()

        found = dict(pair(row) for row in await self._autocommitted(read))
        for lookup in batch:
            lookup.found = found.get(lookup.key)

    async def _read(self, read: Callable[[Connection], T]) -> T:
        """``read`` on a read connection: a synchronous SQLite connection in a reader thread, or
        an autocommit connection (``AsyncConnection.run_sync``)."""
        reader = self._reader
        if reader is not None:

            def in_thread() -> T:
                with reader.connect() as conn:
                    return read(conn)

            return await anyio.to_thread.run_sync(in_thread, limiter=self._reader_threads)
        return await self._autocommitted(lambda conn: conn.run_sync(read))

    async def _autocommitted(self, use: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """``use`` on an autocommit connection (each statement its own transaction). A connection
        found dead (Postgres restarted since it was pooled: SQLAlchemy then drops every pooled
        connection) is replaced and ``use`` called once more. That is safe for one statement:
        a statement sent on a dead connection never ran, and one whose connection broke while it
        ran and that did commit fails the second time as a duplicate, like any duplicate."""
        for attempt in (1, 2):
            try:
                async with self._autocommit.connect() as conn:
                    return await use(conn)
            except DBAPIError as exc:
                if attempt == 2 or not exc.connection_invalidated:
                    raise
                log.info("a pooled database connection was dead (%s); trying on a new one", exc.orig)
        raise AssertionError("unreachable")


def _busy(exc: DBAPIError) -> bool:
    """Whether SQLite refused ``exc``'s statement for a lock another connection holds."""
    code = getattr(exc.orig, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


async def _publish(batch: list[_Pending]) -> None:
    """The events of a batch just written, to their ``publish`` in the order they were written
    (each run's in its sequence, the feed's in ``gid`` order), before their callers go on: a
    failure to publish is theirs, as if ``record`` had published after writing."""
    groups: dict[Publish, list[_Pending]] = {}
    for item in batch:
        if item.publish is not None and item.error is None:
            groups.setdefault(item.publish, []).append(item)
    for publish, items in groups.items():
        try:
            await publish([item.event for item in items])
        except Exception as exc:
            for item in items:
                item.error = exc


def _conflict(item: _Pending, exc: Exception) -> Exception:
    """A duplicate event (another writer took its sequence number) is a ``Conflict``."""
    if isinstance(exc, IntegrityError):
        event = item.event
        return Conflict(f"event {event.seq} of run {event.run_id} was already recorded by another writer")
    return exc


def _bad_data(exc: Exception) -> bool:
    """The error is about the statement's data (a duplicate, an unknown run), not the database."""
    if isinstance(exc, IntegrityError | DataError):
        return True
    return isinstance(exc, StatementError | TypeError | ValueError) and not isinstance(exc, DBAPIError)


def _schema_version(conn: Connection) -> int | None:
    """The schema version the database holds (None for a new database)."""
    inspector = inspect(conn)
    if not inspector.has_table(SCHEMA.name):
        if any(inspector.has_table(name) for name in ("runs", "events", "graphs")):
            return 0
        return None
    version = conn.execute(select(SCHEMA.c.version).where(SCHEMA.c.id == 1)).scalar()
    return None if version is None else int(version)


# Hot reads, built once: building a statement (and its cache key) costs more than running it.
LATEST_VERSION = sa_select(func.max(GRAPHS.c.version)).where(GRAPHS.c.name == bindparam("name"))
RUN_BY_ID = sa_select(RUNS).where(RUNS.c.id == bindparam("run_id"))
PG_INSERT_RUNS = f"""
INSERT INTO {RUNS.name} (id, graph, version, status, input, output, error, created_at, usage,
    idempotency_key, last_seq)
SELECT r.id, r.graph, r.version, r.status, r.input::jsonb, 'null'::jsonb, NULL, r.created_at,
    r.usage::jsonb, r.idempotency_key, 0
FROM unnest($1::text[], $2::text[], $3::int[], $4::text[], $5::text[], $6::timestamptz[], $7::text[],
    $8::text[]) AS r(id, graph, version, status, input, created_at, usage, idempotency_key)
"""
"""New runs on Postgres, in one statement of plain SQL (as ``create_run`` builds them: queued, no
output, ``last_seq`` 0; JSON as text, ``'null'`` for None as SQLAlchemy's JSON type stores it)."""
PG_LATEST_VERSION = f"SELECT name, max(version) FROM {GRAPHS.name} WHERE name = $1 GROUP BY name"
PG_LATEST_VERSIONS = (
    f"SELECT name, max(version) FROM {GRAPHS.name} WHERE name = ANY($1::varchar[]) GROUP BY name"
)
PG_RUN_BY_ID = f"SELECT {', '.join(c.name for c in RUNS.columns)} FROM {RUNS.name} WHERE id = $1"
PG_RUNS_BY_ID = (
    f"SELECT {', '.join(c.name for c in RUNS.columns)} FROM {RUNS.name} WHERE id = ANY($1::varchar[])"
)


def _latest_version(conn: Connection, name: str) -> int | None:
    return conn.execute(LATEST_VERSION, {"name": name}).scalar()


def _read_graph(conn: Connection, name: str, version: int | None) -> GraphRecord:
    query = sa_select(GRAPHS).where(GRAPHS.c.name == name)
    if version is None:
        query = query.order_by(GRAPHS.c.version.desc()).limit(1)
    else:
        query = query.where(GRAPHS.c.version == version)
    row = conn.execute(query).first()
    if row is None:
        if version is not None:
            exists = conn.execute(select(GRAPHS.c.version).where(GRAPHS.c.name == name).limit(1)).first()
            if exists is not None:
                raise NotFound(f"graph {name!r} has no version {version}")
        raise NotFound(f"graph {name!r} not found")
    return _graph(row)


def _read_run_state(conn: Connection, run_id: str) -> RunState:
    last_seq = conn.execute(select(RUNS.c.last_seq).where(RUNS.c.id == run_id)).scalar()
    if last_seq is None:
        raise NotFound(f"run {run_id!r} not found")
    started = select(EVENTS.c.gid).where(
        EVENTS.c.run_id == run_id, EVENTS.c.type == str(EventType.WORKFLOW_STARTED)
    )
    has_started = conn.execute(started.limit(1)).first() is not None
    ended = (
        sa_select(NODES)
        .where(NODES.c.run_id == run_id, NODES.c.status.in_([str(s) for s in RESUMABLE]))
        .order_by(NODES.c.started_at.is_(None), NODES.c.started_at, NODES.c.id)
    )
    executions = [_execution(row) for row in conn.execute(ended)]
    return RunState(last_seq=last_seq, started=has_started, executions=executions)


def _utc(value: datetime | None) -> datetime | None:
    """A timestamp as ``UTCDateTime`` stores it on Postgres: aware, in UTC (naive is taken as UTC)."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _node_sets() -> str:
    return ", ".join(f"{name} = excluded.{name}" for name in NODE_COLUMNS)


PG_RECORD = f"""
WITH feed_lock AS MATERIALIZED (SELECT pg_advisory_xact_lock($1::bigint)),
inserted AS (
    INSERT INTO {EVENTS.name} (run_id, seq, type, graph, at, data)
    SELECT e.run_id, e.seq, e.type, e.graph, e.at, e.data::jsonb
    FROM feed_lock,
        unnest($2::text[], $3::int[], $4::text[], $5::text[], $6::timestamptz[], $7::text[])
        WITH ORDINALITY AS e(run_id, seq, type, graph, at, data, ord)
    ORDER BY e.ord
    RETURNING gid, run_id, seq
),
nodes AS (
    INSERT INTO {NODES.name}
        (run_id, node, iteration, idx, status, attempts, output, error, started_at, finished_at, usage)
    SELECT n.run_id, n.node, n.iteration, n.idx, n.status, n.attempts, n.output::jsonb, n.error,
        n.started_at, n.finished_at, n.usage::jsonb
    FROM feed_lock,
        unnest($8::text[], $9::text[], $10::int[], $11::int[], $12::text[], $13::int[], $14::text[],
            $15::text[], $16::timestamptz[], $17::timestamptz[], $18::text[])
        AS n(run_id, node, iteration, idx, status, attempts, output, error, started_at, finished_at, usage)
    ON CONFLICT (run_id, node, iteration, idx) DO UPDATE SET {_node_sets()}
),
runs_changed AS (
    UPDATE {RUNS.name} SET
        last_seq = u.last_seq,
        status = coalesce(u.status, {RUNS.name}.status),
        started_at = coalesce({RUNS.name}.started_at, u.started_at),
        finished_at = CASE WHEN u.ended THEN u.finished_at ELSE {RUNS.name}.finished_at END,
        output = CASE WHEN u.ended THEN u.output::jsonb ELSE {RUNS.name}.output END,
        error = CASE WHEN u.ended THEN u.error ELSE {RUNS.name}.error END,
        usage = CASE WHEN u.ended THEN u.usage::jsonb ELSE {RUNS.name}.usage END
    FROM feed_lock,
        unnest($19::text[], $20::int[], $21::text[], $22::timestamptz[], $23::timestamptz[], $24::bool[],
            $25::text[], $26::text[], $27::text[])
        AS u(id, last_seq, status, started_at, finished_at, ended, output, error, usage)
    WHERE {RUNS.name}.id = u.id
)
SELECT gid, run_id, seq FROM inserted
"""
"""One batch of ``record`` on Postgres, in one statement (so in one transaction of its own):
the feed lock first (every part reads ``feed_lock``, so no gid is drawn and no row locked before
it: event ids become visible in commit order, and writers never wait on each other's rows in
opposite orders), then the events, the node executions (upserted) and the runs (``last_seq``;
``status``; ``started_at`` kept once set; ``finished_at``, ``output``, ``error`` and ``usage``
of a run that ended). JSON goes as text; ``'null'`` for None, as SQLAlchemy's JSON type stores it."""


def _run_params(change: RunUpdate) -> dict[str, Any]:
    """The columns of ``runs`` a change sets (``started_at`` only where it is not set yet)."""
    values: dict[str, Any] = {"status": str(change.status)}
    if change.status is RunStatus.RUNNING:
        values["started_at"] = change.at
    elif change.status.ended:
        values.update(
            finished_at=change.at, output=change.output, error=change.error, usage=dict(change.usage)
        )
    return values


def _update_runs_statement(columns: frozenset[str]) -> Update:
    """``UPDATE runs`` of ``columns`` and ``last_seq`` from ``b_<column>`` parameters, by ``b_id``;
    ``started_at`` keeps its first value."""
    values: dict[str, Any] = {
        name: bindparam(f"b_{name}", type_=RUNS.c[name].type) for name in (*columns, "last_seq")
    }
    if "started_at" in values:
        values["started_at"] = func.coalesce(RUNS.c.started_at, values["started_at"])
    return update(RUNS).where(RUNS.c.id == bindparam("b_id")).values(values)


def _graph(row: GraphRow | Row[Any]) -> GraphRecord:
    return GraphRecord(
        name=row.name,
        version=row.version,
        spec=row.spec,
        description=row.description,
        created_at=row.created_at,
        nodes=row.nodes,
    )


def _run(row: RunRow | Row[Any] | _Columns) -> RunRecord:
    return RunRecord(
        id=row.id,
        graph=row.graph,
        version=row.version,
        status=RunStatus(row.status),
        input=row.input,
        created_at=row.created_at,
        output=row.output,
        error=row.error,
        started_at=row.started_at,
        finished_at=row.finished_at,
        usage=dict(row.usage or {}),
        idempotency_key=row.idempotency_key,
        last_seq=row.last_seq,
    )


def _execution(row: NodeRow | Row[Any]) -> NodeExecution:
    return NodeExecution(
        node=row.node,
        iteration=row.iteration,
        index=None if row.idx == WHOLE_NODE else row.idx,
        status=NodeStatus(row.status),
        attempts=row.attempts,
        output=row.output,
        error=row.error,
        started_at=row.started_at,
        finished_at=row.finished_at,
        usage=row.usage,
    )


def _event(row: EventRow | Row[Any]) -> Event:
    return Event(
        run_id=row.run_id,
        seq=row.seq,
        type=EventType(row.type),
        graph=row.graph,
        data=row.data,
        at=row.at,
        gid=row.gid,
    )
